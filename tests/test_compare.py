"""``negbench compare``: the aggregation maths against hand-made run folders, corrupt folders,
plots and CSV, resuming a grid, failing cells, bad input, and a tiny real grid end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from scipy import stats

from clikit import TINY_SYNTHETIC, invoke
from negbench import grid, plots, report, results
from negbench import stats as aggregation
from negbench import runner
from negbench.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = ("gcl", "grad_norm_sq", "sampling_tv", "sampling_tv_floor", "uniformity", "lp_acc", "knn1_acc",
               "knn10_acc", "step_ms", "sampler_ms", "samples_per_s", "peak_mem_bytes")


def make_run(root: Path, sampler: str, batch_size: int, seed: int, final: dict[str, float], *,
             status: str = "completed", reason: str | None = None, gap_avg: float | None = None,
             sampler_params: dict | None = None, steps: int = 10) -> Path:
    """A run folder written by hand: config.json, metrics.jsonl (rows at steps 0, 5, 10 whose
    last row holds ``final``) and summary.json."""
    run_dir = root / f"synthetic-{sampler}-b{batch_size}-s{seed}-{abs(hash((sampler, batch_size, seed))) % 10**8:08d}"
    run_dir.mkdir(parents=True)
    config = {"task": "synthetic", "sampler": sampler, "sampler_params": sampler_params or {}, "batch_size": batch_size,
              "seed": seed, "steps": steps, "optimizer": "adam", "lr": 0.001, "beta": 5.0, "device": "cpu",
              "num_items": 64, "items_per_batch_ratio": 64 / batch_size, "versions": {"negbench": "0.1.0"}}
    (run_dir / "config.json").write_text(json.dumps(config))
    rows = [{"step": s, **{k: v * (1 + (steps - s) / steps) for k, v in final.items()}} for s in (0, steps // 2)]
    rows.append({"step": steps, **final})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"status": status, "reason": reason, "steps_planned": steps, "steps_done": steps, "final": final,
               "grad_norm_sq_avg": gap_avg, "grad_norm_sq_min": final.get("grad_norm_sq")}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def random_final(rng: np.random.Generator, scale: float = 1.0) -> dict[str, float]:
    final = {k: float(rng.uniform(0.5, 2.0) * scale) for k in METRIC_KEYS}
    final["uniformity"] = float(-rng.uniform(1.0, 3.5))
    final["peak_mem_bytes"] = float(rng.integers(10**8, 2 * 10**8))
    return final


@pytest.fixture()
def hand_made(tmp_path):
    """emc2 and in_batch at B = 4 (seeds 0-2; in_batch lacks seed 2) and B = 8 (seeds 0-1),
    plus one diverged emc2 run and one collapsed in_batch run (B = 8, seed 2)."""
    rng = np.random.default_rng(7)
    runs = tmp_path / "runs"
    finals: dict[tuple[str, int, int], dict[str, float]] = {}
    for sampler, batch_size, seeds in (("emc2", 4, (0, 1, 2)), ("in_batch", 4, (0, 1)), ("emc2", 8, (0, 1)),
                                       ("in_batch", 8, (0, 1))):
        for seed in seeds:
            final = random_final(rng, 2.0 if sampler == "emc2" else 1.0)
            gap_avg = float(rng.uniform(0.01, 0.1))
            finals[(sampler, batch_size, seed)] = {**final, "grad_norm_sq_avg": gap_avg}
            make_run(runs, sampler, batch_size, seed, final, gap_avg=gap_avg)
    make_run(runs, "emc2", 8, 2, random_final(rng), status="diverged", reason="loss became non-finite at step 7")
    collapsed = {**random_final(rng), "uniformity": -0.01}
    finals[("in_batch", 8, 2)] = {**collapsed, "grad_norm_sq_avg": 0.5}
    make_run(runs, "in_batch", 8, 2, collapsed, gap_avg=0.5)
    return runs, finals


def test_aggregation_matches_independent_statistics(hand_made):
    runs, finals = hand_made
    records = results.collect_dirs(sorted(p for p in runs.iterdir()), warn=pytest.fail)
    table = aggregation.aggregate(records, reference="in_batch")
    assert set(table["metric"]) == {*METRIC_KEYS, "grad_norm_sq_avg", "grad_norm_sq_min"}
    for (sampler, batch_size), seeds in {("emc2", 4): (0, 1, 2), ("in_batch", 4): (0, 1), ("emc2", 8): (0, 1),
                                         ("in_batch", 8): (0, 1, 2)}.items():
        for metric in ("gcl", "grad_norm_sq_avg", "step_ms", "uniformity", "peak_mem_bytes"):
            x = np.array([finals[(sampler, batch_size, s)][metric] for s in seeds])
            n = len(x)
            half = stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)
            row = table[(table["sampler"] == sampler) & (table["batch_size"] == batch_size) & (table["metric"] == metric)]
            assert len(row) == 1
            row = row.iloc[0]
            assert row["n"] == n
            assert row["mean"] == pytest.approx(x.mean(), rel=1e-12)
            assert row["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
            assert row["ci_low"] == pytest.approx(x.mean() - half, rel=1e-9, abs=1e-12)
            assert row["ci_high"] == pytest.approx(x.mean() + half, rel=1e-9, abs=1e-12)
            assert row["n_over_b"] == 64 / batch_size
            # paired ratio: geometric mean of per-seed ratios on the seeds both completed
            shared = [s for s in seeds if ("in_batch", batch_size, s) in finals and (sampler, batch_size, s) in finals]
            if metric != "uniformity":  # negative: no ratio
                r = np.log([finals[(sampler, batch_size, s)][metric] / finals[("in_batch", batch_size, s)][metric]
                            for s in shared])
                assert row["ratio_n"] == len(shared)
                assert row["ratio"] == pytest.approx(math.exp(r.mean()), rel=1e-12)
                r_half = stats.t.ppf(0.975, len(r) - 1) * r.std(ddof=1) / math.sqrt(len(r))
                if r_half > 0:
                    assert row["ratio_ci_low"] == pytest.approx(math.exp(r.mean() - r_half), rel=1e-9)
                    assert row["ratio_ci_high"] == pytest.approx(math.exp(r.mean() + r_half), rel=1e-9)
            else:
                assert row["ratio_n"] == 0 and math.isnan(row["ratio"])
    # the diverged run is counted, not averaged, and carries its reason; collapse is flagged
    emc2_8 = table[(table["sampler"] == "emc2") & (table["batch_size"] == 8)].iloc[0]
    assert (emc2_8["runs"], emc2_8["completed"], emc2_8["diverged"]) == (3, 2, 1)
    assert emc2_8["status"] == "2 completed, 1 diverged" and "non-finite at step 7" in emc2_8["reason"]
    in_batch_8 = table[(table["sampler"] == "in_batch") & (table["batch_size"] == 8)].iloc[0]
    assert in_batch_8["collapsed"] == 1 and in_batch_8["status"] == "completed"
    assert table.loc[(table["sampler"] == "emc2") & (table["batch_size"] == 4), "collapsed"].iloc[0] == 0


def test_mean_ci_edge_cases():
    mean, std, low, high, n = aggregation.mean_ci([2.0])
    assert (mean, n) == (2.0, 1) and math.isnan(std) and math.isnan(low) and math.isnan(high)
    assert aggregation.mean_ci([3.0, 3.0, 3.0])[1:] == (0.0, 3.0, 3.0, 3)
    assert aggregation.mean_ci([])[-1] == 0


def test_headline_sorts_best_first_within_each_batch_size(hand_made):
    runs, finals = hand_made
    table = aggregation.aggregate(results.collect_dirs(sorted(runs.iterdir()), warn=pytest.fail), reference="in_batch")
    for sort, higher_better in (("gcl", False), ("lp_acc", True)):
        headers, rows = report.headline(table, sort, "in_batch")
        assert [r[1] for r in rows] == ["4", "4", "8", "8"]
        column = headers.index(next(h for h in headers if h.endswith("▲")))
        for b in ("4", "8"):
            means = [float(r[column].split(" ± ")[0]) for r in rows if r[1] == b]
            assert means == sorted(means, reverse=higher_better)
    collapsed_row = next(r for r in rows if r[0] == "in_batch" and r[1] == "8")
    assert collapsed_row[-1] == "COLLAPSE 1/3"
    diverged_row = next(r for r in rows if r[0] == "emc2" and r[1] == "8")
    assert diverged_row[3] == "2/3: 1 diverged"


def test_plots_and_csv_round_trip(hand_made, tmp_path):
    runs, _ = hand_made
    records = results.collect_dirs(sorted(runs.iterdir()), warn=pytest.fail)
    folder = tmp_path / "cmp"
    result = report.write_comparison(folder, records, reference="in_batch", sort="grad_norm_sq", title="hand-made",
                                  command="negbench compare ...", console=Console(file=open("/dev/null", "w")))
    assert sorted(result.plots) == sorted(plots.PLOT_FILES)
    for name in plots.PLOT_FILES:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 20_000, name
    back = pd.read_csv(folder / "table.csv", keep_default_na=False, na_values=[""])
    expected = result.table.copy()
    expected["reason"] = expected["reason"].fillna("")
    back["reason"] = back["reason"].fillna("")
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    markdown = (folder / "table.md").read_text()
    assert "| sampler | B | N/B | seeds |" in markdown and "COLLAPSE 1/3" in markdown
    assert "emc2` B=8 seed 2: **diverged**" in markdown and "![grad_norm_sq.png](grad_norm_sq.png)" in markdown
    # a later comparison without accuracies removes the stale accuracy plot
    for r in records:
        for key in ("lp_acc", "knn1_acc", "knn10_acc"):
            r.final.pop(key, None)
    report.write_comparison(folder, records, reference=None, sort="gcl", title="again", command="x",
                         console=Console(file=open("/dev/null", "w")))
    assert not (folder / "accuracy.png").exists() and (folder / "cost.png").exists()


def test_corrupt_run_folders_are_skipped_with_a_warning(hand_made, tmp_path, capsys, no_plots):
    runs, _ = hand_made
    bad_config = make_run(runs, "uniform", 4, 0, random_final(np.random.default_rng(1)))
    (bad_config / "config.json").write_text("{not json")
    truncated = make_run(runs, "uniform", 4, 1, random_final(np.random.default_rng(2)))
    text = (truncated / "metrics.jsonl").read_text()
    (truncated / "metrics.jsonl").write_text(text[: len(text) - 25])
    no_summary = make_run(runs, "uniform", 4, 2, random_final(np.random.default_rng(3)))
    (no_summary / "summary.json").unlink()
    lost_rows = make_run(runs, "uniform", 8, 0, random_final(np.random.default_rng(4)))
    lines = (lost_rows / "metrics.jsonl").read_text().splitlines(keepends=True)
    (lost_rows / "metrics.jsonl").write_text("".join(lines[:-1]))  # whole last row missing

    code, out, err = invoke(capsys, "compare", str(runs / "*"), "--out", str(tmp_path / "runs"), "--name", "cmp")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4
    for folder in (bad_config, truncated, no_summary, lost_rows):
        assert sum(f"skipped {folder}" in w for w in warnings) == 1
    table = pd.read_csv(tmp_path / "cmp" / "table.csv")
    assert "uniform" not in set(table["sampler"])
    assert {"emc2", "in_batch"} == set(table["sampler"])


TINY = [*TINY_SYNTHETIC, "--batch-sizes", "4", "--steps", "4", "--eval-every", "4", "--tv-steps", "2"]


@pytest.fixture()
def no_plots(monkeypatch):
    """Skip drawing (about a second a plot) where a test does not look at the plots."""
    from negbench import plots

    real = plots.make_plots
    monkeypatch.setattr(plots, "make_plots", lambda *args, **kwargs: {})
    return lambda: monkeypatch.setattr(plots, "make_plots", real)


@pytest.fixture()
def count_runs(monkeypatch):
    """Record (sampler, seed, trained) for every call of the runner compare makes."""
    calls: list[tuple[str, int, bool]] = []
    real_run = runner.run

    def counting(config, **kwargs):
        outcome = real_run(config, **kwargs)
        calls.append((config.sampler, config.seed, not outcome.skipped))
        return outcome

    monkeypatch.setattr(runner, "run", counting)
    return calls


def test_tiny_grid_end_to_end_and_resume(tmp_path, capsys, count_runs, no_plots, monkeypatch):
    out = tmp_path / "results" / "runs"
    args = ["compare", *TINY, "--samplers", "uniform,in_batch", "--out", str(out), "--sort", "gcl"]
    # "interrupted halfway": only seed 0 of the grid has run
    code, _, err = invoke(capsys, *args, "--seeds", "0,")
    assert code == 0, err
    assert sorted(count_runs) == [("in_batch", 0, True), ("uniform", 0, True)]
    first = {p.name: (p / "summary.json").stat().st_mtime_ns for p in out.iterdir()}
    count_runs.clear()
    no_plots()  # draw them this time
    code, stdout, err = invoke(capsys, *args, "--seeds", "2")
    assert code == 0, err
    trained = sorted((s, seed) for s, seed, ran in count_runs if ran)
    assert trained == [("in_batch", 1), ("uniform", 1)]
    assert len(count_runs) == 4  # the two finished cells were skipped by the runner
    for name, mtime in first.items():
        assert (out / name / "summary.json").stat().st_mtime_ns == mtime
    assert len(list(out.iterdir())) == 4

    folder = tmp_path / "results" / "synthetic"  # default name: the task, next to the runs folder
    table = pd.read_csv(folder / "table.csv")
    gcl = table[table["metric"] == "gcl"].set_index("sampler")
    assert set(gcl.index) == {"uniform", "in_batch"}
    assert (gcl["n"] == 2).all() and (gcl["status"] == "completed").all()
    assert (gcl["n_over_b"] == 24 / 4).all()
    assert table.loc[(table["sampler"] == "in_batch") & (table["metric"] == "gcl"), "ratio"].iloc[0] == 1.0
    for name in ("grad_norm_sq.png", "gcl.png", "sampling_tv.png", "cost.png", "accuracy.png"):
        assert (folder / name).read_bytes().startswith(PNG_SIGNATURE)
    assert "--seeds 2" in (folder / "table.md").read_text()
    assert "uniform" in stdout and "in_batch" in stdout and "gcl F(θ) ▲" in stdout

    # --collect trains nothing and reads the same runs back
    from negbench import plots

    monkeypatch.setattr(plots, "make_plots", lambda *args, **kwargs: {})
    count_runs.clear()
    code, _, err = invoke(capsys, *args, "--seeds", "3", "--collect", "--name", "collected")
    assert code == 0 and count_runs == []
    collected = pd.read_csv(tmp_path / "results" / "collected" / "table.csv")
    row = collected[(collected["metric"] == "gcl") & (collected["sampler"] == "uniform")].iloc[0]
    assert (row["n"], row["missing"], row["status"]) == (2, 1, "2 completed, 1 missing")


def test_a_failing_cell_is_reported_and_rerun(tmp_path, capsys, count_runs, monkeypatch, no_plots):
    out = tmp_path / "runs"
    args = ["compare", *TINY, "--samplers", "uniform", "--seeds", "2", "--out", str(out), "--name", "f", "--tv-steps", "0"]
    real_step = runner.Trainer.train_step

    def broken(self):
        if self.run.seed == 1:
            raise RuntimeError("boom")
        return real_step(self)

    monkeypatch.setattr(runner.Trainer, "train_step", broken)
    code, _, err = invoke(capsys, *args)
    assert code == 1 and "1 of 2 runs failed (uniform B=4 seed 1)" in " ".join(err.split()), err  # issue 17
    table = pd.read_csv(tmp_path / "f" / "table.csv")
    row = table[table["metric"] == "gcl"].iloc[0]
    assert (row["n"], row["failed"]) == (1, 1) and "RuntimeError: boom" in row["reason"]
    monkeypatch.setattr(runner.Trainer, "train_step", real_step)
    count_runs.clear()
    code, _, err = invoke(capsys, *args)
    assert code == 0, err
    assert sorted(count_runs) == [("uniform", 0, False), ("uniform", 1, True)]
    row = pd.read_csv(tmp_path / "f" / "table.csv").query("metric == 'gcl'").iloc[0]
    assert (row["n"], row["failed"], row["status"]) == (2, 0, "completed")


RANDOM_VIEW_TASK = '''
from negbench.registry import register_task
from negbench.tasks.synthetic import SyntheticTask

@register_task("test_random_views")
class RandomViews(SyntheticTask):
    description = "synthetic, declared as drawing random augmentations (test only)"
    finite_views = False
'''


def test_a_sampler_incompatible_with_the_task_is_a_failed_row(tmp_path, capsys, no_plots):
    plugin = tmp_path / "random_views.py"
    plugin.write_text(RANDOM_VIEW_TASK)
    code, _, err = invoke(capsys, "compare", "--plugin", str(plugin), "--task", "test_random_views",
                          "--samplers", "in_batch,full_softmax", "--batch-sizes", "4", "--seeds", "1", "--collect",
                          "--set", "num_items=24", "--out", str(tmp_path / "runs"), "--sort", "uniformity")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "test_random_views" / "table.csv", keep_default_na=False)
    status = table.drop_duplicates("sampler").set_index("sampler")
    assert status.loc["full_softmax", "status"] == "1 failed"
    assert "needs a finite view set" in status.loc["full_softmax", "reason"]
    assert status.loc["in_batch", "status"] == "1 missing"


# Bad input (every command, one table): tests/test_bad_input.py


def test_parsing_and_set_routing():
    assert grid.parse_seeds("3") == [0, 1, 2]
    assert grid.parse_seeds("0,5") == [0, 5]
    specs = grid.parse_sampler_specs("simclr, emc2:stale=refresh:burn_in=0.25")
    assert [s.label for s in specs] == ["in_batch", "emc2:stale=refresh:burn_in=0.25"]
    assert specs[1].params == (("stale", "refresh"), ("burn_in", "0.25"))
    everything = [s.label for s in grid.parse_sampler_specs("all")]
    assert "emc2" in everything and "emc2:stale=refresh" in everything and "uniform" in everything
    routed = grid.route_set_options(["burn_in=0.3", "num_items=24", "task.dim=8"], ["uniform", "emc2"], "synthetic")
    assert routed["emc2"] == ({"burn_in": "0.3"}, {"num_items": "24", "dim": "8"})
    assert routed["uniform"] == ({}, {"num_items": "24", "dim": "8"})
    with pytest.raises(UserError, match="unknown --set key 'stale'"):
        grid.route_set_options(["stale=refresh"], ["uniform"], "synthetic")


def test_run_grid_takes_any_cells_and_a_per_cell_runner():
    """The grid machinery a rate study or --jobs reuses: each cell goes to the given runner;
    a raising cell is recorded and the rest run, a busy one is left alone, an interrupted
    run stops the grid."""
    from negbench.config import RunConfig

    spec = grid.parse_sampler_spec("uniform")
    cells = [grid.Cell(spec, 4, seed, RunConfig(sampler="uniform", seed=seed)) for seed in range(5)]
    cells[1].error = "cannot run here"  # marked before the grid runs: never handed to the runner
    seen = []

    def fake(cell, console):
        seen.append(cell.seed)
        if cell.seed == 2:
            raise RuntimeError("boom\nsecond line")
        if cell.seed == 3:
            raise runner.RunFolderBusy("held")
        return grid.CellOutcome(skipped=cell.seed == 0, interrupted=False)

    console = Console(file=open("/dev/null", "w"))
    assert grid.run_grid(cells, console, run_one=fake, title="rate")
    assert seen == [0, 2, 3, 4]
    assert [c.ran for c in cells] == [False, False, False, False, True]
    assert cells[2].error == "RuntimeError: boom second line" and cells[3].busy and cells[3].error is None
    assert cells[1].error == "cannot run here" and cells[2].name == "uniform B=4 seed 2"

    stop = [grid.Cell(spec, 4, seed, RunConfig(sampler="uniform", seed=seed)) for seed in range(3)]
    seen.clear()
    interrupted = lambda cell, console: (seen.append(cell.seed), grid.CellOutcome(False, cell.seed == 1))[1]  # noqa: E731
    assert not grid.run_grid(stop, console, run_one=interrupted)
    assert seen == [0, 1]
