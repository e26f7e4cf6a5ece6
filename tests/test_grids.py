"""Grids on several processes (issue 16): ``--jobs 2`` (spawned local workers), a Dask
``LocalCluster`` and submitit's local executor give, run for run, the metrics of the same grid
run in this process; a failing cell under workers is a row; a worker SIGKILLed mid-cell leaves
a cell the next ``compare`` resumes from its checkpoint, identical to an uninterrupted run; a
missing extra is a one-line error. Worker processes pay ~5 s of imports each here, so the
grids are tiny. (Bad options: tests/test_bad_input.py; the lease lock: test_lock.py.)"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pandas as pd
import pytest

from clikit import TINY_SYNTHETIC, invoke
from negbench import executors
from negbench.results import METRICS, SUMMARY, read_rows

#: metrics that measure the machine, not the run: left out of every identity check
MACHINE_KEYS = {"step_ms", "sampler_ms", "samples_per_s", "peak_mem_bytes"}
#: a 4-cell grid: 2 samplers × 1 batch size × 2 seeds, 8 steps, rows every 4
GRID = [*TINY_SYNTHETIC, "--samplers", "in_batch,emc2", "--batch-sizes", "4", "--seeds", "2", "--steps", "8",
        "--eval-every", "4", "--tv-steps", "2"]


def runs_of(out: Path) -> dict[str, tuple[list[dict], dict]]:
    """run id → (metric rows, summary) with the machine-dependent metrics left out."""
    found = {}
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rows = [{k: v for k, v in row.items() if k not in MACHINE_KEYS} for row in read_rows(run_dir / METRICS, strict=True)]
        summary = json.loads((run_dir / SUMMARY).read_text())
        summary["final"] = {k: v for k, v in summary["final"].items() if k not in MACHINE_KEYS}
        summary.pop("rows_digest", None)  # a checksum of metrics.jsonl, timings included
        found[run_dir.name] = (rows, summary)
    return found


def compare(capsys, out: Path, *extra: str) -> str:
    code, _, err = invoke(capsys, "compare", *GRID, "--out", str(out), "--name", str(out.parent / "table"), *extra)
    assert code == 0, err
    return err


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> dict[str, tuple[list[dict], dict]]:
    """The reference: the grid run one cell after another in this process (``--jobs 1``)."""
    out = tmp_path_factory.mktemp("jobs1") / "runs"
    from negbench.cli import main  # (capsys is per test; this runs once per module)

    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *GRID, "--out", str(out), "--name", str(out.parent / "table"), "--jobs", "1"])
    assert exit_info.value.code in (0, None)
    runs = runs_of(out)
    assert len(runs) == 4 and all(s["status"] == "completed" for _, s in runs.values())
    return runs


def test_two_local_workers_give_the_in_process_results_run_for_run(in_process, tmp_path, capsys):
    out = tmp_path / "runs"
    err = compare(capsys, out, "--jobs", "2")
    assert "2 local worker processes, 1 torch thread(s) each" in err
    assert runs_of(out) == in_process
    table = pd.read_csv(tmp_path / "table" / "table.csv")
    assert set(table.loc[table["metric"] == "gcl", "n"]) == {2}
    # rerun: every cell is finished, nothing trains, the table is the same
    err = compare(capsys, out, "--jobs", "2")
    assert "0 trained, 4 already finished, 0 failed" in err


def test_a_dask_local_cluster_gives_the_in_process_results_run_for_run(in_process, tmp_path, capsys):
    pytest.importorskip("distributed")
    out = tmp_path / "runs"
    err = compare(capsys, out, "--backend", "dask", "--jobs", "2")
    assert "a Dask LocalCluster of 2 workers" in err
    assert runs_of(out) == in_process


def test_submitit_local_executor_runs_a_two_cell_grid(in_process, tmp_path, capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "runs"
    # without Slurm, submitit's AutoExecutor falls back to its local executor (one process per job)
    err = compare(capsys, out, "--backend", "submitit", "--seeds", "1", "--slurm-time", "10")
    assert "submitit" in err
    got = runs_of(out)
    assert len(got) == 2 and got == {k: v for k, v in in_process.items() if k in got}
    assert list((out / ".submitit").iterdir())  # submitit's logs and pickles, out of the comparison's way


BOOM_PLUGIN = '''
from negbench.registry import register_sampler
from negbench.samplers.uniform import UniformSampler
from negbench.params import Param


@register_sampler("test_boom")
class Boom(UniformSampler):
    description = "uniform, or raises in weigh (test only)"
    params = {"boom": Param(False, "raise in weigh")}
    test_params = {"boom": False}

    def weigh(self, sims, batch):
        if self.config["boom"]:
            raise RuntimeError("boom in a worker")
        return super().weigh(sims, batch)
'''


def test_a_cell_that_raises_in_a_worker_is_a_failed_row_and_plugins_reach_the_workers(tmp_path, capsys):
    plugin = tmp_path / "boom.py"
    plugin.write_text(BOOM_PLUGIN)
    out = tmp_path / "runs"
    code, _, err = invoke(capsys, "compare", *TINY_SYNTHETIC, "--plugin", str(plugin), "--samplers",
                          "test_boom,test_boom:boom=true", "--batch-sizes", "4", "--seeds", "1", "--steps", "4",
                          "--tv-steps", "0", "--jobs", "2", "--out", str(out), "--name", "boom", "--reference",
                          "test_boom")
    assert code == 1, err  # issue 17: a failed run makes compare exit 1
    table = pd.read_csv(tmp_path / "boom" / "table.csv").query("metric == 'gcl'").set_index("sampler")
    assert table.loc["test_boom", "status"] == "completed"
    assert table.loc["test_boom:boom=true", "status"] == "1 failed"
    assert "RuntimeError: boom in a worker" in table.loc["test_boom:boom=true", "reason"]


def test_a_worker_killed_mid_cell_leaves_a_cell_the_next_run_resumes(tmp_path):
    from rich.console import Console

    import faults
    from negbench import grid as grids
    from dataclasses import replace

    from negbench.config import RunConfig

    out = tmp_path / "runs"
    # every worker SIGKILLs itself once step 5 is done; checkpoints at steps 3 and 6. The pool
    # breaks (and SIGTERMs the other worker, whose run checkpoints and stops as interrupted),
    # each cell is retried once from its checkpoint, is killed at step 5 again, and is reported
    base = RunConfig(task="synthetic", task_params={"num_items": "24", "input_dim": "8", "hidden": "16", "dim": "8"},
                     steps=8, eval_every=4, tv_steps=2, out=out, checkpoint_every=3)
    grid = grids.build_grid(base, grids.parse_sampler_specs("in_batch"), [4], [0, 1])
    console = Console(stderr=True)
    assert grids.run_grid(grid.cells, console, run_one=faults.run_cell_killed_at_step_5,
                          executor=executors.ExecutorOptions(jobs=2))
    assert all("its worker process died" in (c.error or "") for c in grid.cells), [c.error for c in grid.cells]
    run_dirs = [d for d in out.iterdir() if not d.name.startswith(".")]
    assert len(run_dirs) == 2 and all((d / "checkpoint.pt").exists() for d in run_dirs)
    assert all(not (d / SUMMARY).exists() or json.loads((d / SUMMARY).read_text())["status"] == "interrupted"
               for d in run_dirs)
    assert any((d / ".lock").exists() for d in run_dirs)  # a SIGKILLed worker's lease, broken by the next run
    # the next run of the same grid resumes both cells from their checkpoints ...
    for cell in grid.cells:
        cell.error = None
    assert grids.run_grid(grid.cells, console, executor=executors.ExecutorOptions(jobs=2))
    assert all(c.ran and c.error is None for c in grid.cells), [c.error for c in grid.cells]
    # ... and ends identical to the same grid never interrupted, run in this process
    fresh = grids.build_grid(replace(base, out=tmp_path / "fresh"), grids.parse_sampler_specs("in_batch"), [4], [0, 1])
    assert grids.run_grid(fresh.cells, console)
    assert runs_of(out) == runs_of(tmp_path / "fresh")


@pytest.mark.parametrize(("backend", "module", "extra"), [("dask", "distributed", "dask"), ("submitit", "submitit", "slurm")])
def test_a_missing_extra_is_a_one_line_error_naming_it(backend, module, extra, tmp_path, capsys, monkeypatch):
    real = executors.find_spec
    monkeypatch.setattr(executors, "find_spec", lambda name: None if name == module else real(name))
    code, stdout, err = invoke(capsys, "compare", *GRID, "--backend", backend, "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1, err
    assert f"pip install -e '.[{extra}]'" in err
    assert list(tmp_path.iterdir()) == []


def test_option_defaults_and_slurm_time():
    assert executors.ExecutorOptions().validate().jobs == 1
    assert executors.ExecutorOptions().validate().threads_per_job is None  # in process: torch's own choice
    two = executors.ExecutorOptions(jobs=2).validate()
    assert two.threads_per_job == max(1, executors.cores() // 2) and not two.in_process
    assert executors.ExecutorOptions(jobs=2, threads_per_job=3).validate().threads_per_job == 3
    if find_spec("distributed") is not None:
        remote = executors.ExecutorOptions(backend="dask", scheduler="tcp://h:8786").validate()
        assert remote.jobs is None and remote.threads_per_job is None
    assert [executors.slurm_minutes(t) for t in ("90", "01:30", "1:30:00", "1:30:01", "1-00:00")] == [90, 90, 90, 91, 1440]
    for bad in ("0", "x", "1:2:3:4", "-5", "1-2"):
        with pytest.raises(executors.UserError, match="--slurm-time expects"):
            executors.slurm_minutes(bad)
