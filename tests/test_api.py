"""The Python API that returns tables: ``negbench.compare`` against the comparison folder the
``negbench compare`` command writes (the same grid, its cells skipped the second time), the
per-run frame against the run folders, ``negbench.load_runs`` against the metrics.jsonl lines
and config.json of every run, and bad input."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

import negbench
from clikit import TINY_SYNTHETIC, invoke
from negbench import runner

TINY = [*TINY_SYNTHETIC, "--batch-sizes", "4", "--steps", "4", "--eval-every", "4", "--tv-steps", "2"]
PARAMS = {"num_items": 24, "input_dim": 8, "hidden": 16, "dim": 8}
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 2 samplers × 1 batch size × 2 seeds synthetic grid run by the command; its runs folder
    and the command's table.csv."""
    from negbench import cli, plots

    root = tmp_path_factory.mktemp("api")
    out = root / "results" / "runs"
    real = plots.make_plots
    plots.make_plots = lambda *args, **kwargs: {}
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["compare", *TINY, "--samplers", "uniform,in_batch", "--seeds", "2", "--out", str(out)])
    finally:
        plots.make_plots = real
    assert exit_info.value.code in (0, None)
    return out, pd.read_csv(root / "results" / "synthetic" / "table.csv")


@pytest.fixture()
def no_training(monkeypatch):
    """Fail if compare trains anything (every cell of the grid has finished)."""
    real_run = runner.run

    def checked(config, **kwargs):
        outcome = real_run(config, **kwargs)
        assert outcome.skipped, f"{config.sampler} seed {config.seed} was trained again"
        return outcome

    monkeypatch.setattr(runner, "run", checked)
    from negbench import plots

    monkeypatch.setattr(plots, "make_plots", lambda *args, **kwargs: {})


def last_rows(out: Path) -> dict[str, dict]:
    """run_id → the last metrics.jsonl row, read with json alone."""
    rows = {}
    for run_dir in out.iterdir():
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows[run_dir.name] = json.loads(lines[-1])
    return rows


def test_compare_returns_the_commands_table_and_the_runs(grid, no_training):
    out, command_table = grid
    result = negbench.compare(task="synthetic", samplers=["uniform", "in_batch"], batch_sizes=[4], seeds=2, steps=4,
                              eval_every=4, tv_steps=2, params=PARAMS, out=out, name="api", console=QUIET)
    assert isinstance(result, negbench.CompareResult)
    assert result.folder == out.parent / "api" and (result.folder / "table.csv").exists()
    # the same rows and numbers as the command's table.csv (written and read through CSV alike)
    mine = pd.read_csv(io.StringIO(result.table.to_csv(index=False)))
    pd.testing.assert_frame_equal(mine, command_table)
    pd.testing.assert_frame_equal(pd.read_csv(result.folder / "table.csv"), command_table)

    runs = result.runs
    assert list(runs.columns[:9]) == ["task", "sampler", "batch_size", "seed", "status", "reason", "n_over_b",
                                      "run_id", "run_dir"]
    assert len(runs) == 4 and set(runs["status"]) == {"completed"}
    assert sorted(zip(runs["sampler"], runs["seed"])) == [("in_batch", 0), ("in_batch", 1), ("uniform", 0), ("uniform", 1)]
    final = last_rows(out)
    for row in runs.to_dict("records"):
        assert Path(row["run_dir"]).name == row["run_id"]
        assert row["gcl"] == final[row["run_id"]]["gcl"]
        assert row["n_over_b"] == 24 / 4
    # the table's mean and t-interval of gcl, recomputed from the final rows with numpy
    for sampler, group in runs.groupby("sampler"):
        values = np.array([final[r]["gcl"] for r in group["run_id"]])
        row = result.table[(result.table["sampler"] == sampler) & (result.table["metric"] == "gcl")].iloc[0]
        half = 12.7062047361747 * values.std(ddof=1) / math.sqrt(2)  # t_{0.975, 1}
        assert row["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert row["ci_high"] == pytest.approx(values.mean() + half, rel=1e-9)


def test_compare_of_run_folders_and_collect(grid, no_training):
    out, command_table = grid
    folders = negbench.compare(str(out / "synthetic-*"), out=out, name="folders", console=QUIET)
    assert len(folders.runs) == 4
    def means(table: pd.DataFrame) -> dict:
        return {(s, m): v for s, m, v in zip(table["sampler"], table["metric"], table["mean"])}

    assert means(folders.table).keys() == means(command_table).keys()
    for key, value in means(command_table).items():
        assert means(folders.table)[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
    collected = negbench.compare(task="synthetic", samplers="uniform,in_batch", batch_sizes="4", seeds="0,5",
                                 steps=4, eval_every=4, tv_steps=2, params=PARAMS, out=out, name="collected",
                                 collect=True, console=QUIET)
    gcl = collected.table[collected.table["metric"] == "gcl"]
    assert (gcl["n"] == 1).all() and (gcl["missing"] == 1).all()
    assert set(collected.runs.loc[collected.runs["seed"] == 5, "status"]) == {"missing"}


def test_load_runs_is_every_metrics_row_with_its_config(grid):
    out, _ = grid
    frame = negbench.load_runs(out)
    lines = {p.name: (p / "metrics.jsonl").read_text().splitlines() for p in out.iterdir()}
    assert len(frame) == sum(len(v) for v in lines.values()) == 4 * 2  # rows at steps 0 and 4
    for column in ("run_id", "sampler_label", "task", "sampler", "batch_size", "seed", "lr", "steps", "optimizer",
                   "beta", "status", "run_dir", "step", "gcl", "grad_norm_sq", "loss"):
        assert column in frame.columns, column
    for run_id, group in frame.groupby("run_id"):
        config = json.loads((out / run_id / "config.json").read_text())
        rows = [json.loads(line) for line in lines[run_id]]
        assert list(group["step"]) == [r["step"] for r in rows]
        assert list(group["gcl"]) == [r["gcl"] for r in rows]
        for key in ("task", "sampler", "batch_size", "seed", "lr", "steps", "optimizer", "beta"):
            assert set(group[key]) == {config[key]}, key
        assert set(group["status"]) == {"completed"}
        assert set(group["sampler_label"]) == {config["sampler"]}
    # a glob, and a list of folders, give the same rows of those runs
    in_batch = negbench.load_runs(str(out / "synthetic-in_batch-*"))
    assert set(in_batch["sampler"]) == {"in_batch"} and len(in_batch) == 4
    listed = negbench.load_runs(sorted(out.glob("synthetic-in_batch-*")))
    pd.testing.assert_frame_equal(listed, in_batch)


def test_load_runs_of_an_unfinished_and_a_broken_run(grid, tmp_path):
    out, _ = grid
    import shutil

    first, second = sorted(out.iterdir())[:2]
    shutil.copytree(first, tmp_path / first.name)
    (tmp_path / first.name / "summary.json").unlink()  # still running, or killed
    shutil.copytree(second, tmp_path / second.name)
    (tmp_path / second.name / "config.json").write_text("{not json")
    warnings: list[str] = []
    frame = negbench.load_runs(tmp_path, warn=warnings.append)
    assert set(frame["run_id"]) == {first.name} and set(frame["status"]) == {"unfinished"}
    assert len(warnings) == 1 and second.name in warnings[0]


@pytest.mark.parametrize("options, message", [
    ({"samplers": "uniform,nope"}, "nope"),
    ({"seeds": "x"}, "--seeds"),
    ({"samplers": "uniform", "reference": "emc2"}, "--reference"),
    ({"sort": "speed"}, "--sort"),
    ({"params": {"no_such_key": 1}}, "no_such_key"),
    ({"jobs": 0}, "--jobs"),
    ({"slurm_partition": "gpu"}, "submitit"),
])
def test_compare_bad_input_raises_user_error_and_writes_nothing(tmp_path, options, message):
    out = tmp_path / "results" / "runs"
    with pytest.raises(negbench.UserError, match=message):
        negbench.compare(task="synthetic", batch_sizes=4, steps=2, out=out, console=QUIET, **options)
    assert not (tmp_path / "results").exists()


def test_bad_paths_raise_user_error(tmp_path):
    with pytest.raises(negbench.UserError, match="no run folder matches"):
        negbench.load_runs(str(tmp_path / "nothing-*"))
    with pytest.raises(negbench.UserError, match="no readable run"):
        negbench.load_runs(tmp_path)
    with pytest.raises(negbench.UserError, match="not both"):
        negbench.compare(str(tmp_path), task="synthetic", console=QUIET)
    with pytest.raises(negbench.UserError, match="comma-separated"):
        negbench.compare(task="synthetic", seeds=True, console=QUIET)


def test_the_command_is_a_thin_wrapper(tmp_path, capsys, monkeypatch):
    """``negbench compare`` hands its options to ``negbench.api.compare`` and prints."""
    from negbench import api

    seen = {}

    def fake(runs, **options):
        seen.update(options, runs=runs)
        return api.CompareResult(pd.DataFrame(), pd.DataFrame(), tmp_path / "x", ())

    monkeypatch.setattr(api, "compare", fake)
    code, _, err = invoke(capsys, "compare", "--task", "digits", "--samplers", "emc2", "--seeds", "0,5", "--set",
                          "burn_in=0.3", "--collect", "--jobs", "2", "--out", str(tmp_path / "runs"))
    assert code == 0, err
    assert (seen["task"], seen["samplers"], seen["seeds"], seen["params"], seen["collect"], seen["jobs"]) == (
        "digits", "emc2", "0,5", ["burn_in=0.3"], True, 2)
    assert seen["runs"] is None and f"comparison written to {tmp_path / 'x'}/" in " ".join(err.split())
