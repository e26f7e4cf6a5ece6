"""``negbench bench``: the smoke configuration end to end, its CSV and JSON, and bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from clikit import invoke
from negbench import bench
from negbench.kernels import emc2 as kernels


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_bench_smoke_writes_its_csv_and_machine_record(tmp_path, capsys, one_thread):
    out = tmp_path / "bench"
    code, stdout, err = invoke(capsys, "bench", "--smoke", "--threads", "1", "--samplers", "emc2,uniform",
                               "--workloads", "digits-mlp,resnet18-32px", "--out", str(out), "--quiet")
    assert code == 0, err
    frame = pd.read_csv(out / "bench-cpu.csv")
    assert list(frame.columns) == bench.COLUMNS
    assert not list(out.glob(".*.tmp"))
    sampler_part, step_part = frame[frame.part == "sampler"], frame[frame.part == "step"]
    assert sorted(sampler_part.sampler) == ["emc2", "in_batch", "uniform"]  # in_batch always measured
    assert sorted(set(step_part.workload)) == ["digits-mlp", "resnet18-32px"] and len(step_part) == 6
    assert (frame.repeats == bench.SMOKE["repeats"]).all() and (frame.median_ms > 0).all()
    assert (frame.in_batch_ms > 0).all() and frame.cpu_ms.notna().all() and (frame[frame.sampler == "in_batch"].cpu_ratio == 1).all()
    assert (frame[frame.sampler == "in_batch"].ratio == 1).all()
    pd.testing.assert_series_equal(frame.ratio, frame.median_ms / frame.in_batch_ms, check_names=False, rtol=1e-4)
    emc2 = frame[frame.sampler == "emc2"].set_index(["part", "workload"])
    # one chain per item with random augmentations, one per view on digits (m = 2): 12 bytes a chain
    assert emc2.loc[("sampler", "frozen-embeddings"), "state_bytes_per_item"] == 12
    assert emc2.loc[("sampler", "frozen-embeddings"), "views"] == "random"
    assert emc2.loc[("step", "digits-mlp"), "state_bytes_per_item"] == 24
    assert emc2.loc[("step", "resnet18-32px"), "state_bytes_per_item"] == 12
    expected_backend = "c" if kernels.unavailable_reason("cpu") is None else "reference"
    assert (emc2.backend == expected_backend).all()
    assert (frame[frame.sampler != "emc2"].backend.isna()).all()
    assert (frame[frame.sampler == "uniform"].state_bytes == 0).all()

    record = json.loads((out / "bench-cpu.json").read_text())
    machine = record["machine"]
    assert machine["cpu"] and machine["logical_cores"] >= 1 and machine["gpu"] is None
    assert machine["torch_threads"] == 1 and {"torch", "python", "negbench"} <= set(machine["versions"])
    assert record["options"]["smoke"] and record["samplers"] == ["in_batch", "emc2", "uniform"]
    assert "sampler-only cost per step" in stdout and "training step time" in stdout
    assert str(out / "bench-cpu.csv") in stdout.replace("\n", "")


def test_samplers_over_the_candidate_cap_are_reported_as_not_applicable(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setattr(bench, "MAX_SIMS", 100)  # full_softmax asks for all N·m = 128 views: 8·136 > 100
    code, _, err = invoke(capsys, "bench", "--smoke", "--threads", "1", "--part", "sampler", "--samplers",
                          "full_softmax", "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    frame = pd.read_csv(tmp_path / "bench-cpu.csv").set_index("sampler")
    assert frame.loc["full_softmax", "note"].startswith("n/a") and pd.isna(frame.loc["full_softmax", "median_ms"])
    assert str(frame.loc["full_softmax", "views"]) == "2"  # measured (where it fits) with m = 2 finite views
    assert frame.loc["in_batch", "median_ms"] > 0 and set(frame.part) == {"sampler"}


# Bad input (every command, one table): tests/test_bad_input.py


def test_sampler_variants_are_measured_side_by_side(tmp_path, capsys, one_thread):
    """``name:key=value`` entries (the default list adds emc2:kernel=reference): both emc2
    kernels in one interleaved run, each row naming its backend; the same seed, so the same
    weights."""
    code, stdout, err = invoke(capsys, "bench", "--smoke", "--threads", "1", "--part", "sampler", "--samplers",
                               "emc2,emc2:kernel=reference", "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    frame = pd.read_csv(tmp_path / "bench-cpu.csv").set_index("sampler")
    assert list(frame.index) == ["in_batch", "emc2", "emc2:kernel=reference"]
    assert frame.loc["emc2:kernel=reference", "backend"] == "reference"
    assert frame.loc["emc2:kernel=reference", "state_bytes_per_item"] == 12
    assert frame.loc["emc2", "backend"] == ("c" if kernels.unavailable_reason("cpu") is None else "reference")
    assert "emc2:kernel=reference" in bench.resolve(bench.BenchConfig(part="sampler", out=tmp_path))[2]
    code, _, err = invoke(capsys, "bench", "--smoke", "--samplers", "emc2:kernel=bogus", "--out", str(tmp_path))
    assert code == 2 and "kernel" in err and "Traceback" not in err
