"""The CLI end to end on a tiny configuration, the results schema, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clikit import TINY_SYNTHETIC, invoke

ROW_KEYS = {"step", "epoch", "samples_seen", "loss", "gcl", "grad_norm_sq", "grad_error_sq", "alignment",
            "uniformity", "sampling_tv", "sampling_tv_floor", "lp_acc", "knn1_acc", "knn10_acc", "step_ms",
            "sampler_ms", "samples_per_s", "peak_mem_bytes", "state_bytes"}


def only_run_dir(out):
    dirs = [d for d in out.iterdir() if d.is_dir()]
    assert len(dirs) == 1
    return dirs[0]


def test_run_writes_the_results_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    code, stdout, err = invoke(capsys, "run", *TINY_SYNTHETIC, "--sampler", "simclr", "--batch-size", "4",
                               "--steps", "8", "--eval-every", "4", "--seed", "1", "--out", str(out),
                               "--tv-steps", "5", "--grad-error", "--quiet")
    assert code == 0, err
    run_dir = only_run_dir(out)
    assert run_dir.name.startswith("synthetic-in_batch-b4-s1-")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["sampler"] == "in_batch" and config["sampler_params"] == {"include_positive": True}
    assert config["task_params"]["num_items"] == 24 and config["steps"] == 8 and config["seed"] == 1
    assert {"torch", "torchvision", "python", "negbench"} <= set(config["versions"])
    assert set(config["seeds"]) == {"data", "init", "order", "sampler", "probe"}
    assert config["eval_protocol"]["linear_probe"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4, 8]
    for row in rows:
        assert ROW_KEYS <= set(row)
    last = rows[-1]
    for key in ("gcl", "grad_norm_sq", "grad_error_sq", "sampling_tv", "sampling_tv_floor", "lp_acc", "step_ms", "samples_per_s"):
        assert isinstance(last[key], float), key
    assert last["state_bytes"] == 0 and last["peak_mem_bytes"] > 0
    assert last["grad_error_sq"] >= 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["reason"] is None
    assert summary["final"]["grad_norm_sq"] == last["grad_norm_sq"]
    second_half = [r["grad_norm_sq"] for r in rows if r["step"] >= 4]
    assert summary["grad_norm_sq_avg"] == pytest.approx(sum(second_half) / len(second_half))
    assert summary["grad_norm_sq_min"] == min(r["grad_norm_sq"] for r in rows)
    assert "grad_norm_sq" in stdout  # the summary table
    assert not (run_dir / "checkpoint.pt").exists()

    # the same config again is skipped, not rerun
    code, _, err = invoke(capsys, "run", *TINY_SYNTHETIC, "--sampler", "in_batch", "--batch-size", "4",
                          "--steps", "8", "--eval-every", "4", "--seed", "1", "--out", str(out),
                          "--tv-steps", "5", "--grad-error", "--quiet")
    assert code == 0 and "skipped" in err


def test_default_run_uses_emc2_on_digits(tmp_path, capsys):
    code, _, err = invoke(capsys, "run", "--steps", "3", "--eval-every", "3", "--seed", "0", "--set", "max_items=60",
                          "--tv-steps", "2", "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("digits-emc2-b32-s0-")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["accept_rate"] is not None and rows[-1]["state_bytes"] == 60 * 2 * 12


def test_random_seed_is_chosen_and_printed(tmp_path, capsys):
    code, _, err = invoke(capsys, "run", *TINY_SYNTHETIC, "--sampler", "uniform", "--batch-size", "4", "--steps", "2",
                          "--tv-steps", "0", "--out", str(tmp_path), "--quiet")
    assert code == 0
    seed = json.loads((only_run_dir(tmp_path) / "config.json").read_text())["seed"]
    assert f"seed {seed}" in err


def test_console_script_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "negbench", "list", "samplers"], capture_output=True, text=True)
    assert result.returncode == 0 and "emc2" in result.stdout
    result = subprocess.run([sys.executable, "-m", "negbench", "run", "--sampler", "emcc"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "did you mean: emc2" in result.stderr


def test_list_shows_parameters(capsys):
    code, out, _ = invoke(capsys, "list")
    assert code == 0
    for text in ("emc2", "burn_in", "in_batch", "simclr", "digits", "synthetic", "num_items"):
        assert text in out


def test_list_prints_parameter_ranges_verbatim(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per parameter
    code, out, _ = invoke(capsys, "list", "samplers")
    assert code == 0 and "[float in (0, 1]]" in out  # sogclr's gamma: not swallowed as rich markup


# Bad input (every command, one table): tests/test_bad_input.py
