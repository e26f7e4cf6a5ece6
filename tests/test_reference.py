"""Behaviour stays the same (issue 10): committed reference runs, rerun row for row.

``tests/data/reference/<name>.jsonl`` holds the ``metrics.jsonl`` rows of each run below as
today's code produced them, minus the columns that measure the machine (timings, memory).
The test reruns each configuration in-process, on one thread as every test does, and asserts
every row identical. The ``default`` case is ``negbench run --seed 0`` (emc2 on digits, 1,000
Adam steps, 11 rows); ``importance`` exercises a sampler's extras and ``--grad-error``;
``neg_cache`` its ``refresh`` of a stale cache.

Regenerate (only when a change of the numbers is intended and explained in its commit):
``python tests/test_reference.py``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from negbench import RunConfig, run
from negbench.results import METRICS, read_rows

DATA = Path(__file__).parent / "data" / "reference"
#: metrics that measure the machine, not the run
MACHINE_KEYS = {"step_ms", "sampler_ms", "samples_per_s", "peak_mem_bytes"}

#: the committed cases; explicit eval/TV options on the short ones, so that the defaults for
#: short runs (their evaluation schedule) can change without touching these references
CASES: dict[str, RunConfig] = {
    "default": RunConfig(seed=0),
    "importance": RunConfig(task="synthetic", sampler="importance", steps=40, eval_every=10, tv_steps=5,
                            grad_error=True, seed=0),
    "neg_cache": RunConfig(task="synthetic", sampler="neg_cache", batch_size=8, steps=30, eval_every=10,
                           tv_steps=3, seed=1),
}


def run_rows(config: RunConfig, out: Path) -> list[dict]:
    """The metric rows of ``config`` run afresh under ``out``, machine columns removed."""
    outcome = run(dataclasses.replace(config, out=out), show_progress=False)
    assert outcome.summary["status"] == "completed", outcome.summary
    return [{k: v for k, v in row.items() if k not in MACHINE_KEYS}
            for row in read_rows(outcome.run_dir / METRICS, strict=True)]


def committed(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", [pytest.param("default", marks=pytest.mark.slow), "importance", "neg_cache"])
def test_run_matches_the_committed_reference_row_for_row(name, tmp_path):
    want = committed(name)
    got = run_rows(CASES[name], tmp_path)
    assert len(got) == len(want)
    for row, expected in zip(got, want):
        assert row == expected, f"step {expected['step']}"


def test_the_references_hold_every_metric():
    """A reference that lost its metrics could not catch a change in them."""
    for name in CASES:
        rows = committed(name)
        assert len(rows) >= 4
        for key in ("loss", "gcl", "grad_norm_sq", "sampling_tv", "uniformity", "lp_acc", "state_bytes"):
            assert rows[-1][key] is not None, (name, key)
    assert committed("default")[-1]["accept_rate"] is not None  # emc2's diagnostics
    assert committed("importance")[-1]["grad_error_sq"] is not None


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    DATA.mkdir(parents=True, exist_ok=True)
    for case, cfg in CASES.items():
        if len(sys.argv) > 1 and case not in sys.argv[1:]:
            continue
        with tempfile.TemporaryDirectory() as folder:
            rows = run_rows(cfg, Path(folder))
        (DATA / f"{case}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        print(f"{case}: {len(rows)} rows")
