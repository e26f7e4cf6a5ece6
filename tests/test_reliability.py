"""Reliability (issue 7): a run killed (SIGKILL) or stopped by a signal and resumed ends
identical to one never stopped; two processes never share a run folder; divergence is a
result that keeps its rows; the same seed gives the same metrics; config.json records the
seeds and the provenance. Bad input: tests/test_bad_input.py. Corrupt run folders read by
``negbench compare`` (a truncated metrics.jsonl, a missing summary.json, a garbage
config.json: one warning line each, skipped): test_compare.py's
``test_corrupt_run_folders_are_skipped_with_a_warning``.

Subprocesses are few (each pays ~5 s of imports here): the SIGKILL test runs the two
samplers' kill chains side by side, the lock test pre-imports its second process."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import faults
from clikit import TINY_SYNTHETIC, invoke
from negbench import __version__, runner, session, training
from negbench.session import after_each_step
from negbench.config import RunConfig, derive_seed
from negbench.results import CHECKPOINT, CONFIG, METRICS, SUMMARY, read_rows

#: metrics that measure the machine, not the run: left out of every identity check
MACHINE_KEYS = {"step_ms", "sampler_ms", "samples_per_s", "peak_mem_bytes"}
STEPS, EVAL_EVERY, CHECKPOINT_EVERY = 12, 4, 3


def run_args(sampler: str, out: Path, *extra: str) -> list[str]:
    """A tiny run (12 steps of 4 items; rows at 0, 4, 8, 12) with every metric that carries
    state across a metric window: loss, grad_error_sq, sampling_tv, the sampler's diagnostics."""
    return ["run", *TINY_SYNTHETIC, "--sampler", sampler, "--batch-size", "4", "--steps", str(STEPS),
            "--eval-every", str(EVAL_EVERY), "--tv-steps", "2", "--grad-error", "--seed", "3",
            "--out", str(out), "--quiet", *extra]


def only_run_dir(out: Path) -> Path:
    dirs = [d for d in out.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def result_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in MACHINE_KEYS} for row in read_rows(run_dir / METRICS, strict=True)]


def result_summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / SUMMARY).read_text())
    summary["final"] = {k: v for k, v in summary["final"].items() if k not in MACHINE_KEYS}
    summary.pop("rows_digest")  # a checksum of metrics.jsonl, timings included
    return summary


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def negbench_process(args: list[str], cwd: Path, kill_at: str | None = None) -> subprocess.Popen:
    """``negbench ARGS`` in a new process; with ``kill_at="k[:SIG]"`` through the fault
    launcher (tests/faults.py), which makes it signal itself once step k is done."""
    command = ["-m", "negbench"] if kill_at is None else [faults.LAUNCHER, kill_at]
    return subprocess.Popen([sys.executable, *command, *args], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_references: dict[str, Path] = {}


@pytest.fixture()
def reference(tmp_path_factory, capsys):
    """The run folder of an uninterrupted in-process run of ``sampler`` (default checkpoints,
    computed once per sampler)."""

    def get(sampler: str) -> Path:
        if sampler not in _references:
            out = tmp_path_factory.mktemp(f"reference-{sampler}")
            code, _, err = invoke(capsys, *run_args(sampler, out))
            assert code == 0, err
            _references[sampler] = only_run_dir(out)
        return _references[sampler]

    return get


# ---- kill and resume ---------------------------------------------------------------------------

#: three chained kill points per sampler (checkpoints every 3 steps, rows every 4). Between
#: them they hit: before the first checkpoint (the rerun starts afresh), on a checkpoint step,
#: after a row written past the last checkpoint (the rerun drops it and writes it again), and
#: mid-window (the loss, grad-error and diagnostics sums come from the checkpoint).
KILLS = {"sogclr": (5, 8, 10), "emc2": (2, 6, 11)}


def test_sigkill_at_three_steps_then_resume_ends_identical(tmp_path, reference, capsys):
    outs = {sampler: tmp_path / sampler for sampler in KILLS}
    expected_dirs = {}
    for stage in range(3):
        procs = {sampler: negbench_process(run_args(sampler, outs[sampler], "--checkpoint-every", str(CHECKPOINT_EVERY)),
                                           tmp_path, kill_at=str(kills[stage]))
                 for sampler, kills in KILLS.items()}
        if stage == 0:  # the references, while the first processes run
            expected_dirs = {sampler: reference(sampler) for sampler in KILLS}
        for sampler, proc in procs.items():
            _, err = proc.communicate(timeout=300)
            step = KILLS[sampler][stage]
            assert proc.returncode == -signal.SIGKILL, f"{sampler} killed at {step}: {err}"
            run_dir = only_run_dir(outs[sampler])
            assert run_dir.name == expected_dirs[sampler].name  # --checkpoint-every is not in the run id
            assert not (run_dir / SUMMARY).exists()
            # what a reader sees after the kill is a prefix of the uninterrupted run
            rows, want = result_rows(run_dir), result_rows(expected_dirs[sampler])
            assert rows == want[: len(rows)] and rows[-1]["step"] == step - step % EVAL_EVERY
            if step >= CHECKPOINT_EVERY:
                checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=False)
                assert checkpoint["step"] == step - step % CHECKPOINT_EVERY
            else:
                assert not (run_dir / CHECKPOINT).exists()
            if stage > 0:  # resumed from the checkpoint the previous kill left, if it left one
                assert ("resuming" in err) == (KILLS[sampler][stage - 1] >= CHECKPOINT_EVERY), err
    for sampler in KILLS:  # the last rerun, in this process, runs to the end
        code, _, err = invoke(capsys, *run_args(sampler, outs[sampler], "--checkpoint-every", str(CHECKPOINT_EVERY)))
        assert code == 0 and f"from step {KILLS[sampler][-1] - KILLS[sampler][-1] % CHECKPOINT_EVERY}" in err, err
        run_dir, expected = only_run_dir(outs[sampler]), expected_dirs[sampler]
        assert result_rows(run_dir) == result_rows(expected)
        assert result_summary(run_dir) == result_summary(expected)
        assert result_summary(run_dir)["status"] == "completed" and not (run_dir / CHECKPOINT).exists()
        assert not list(run_dir.glob(".*.tmp"))
    assert result_rows(expected_dirs["emc2"])[-1]["accept_rate"] is not None


@pytest.mark.parametrize(("signame", "sampler"), [("INT", "emc2"), ("TERM", "neg_cache")])
def test_a_signal_checkpoints_mid_window_and_the_rerun_ends_identical(signame, sampler, tmp_path, reference, capsys):
    expected = reference(sampler)
    with after_each_step(faults.kill_at(*faults.parse(f"6:{signame}"))):  # signals itself once step 6 is done
        code, _, err = invoke(capsys, *run_args(sampler, tmp_path))
    assert code == 130, err
    run_dir = only_run_dir(tmp_path)
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert summary["status"] == "interrupted" and "signal at step 6" in summary["reason"]
    assert summary["steps_done"] == 6 and summary["final"]["step"] == 4  # the last row: step 4
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert checkpoint["step"] == 6 and checkpoint["window"]["loss_count"] == 2  # steps 5 and 6
    assert [r["step"] for r in result_rows(run_dir)] == [0, 4]
    code, _, err = invoke(capsys, *run_args(sampler, tmp_path))
    assert code == 0 and "from step 6" in err, err
    assert result_rows(run_dir) == result_rows(expected)
    assert result_summary(run_dir) == result_summary(expected)


# ---- atomic files ----------------------------------------------------------------------------------

class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_a_failed_write_leaves_the_previous_file_whole_and_no_temporary(tmp_path, monkeypatch):
    from negbench import results

    checkpoint, summary = tmp_path / CHECKPOINT, tmp_path / SUMMARY
    results.atomic_torch_save(checkpoint, {"step": 3})
    results.atomic_write_json(summary, {"status": "completed"})
    with pytest.raises(RuntimeError, match="cannot pickle"):  # fails half-way through torch.save
        results.atomic_torch_save(checkpoint, {"step": 4, "bad": Unpicklable()})
    def no_rename(*args):
        raise OSError("disk full")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="disk full"):  # fails at the rename
        patch.setattr(os, "replace", no_rename)
        results.atomic_write_json(summary, {"status": "failed"})
    assert torch.load(checkpoint, weights_only=False) == {"step": 3}
    assert json.loads(summary.read_text()) == {"status": "completed"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, SUMMARY]


def test_a_rerun_removes_the_temporary_files_of_a_killed_write(tmp_path, capsys):
    code, _, err = invoke(capsys, *run_args("uniform", tmp_path, "--steps", "2", "--eval-every", "2"))
    assert code == 0, err
    run_dir = only_run_dir(tmp_path)
    (run_dir / SUMMARY).unlink()  # as if killed before the end...
    stale = run_dir / f".{CHECKPOINT}.x1y2.tmp"  # ...in the middle of writing a checkpoint
    stale.write_bytes(b"half a checkpoint")
    code, _, err = invoke(capsys, *run_args("uniform", tmp_path, "--steps", "2", "--eval-every", "2"))
    assert code == 0, err
    assert not stale.exists() and json.loads((run_dir / SUMMARY).read_text())["status"] == "completed"


# ---- one process per run folder ------------------------------------------------------------------

WAIT_FOR_LINE = "import sys; from negbench.cli import main; sys.stdin.readline(); main(sys.argv[1:])"


def wait_for(folder: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The first path matching ``pattern`` under ``folder``, once ``proc`` has written it."""
    deadline = time.monotonic() + timeout
    while not (found := sorted(folder.glob(pattern))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{folder}/{pattern} never appeared"
        time.sleep(0.05)
    return found[0]


def test_a_second_run_of_the_same_config_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "runs"
    args = ["run", *TINY_SYNTHETIC, "--sampler", "sogclr", "--batch-size", "4", "--steps", "1000000",
            "--eval-every", "1000000", "--tv-steps", "0", "--seed", "0", "--out", str(out), "--quiet"]
    second = subprocess.Popen([sys.executable, "-c", WAIT_FOR_LINE, *args], cwd=tmp_path, env=subprocess_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = negbench_process(args, tmp_path)
    try:
        # the first holds the lock and is training: its step-0 row and checkpoint are written
        run_dir = wait_for(out, "*/" + CHECKPOINT, first).parent
        before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != ".lock"}
        _, err = second.communicate("go\n", timeout=120)
        assert second.returncode == 2, err
        assert err.count("\n") == 1 and "is in use by another negbench process" in err and "Traceback" not in err
        assert before == {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != ".lock"}
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert first.returncode == 130, err
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert summary["status"] == "interrupted" and f"at step {summary['steps_done']};" in summary["reason"]
    assert torch.load(run_dir / CHECKPOINT, weights_only=False)["step"] == summary["steps_done"] > 0


def test_a_run_finished_by_another_process_while_waiting_for_the_lock_is_skipped(tmp_path, reference, capsys,
                                                                                  monkeypatch):
    import shutil

    expected = reference("sogclr")
    run_dir = tmp_path / expected.name
    shutil.copytree(expected, run_dir)
    stamps = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != ".lock"}
    real = session.finished_summary
    calls = []

    def not_yet_on_first_look(path):
        calls.append(path)
        return None if len(calls) == 1 else real(path)

    monkeypatch.setattr(session, "finished_summary", not_yet_on_first_look)
    code, _, err = invoke(capsys, *run_args("sogclr", tmp_path))
    assert code == 0 and "already completed, skipped" in err and len(calls) == 2
    assert stamps == {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != ".lock"}


def test_compare_leaves_a_cell_another_process_holds_and_runs_it_later(tmp_path, capsys, monkeypatch):
    from negbench import plots

    monkeypatch.setattr(plots, "make_plots", lambda *args, **kwargs: {})
    out = tmp_path / "runs"
    args = ["compare", *TINY_SYNTHETIC, "--samplers", "uniform", "--batch-sizes", "4", "--seeds", "2", "--steps", "2",
            "--tv-steps", "0", "--out", str(out), "--name", "cmp", "--sort", "gcl"]
    busy = runner.prepare(RunConfig(sampler="uniform", task="synthetic", batch_size=4, steps=2, seed=1, tv_steps=0,
                                    out=out, task_params={"num_items": "24", "input_dim": "8", "hidden": "16",
                                                          "dim": "8"}))
    with session.folder_lock(busy.run_dir):  # as an overlapping grid or a `negbench run` would
        code, _, err = invoke(capsys, *args)
    assert code == 0, err
    assert "seed 1: running in another negbench process, left to it" in " ".join(err.split())
    table = pd.read_csv(tmp_path / "cmp" / "table.csv", keep_default_na=False).query("metric == 'gcl'").iloc[0]
    assert (table["n"], table["missing"]) == (1, 1) and "running in another negbench process" in table["reason"]
    assert not (busy.run_dir / SUMMARY).exists()
    code, _, err = invoke(capsys, *args)  # the lock released: the cell runs now
    assert code == 0, err
    table = pd.read_csv(tmp_path / "cmp" / "table.csv", keep_default_na=False).query("metric == 'gcl'").iloc[0]
    assert (table["n"], table["missing"], table["status"]) == (2, 0, "completed")


# ---- divergence ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("eval_every", "metric"), [(4, "loss"), (1, "gcl")])
def test_a_huge_learning_rate_ends_diverged_with_its_rows(eval_every, metric, tmp_path, capsys, monkeypatch):
    """SGD with lr 1e30 blows up the encoder within two steps. With a row every 4 steps the
    loss of step 2 is the first non-finite quantity; with a row every step, the exact F(θ)
    of the row after step 1 already is. (The norm bound, which catches it at step 1, is off
    here: test_a_finite_blow_up_is_diverged_with_the_step_and_the_norm tests it.)"""
    monkeypatch.setattr(training, "BLOW_UP", math.inf)
    args = ["run", *TINY_SYNTHETIC, "--sampler", "in_batch", "--batch-size", "4", "--steps", "12", "--eval-every",
            str(eval_every), "--tv-steps", "2", "--seed", "0", "--optimizer", "sgd", "--lr", "1e30",
            "--out", str(tmp_path), "--quiet"]
    code, stdout, err = invoke(capsys, *args)
    assert code == 3, err  # divergence is a result (exit code 3), not an error
    run_dir = only_run_dir(tmp_path)
    summary = json.loads((run_dir / SUMMARY).read_text())
    rows = read_rows(run_dir / METRICS, strict=True)
    bad_step = summary["steps_done"]
    assert summary["status"] == "diverged" and summary["reason"] == f"{metric} became non-finite at step {bad_step}"
    assert summary["final"]["diverged_metric"] == metric and rows[-1]["diverged_metric"] == metric
    # every row before the bad step is kept (and finite), then the row of the bad step
    assert [r["step"] for r in rows] == [*range(0, bad_step, eval_every), bad_step]
    assert all(isinstance(r["gcl"], float) for r in rows[:-1]) and rows[-1].get("gcl") is None
    assert not (run_dir / CHECKPOINT).exists() and "diverged" in stdout
    code, _, err = invoke(capsys, *args)
    assert code == 3 and "already diverged, skipped" in err


POISONED_SAMPLER = '''
"""A test-only sampler: in-batch softmax weights, and a per-item state entry set to a chosen
value at step 3 (to check that the runner watches sampler states)."""
import torch
from negbench.params import Param
from negbench.registry import register_sampler
from negbench.sampler import Sampler


@register_sampler("test_poisoned_state")
class PoisonedState(Sampler):
    description = "in-batch weights; its state becomes `value` at step 3 (test only)"
    params = {"value": Param("nan", "what entry 0 of the state becomes", choices=("nan", "inf", "-inf"))}
    state_attributes = ("u",)

    def reset_state(self):
        self.u = torch.zeros(self.context.num_items)
        self.steps = 0

    def weigh(self, sims, batch):
        self.steps += 1
        if self.steps == 3:
            self.u[0] = float(self.value)
        weights = sims.new_zeros(sims.shape)
        a = batch.num_anchors
        weights[:, :a] = self.masked_softmax(sims[:, :a], batch.in_batch_valid)
        return weights
'''


@pytest.mark.parametrize(("value", "status"), [("nan", "diverged"), ("inf", "diverged"), ("-inf", "completed")])
def test_a_non_finite_sampler_state_ends_diverged_at_that_step(value, status, tmp_path, capsys):
    plugin = tmp_path / "poisoned.py"
    plugin.write_text(POISONED_SAMPLER)
    out = tmp_path / "runs"
    code, _, err = invoke(capsys, "run", "--plugin", str(plugin), *TINY_SYNTHETIC, "--sampler", "test_poisoned_state",
                          "--set", f"value={value}", "--batch-size", "4", "--steps", "6", "--eval-every", "2",
                          "--tv-steps", "0", "--seed", "0", "--out", str(out), "--quiet")
    assert code == (3 if status == "diverged" else 0), err
    run_dir = only_run_dir(out)
    summary = json.loads((run_dir / SUMMARY).read_text())
    rows = read_rows(run_dir / METRICS, strict=True)
    assert summary["status"] == status
    if status == "diverged":  # -inf is allowed: samplers use it for entries not set yet
        assert summary["reason"] == "sampler state became non-finite at step 3" and summary["steps_done"] == 3
        assert [r["step"] for r in rows] == [0, 2, 3] and rows[-1]["diverged_metric"] == "sampler state"
    else:
        assert [r["step"] for r in rows] == [0, 2, 4, 6]


# ---- determinism and provenance ---------------------------------------------------------------------

def test_the_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path, reference, capsys):
    expected = reference("emc2")
    code, _, err = invoke(capsys, *run_args("emc2", tmp_path / "again"))
    assert code == 0, err
    again = only_run_dir(tmp_path / "again")
    assert again.name == expected.name
    assert result_rows(again) == result_rows(expected) and result_summary(again) == result_summary(expected)
    other = run_args("emc2", tmp_path / "other")
    other[other.index("--seed") + 1] = "4"
    code, _, err = invoke(capsys, *other)
    assert code == 0, err
    rows, base = result_rows(only_run_dir(tmp_path / "other")), result_rows(expected)
    assert [r["gcl"] for r in rows] != [r["gcl"] for r in base]


def test_config_records_the_derived_seeds_and_the_provenance(reference):
    import torchvision

    config = json.loads((reference("emc2") / CONFIG).read_text())
    purposes = ("data", "init", "order", "sampler", "probe")
    assert config["seed"] == 3 and config["seeds"] == {p: derive_seed(3, p) for p in purposes}
    assert len(set(config["seeds"].values())) == len(purposes)
    versions = config["versions"]
    assert versions["negbench"] == __version__ and versions["torch"] == torch.__version__
    assert versions["torchvision"] == torchvision.__version__ and versions["python"] == platform.python_version()
    assert versions["cuda"] == torch.version.cuda and versions["device_name"]
    checkout = Path(runner.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert versions["git_commit"] == head.stdout.strip()
    else:
        assert "git_commit" not in versions
    # options that cannot change results are recorded, outside the run id's hashed settings
    assert config["options"]["checkpoint_every"] is None and "checkpoint_every" not in config


# ---- trust nothing a plugin or a run folder says (issue 17) -----------------------------------------

PLUGINS = Path(__file__).parent / "plugins"  # the fixtures (see plugins/README.md)


@pytest.fixture(autouse=True)
def _forget_plugins(restore_registries):
    """The plugin fixtures' registrations are forgotten after each test (another test may load
    a file of the same name, e.g. test_sampler_conformance's wrong_shape.py)."""


def plugin_run(tmp_path: Path, name: str, sampler: str, *extra: str) -> list[str]:
    return ["run", "--plugin", str(PLUGINS / name), *TINY_SYNTHETIC, "--sampler", sampler, "--batch-size", "4",
            "--steps", "4", "--eval-every", "2", "--seed", "0", "--out", str(tmp_path / "runs"), "--quiet", *extra]


@pytest.mark.parametrize(("name", "sampler", "step", "rule"), [
    ("negative.py", "test_negative", 1, "W has negative entries (min -2) but the sampler does not declare signed_weights"),
    ("wrong_shape.py", "test_wrong_shape", 1, "W has shape (8, 9), expected (8, 8) (anchors x candidates)"),
    ("nan_weights.py", "test_nan_weights", 2, "W has NaN or infinite entries"),
])
def test_a_weight_contract_violation_fails_the_run_naming_sampler_step_and_rule(name, sampler, step, rule, tmp_path,
                                                                                 capsys):
    """Finding 2: negative weights ran to `completed`, a wrong-shaped W crashed with a traceback
    from inside negbench, NaN weights were reported as a diverged loss."""
    code, _, err = invoke(capsys, *plugin_run(tmp_path, name, sampler, "--tv-steps", "0"))
    message = f"sampler {sampler!r} broke the weight contract at step {step}: {rule}"
    last = err.strip().splitlines()[-1]  # the lines before: the run's own start line
    assert code == 1 and last.startswith("negbench: error:") and message in last and "Traceback" not in err, err
    summary = json.loads((only_run_dir(tmp_path / "runs") / SUMMARY).read_text())
    assert summary["status"] == "failed" and message in summary["reason"]


def test_negative_weights_never_reach_sampling_tv(tmp_path, capsys):
    """Finding 2: a sampler with negative weights reported sampling_tv = 3200.5 (a TV is in [0, 1])."""
    code, _, err = invoke(capsys, *plugin_run(tmp_path, "negative.py", "test_negative", "--tv-steps", "2"))
    assert code == 1, err
    assert "broke the weight contract at step 0 (sampling_tv probe)" in err
    rows = read_rows(only_run_dir(tmp_path / "runs") / METRICS)
    assert all(r.get("sampling_tv") is None or 0 <= r["sampling_tv"] <= 1 for r in rows)


def test_signed_weights_are_allowed_when_declared(tmp_path, capsys):
    code, _, err = invoke(capsys, *plugin_run(tmp_path, "signed.py", "test_signed", "--tv-steps", "0"))
    assert code == 0, err
    assert json.loads((only_run_dir(tmp_path / "runs") / SUMMARY).read_text())["status"] == "completed"


def test_metric_ranges_are_checked_where_computed():
    from negbench.contract import MetricRangeError, check_range

    for name, value in (("sampling_tv", 0.0), ("sampling_tv", 1.0), ("lp_acc", 0.5), ("uniformity", -3.0),
                        ("alignment", 4.0), ("gcl", 1e9)):
        check_range(name, value)
    for name, value in (("sampling_tv", 3200.5), ("sampling_tv_floor", -0.1), ("knn1_acc", 1.5), ("uniformity", 0.2),
                        ("alignment", -1.0)):
        with pytest.raises(MetricRangeError, match=f"{name} = .* is outside its range"):
            check_range(name, value)


def test_a_raising_sampler_fails_with_exit_1_one_line_and_the_traceback_in_the_run_folder(tmp_path, capsys):
    """Findings 6 and the exit codes: an internal error is exit 1, one line, its traceback kept."""
    code, _, err = invoke(capsys, *plugin_run(tmp_path, "raising.py", "test_raising", "--tv-steps", "0"))
    run_dir = only_run_dir(tmp_path / "runs")
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("negbench: error:") and "Traceback" not in err, err
    assert "failed at step 2: ZeroDivisionError: division by zero" in last and str(run_dir / "error.log") in last
    log = (run_dir / "error.log").read_text()
    assert "Traceback" in log and "raising.py" in log and "1 / 0" in log
    assert json.loads((run_dir / SUMMARY).read_text())["status"] == "failed"


def test_an_epoch_where_no_anchor_got_a_negative_is_flagged_in_its_row(tmp_path, capsys):
    """Finding 4: a run with nothing to learn reported `completed` and nothing else."""
    code, _, err = invoke(capsys, *plugin_run(tmp_path, "empty.py", "test_empty", "--tv-steps", "0"))
    assert code == 0, err
    rows = read_rows(only_run_dir(tmp_path / "runs") / METRICS)
    assert [r.get("no_negatives") for r in rows] == [None, True, True]  # the row at step 0 has no window


def test_a_finite_blow_up_is_diverged_with_the_step_and_the_norm(tmp_path, capsys):
    """Finding 5, its command: normalised embeddings stay finite while θ explodes."""
    code, _, err = invoke(capsys, "run", "--task", "digits", "--sampler", "in_batch", "--optimizer", "sgd", "--lr", "1e12",
                          "--batch-size", "16", "--steps", "100", "--eval-every", "5", "--seed", "0",
                          "--out", str(tmp_path), "--quiet")
    assert code == 3, err  # finding 6: diverged is exit code 3
    summary = json.loads((only_run_dir(tmp_path) / SUMMARY).read_text())
    assert summary["status"] == "diverged" and summary["steps_done"] < 5, summary
    assert summary["reason"].startswith(f"parameter norm grew past 1e+06 x its initial value at step {summary['steps_done']}")
    assert summary["final"]["diverged_metric"] == "parameter norm"


def test_a_damaged_finished_run_is_moved_aside_and_run_again(tmp_path, capsys):
    """Finding 3: after `truncate -s 300 metrics.jsonl` a rerun said "already completed, skipped"."""
    args = run_args("uniform", tmp_path / "runs", "--steps", "4", "--eval-every", "1", "--grad-error")
    code, _, err = invoke(capsys, *args)
    assert code == 0, err
    run_dir = only_run_dir(tmp_path / "runs")
    good = result_rows(run_dir)
    with open(run_dir / METRICS, "r+b") as handle:
        handle.truncate(300)
    code, _, err = invoke(capsys, *args)
    assert code == 0 and "skipped" not in err, err
    aside = run_dir.with_name(run_dir.name + ".damaged-1")
    assert f"moved the damaged folder to {aside}" in " ".join(err.split())
    assert (aside / METRICS).stat().st_size == 300 and (aside / SUMMARY).exists()
    assert result_rows(run_dir) == good and result_summary(run_dir)["status"] == "completed"
    code, _, err = invoke(capsys, *args)
    assert code == 0 and "already completed, skipped" in err


def test_compare_drops_a_run_whose_rows_do_not_match_its_summary(tmp_path, capsys, monkeypatch):
    """Finding 3 for compare: a metric changed in place (same row count, same last step)."""
    from negbench import plots

    monkeypatch.setattr(plots, "make_plots", lambda *args, **kwargs: {})
    code, _, err = invoke(capsys, *run_args("uniform", tmp_path / "runs", "--steps", "4", "--eval-every", "2"))
    assert code == 0, err
    run_dir = only_run_dir(tmp_path / "runs")
    lines = (run_dir / METRICS).read_text().splitlines()
    row = json.loads(lines[1])
    row["gcl"] = 0.001
    lines[1] = json.dumps(row)
    (run_dir / METRICS).write_text("\n".join(lines) + "\n")
    code, _, err = invoke(capsys, "compare", str(run_dir), "--out", str(tmp_path / "runs"), "--name", str(tmp_path / "cmp"))
    assert code == 2 and "does not match the rows_digest in summary.json" in " ".join(err.split()), err


def test_run_folder_files_share_one_mode_and_no_lock_is_left(tmp_path, capsys):
    """Finding 8: config/summary/checkpoint were 0600, metrics.jsonl 0644; an empty .lock stayed."""
    code, _, err = invoke(capsys, *run_args("uniform", tmp_path, "--steps", "2", "--eval-every", "2",
                                           "--checkpoint-every", "1", "--seed", "0"))
    assert code == 0, err
    run_dir = only_run_dir(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in run_dir.iterdir()} == {
        name: 0o666 & ~umask for name in (CONFIG, METRICS, SUMMARY)}


def test_the_result_path_is_printed_whole_on_its_own_line(tmp_path, capsys):
    """Finding 8: off a terminal the path was wrapped inside the table title, split in two."""
    out = tmp_path / ("a-long-folder-name-" * 4) / "runs"
    code, stdout, err = invoke(capsys, *run_args("uniform", out, "--steps", "2", "--eval-every", "2"))
    assert code == 0, err
    assert f"results: {only_run_dir(out)}" in stdout.splitlines()


def test_compare_exits_1_when_a_cell_failed_and_0_with_diverged_cells(tmp_path, capsys, monkeypatch):
    """Finding 6 for compare: a failed cell is exit 1; a diverged one is a result (exit 0)."""
    from negbench import plots

    monkeypatch.setattr(plots, "make_plots", lambda *args, **kwargs: {})
    base = ["compare", *TINY_SYNTHETIC, "--batch-sizes", "4", "--seeds", "1", "--steps", "2", "--tv-steps", "0",
            "--out", str(tmp_path / "runs"), "--sort", "gcl"]
    code, _, err = invoke(capsys, *base, "--plugin", str(PLUGINS / "raising.py"), "--samplers", "uniform,test_raising",
                          "--reference", "uniform", "--name", "failed")
    assert code == 1 and "test_raising B=4 seed 0 failed" in " ".join(err.split()), err
    code, _, err = invoke(capsys, *base, "--samplers", "in_batch", "--optimizer", "sgd", "--lr", "1e30", "--name", "diverged")
    assert code == 0, err


def test_a_cjk_name_gives_one_warning_not_one_per_glyph(tmp_path, capsys, recwarn):
    """Finding 8: a --name in CJK flooded the log with matplotlib's missing-glyph warnings."""
    code, _, err = invoke(capsys, *run_args("uniform", tmp_path / "runs", "--steps", "2", "--eval-every", "2"))
    assert code == 0, err
    code, _, err = invoke(capsys, "compare", str(only_run_dir(tmp_path / "runs")), "--out", str(tmp_path / "runs"),
                          "--name", "負サンプリング比較", "--sort", "gcl")
    assert code == 0, err
    glyphs = [w for w in recwarn if "missing from font" in str(w.message) or "fonts lack" in str(w.message)]
    assert len(glyphs) <= 1, [str(w.message) for w in glyphs]


def _reference_rules(w, valid, positive, signed=False, empty_rows=False):
    """The weight contract's rules 2-5, one anchor at a time in plain Python (independent of
    negbench.contract's tensor code): the names of the rules W breaks."""
    broken = set()
    for a, row in enumerate(w.tolist()):
        if any(x != x or abs(x) == float("inf") for x in row):
            broken.add("finite")
            continue
        if not signed and min(row) < 0:
            broken.add("negative")
        if any(x != 0 and not valid[a][c] and c != positive[a] for c, x in enumerate(row)):
            broken.add("support")
        empty_allowed = empty_rows or not any(valid[a])
        if not (sum(row) > 0 or (all(x == 0 for x in row) and empty_allowed)):
            broken.add("row sum")
    return broken


def test_the_weight_contract_agrees_with_a_plain_python_reference():
    from negbench.contract import _NEGATIVE, _NOT_FINITE, _OFF_SUPPORT, _ROW_SUM, verdict
    from negbench.sampler import Batch

    names = {_NOT_FINITE: "finite", _NEGATIVE: "negative", _OFF_SUPPORT: "support", _ROW_SUM: "row sum"}
    gen = torch.Generator().manual_seed(0)
    items = torch.tensor([0, 0, 1, 1, 2, 2])
    batch = Batch.from_anchors(items, torch.tensor([0, 1] * 3), torch.zeros(6, 4))
    for trial in range(200):
        w = torch.rand(6, 6, generator=gen) * (torch.rand(6, 6, generator=gen) < 0.5)
        w = w * batch.valid  # a valid W, then one kind of damage
        kind = trial % 5
        a, c = torch.randint(6, (2,), generator=gen).tolist()
        if kind == 1:
            w[a, c] = -0.5
        elif kind == 2:
            w[a, a] = 0.3  # the anchor itself
        elif kind == 3:
            w[a] = 0.0
        elif kind == 4:
            w[a, c] = float("nan")
        for signed, empty in ((False, False), (True, False), (False, True)):
            sampler = type("S", (), {"signed_weights": signed, "empty_rows": empty, "name": "s"})()
            bits = int(verdict(w, batch, sampler)[0])
            got = {name for bit, name in names.items() if bits & bit}
            want = _reference_rules(w, batch.valid.tolist(), batch.positive.tolist(), signed, empty)
            if "finite" in want:  # a NaN row is reported as that, whatever else it breaks
                assert "finite" in got
            else:
                assert got == want, (trial, signed, empty, w)


def test_the_deferred_contract_reads_its_verdicts_at_flush_and_names_the_first_bad_step():
    """The CUDA path (no host synchronisation per step), exercised on the CPU."""
    from negbench import get_sampler
    from negbench.contract import WeightContract, WeightContractError
    from negbench.sampler import Batch, SamplerContext

    sampler = get_sampler("uniform").bind(SamplerContext(num_items=3, num_views=2, beta=5.0, dim=4))
    batch = Batch.from_anchors(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1] * 3), torch.zeros(6, 4))
    good = sampler.weigh(torch.zeros(6, 6), batch)
    contract = WeightContract(sampler, deferred=True)
    contract.check(good, batch, 1)
    contract.check(-good, batch, 2)  # deferred: nothing raised yet
    contract.check(good * float("nan"), batch, 3)
    with pytest.raises(WeightContractError, match="'uniform' broke the weight contract at step 2: W has negative"):
        contract.flush()
    contract.check(good, batch, 4)
    assert contract.window_empty() is False
    with pytest.raises(WeightContractError, match=r"at step 5: W has shape \(6, 5\)"):
        contract.check(good[:, :5], batch, 5)  # the shape is a host-side fact: at once
