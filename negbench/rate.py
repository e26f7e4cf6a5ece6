"""``negbench rate``: does a sampler reach stationarity, and how fast (issue 11)?

A grid of ordinary runs — samplers × batch sizes B × horizons T × seeds — built, run, resumed
and skipped by the grid machinery of ``compare`` (:mod:`negbench.grid`). Every run is plain SGD with the
theorem's step size η_T = c/√T (``--lr-scale c``; ``--step-size constant``: η = c for every
T), ``--evals E`` evenly spaced evaluations (every ⌊T/E⌋ steps) and, by default, the warm
start ``--init stationary`` (:mod:`negbench.warmstart`). Per run:

    gap_avg(T) = 1/E Σ_{k<E} ‖∇F(θ_{k·T/E})‖²       (``grad_norm_sq_run_avg``: the evaluations
                                                     at t < T, a Riemann sum of 1/T Σ_{t<T} ‖∇F(θ_t)‖²,
                                                     the quantity the convergence theorems bound)

plus its minimum over the evaluations, the final F, and (``--grad-split R``) the means over
the run's evaluations of ``grad_bias_sq`` and ``grad_var`` (:mod:`negbench.gradsplit`).

Aggregation per (sampler, B, T) over the completed seeds: mean and 95% Student-t interval
(scipy.stats, :func:`negbench.stats.mean_ci`). Per (sampler, B) the rate: ordinary least
squares of log gap_avg on log T over the per-seed points (scipy.stats.linregress; n = seeds ×
horizons points),

    log gap_avg = a + s · log T,    95% CI  s ± t_{0.975, n-2} · SE(s),

and a verdict: ``falls`` when the whole interval lies below -0.25 (the theorem's O(1/√T)
is s = -1/2), ``plateau`` when it contains 0, ``unclear`` otherwise (too few points,
between the two, or rising).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy import stats

from negbench import grid as grids
from negbench import report as reports
from negbench.grid import Grid, SamplerSpec
from negbench.results import RunRecord, Warn, one_line
from negbench.stats import CONFIDENCE, mean_ci
from negbench.config import RunConfig
from negbench.errors import UserError
from negbench.registry import TASKS
from negbench.results import atomic_write_bytes

#: the committed study's samplers (issue 11)
DEFAULT_SAMPLERS = "in_batch,emc2,emc2:stale=refresh,sogclr,importance,full_softmax"
STEP_SIZES = ("sqrt", "constant")
#: a slope whose whole interval lies below this "falls"
FALLS_BELOW = -0.25
#: per-run quantities of the rate table, in order
QUANTITIES = ("grad_norm_sq_run_avg", "grad_norm_sq_min", "gcl", "grad_bias_sq", "grad_var")
FILES = ("points.csv", "cells.csv", "slopes.csv", "table.md")


# ---- options ---------------------------------------------------------------------------------

def parse_horizons(text: str) -> list[int]:
    """``400,1600,6400`` → increasing positive horizons, at least two (a slope needs two)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--horizons expects integers separated by commas, got {text!r}; e.g. --horizons 400,1600,6400") from None
    if len(values) < 2:
        raise UserError(f"--horizons needs at least two horizons to fit a slope, got {text!r}; e.g. --horizons 400,1600")
    if any(v <= 0 for v in values):
        raise UserError(f"--horizons must be positive step counts, got {min(values)}; e.g. --horizons 400,1600")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UserError(f"--horizons must be strictly increasing, got {text!r}; e.g. --horizons 400,1600,6400")
    return values


@dataclass(frozen=True)
class Schedule:
    """Step size and evaluation schedule of every run of the study."""

    lr_scale: float = 10.0
    step_size: str = "sqrt"
    evals: int = 16

    def check(self, horizons: Sequence[int]) -> None:
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0):
            raise UserError(f"--lr-scale must be a finite number > 0, got {self.lr_scale}; e.g. --lr-scale 10")
        if self.step_size not in STEP_SIZES:
            raise UserError(f"--step-size must be one of {', '.join(STEP_SIZES)}, got {self.step_size!r}")
        if self.evals < 2:
            raise UserError(f"--evals must be at least 2 (an average needs two evaluations), got {self.evals}; e.g. --evals 16")
        if self.evals > min(horizons):
            raise UserError(f"--evals {self.evals} is more than the smallest horizon ({min(horizons)} steps); "
                            f"use at most --evals {min(horizons)}")

    def lr(self, horizon: int) -> float:
        """η_T = c/√T, or c."""
        return self.lr_scale / math.sqrt(horizon) if self.step_size == "sqrt" else self.lr_scale

    def eval_every(self, horizon: int) -> int:
        return horizon // self.evals


def check_task(task: str) -> None:
    cls = TASKS.get_class(task)
    if not cls.finite_views:
        raise UserError(f"negbench rate needs the exact gradient, which task {task!r} (random augmentations) does "
                        "not have; use a finite-view task (synthetic, digits, stl10_subset)")


def build(base: RunConfig, specs: list[SamplerSpec], batch_sizes: list[int], horizons: list[int],
          seeds: list[int], schedule: Schedule, set_pairs: Sequence[str] = ()) -> Grid:
    """Every cell of the study, each validated by :func:`negbench.grid.build_grid` (nothing
    written): one compare grid per horizon, T steps of SGD at η_T, E evaluations."""
    schedule.check(horizons)
    check_task(base.task)
    cells = []
    for horizon in horizons:
        config = replace(base, steps=horizon, epochs=None, optimizer="sgd", lr=schedule.lr(horizon),
                         eval_every=schedule.eval_every(horizon))
        cells += grids.build_grid(config, specs, batch_sizes, seeds, set_pairs).cells
    return Grid(base.task, specs, batch_sizes, seeds, cells)


# ---- reading back ----------------------------------------------------------------------------

def collect(grid: Grid, warn: Warn) -> list[RunRecord]:
    """:func:`negbench.grid.collect_grid`, with the horizon of each cell kept on records that
    have no run folder to read it from (missing, failed)."""
    records = grids.collect_grid(grid, warn)
    for cell, record in zip(grid.cells, records):
        if "steps" not in record.config:
            record.config = {**record.config, "steps": cell.config.steps}
    return records


def _run_mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(np.mean(values)) if values else math.nan


def points(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per completed run: sampler, B, T, seed and the per-run quantities."""
    rows = []
    for r in records:
        if r.status != "completed":
            continue
        init = r.config.get("init_result") or {}
        rows.append({
            "task": r.task, "sampler": r.label, "batch_size": r.batch_size, "horizon": int(r.config["steps"]),
            "seed": r.seed, "lr": r.config.get("lr"), "n_over_b": r.n_over_b,
            "grad_norm_sq_run_avg": r.final.get("grad_norm_sq_run_avg", math.nan),
            "grad_norm_sq_min": r.final.get("grad_norm_sq_min", math.nan),
            "gcl": r.final.get("gcl", math.nan), "uniformity": r.final.get("uniformity", math.nan),
            "grad_bias_sq": _run_mean(r.rows, "grad_bias_sq"), "grad_var": _run_mean(r.rows, "grad_var"),
            "init_stopped_by": init.get("stopped_by"), "init_grad_norm_sq": init.get("grad_norm_sq"),
        })
    return pd.DataFrame(rows)


def cells_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (sampler, B, T): mean, CI and n of each quantity over the seeds."""
    out = []
    for (task, sampler, b, t), group in frame.groupby(["task", "sampler", "batch_size", "horizon"], sort=False):
        row: dict[str, Any] = {"task": task, "sampler": sampler, "batch_size": b, "horizon": t}
        for q in QUANTITIES:
            mean, _, low, high, n = mean_ci(group[q].dropna().to_numpy())
            row.update({q: mean, f"{q}_ci_low": low, f"{q}_ci_high": high, f"{q}_n": n})
        out.append(row)
    return pd.DataFrame(out)


def slope(horizons: Sequence[float], gaps: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """OLS slope of log gap on log T over per-seed points (scipy.stats.linregress), with its
    t-interval on n - 2 degrees of freedom, and the verdict of the module docstring."""
    x, y = np.log(np.asarray(horizons, float)), np.log(np.asarray(gaps, float))
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 3 or np.unique(x).size < 2:
        value = float(stats.linregress(x, y).slope) if n >= 2 and np.unique(x).size >= 2 else math.nan
        return {"slope": value, "slope_ci_low": math.nan, "slope_ci_high": math.nan, "points": n, "verdict": "unclear"}
    fit = stats.linregress(x, y)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 2)) * float(fit.stderr)
    low, high = float(fit.slope) - half, float(fit.slope) + half
    verdict = "falls" if high < FALLS_BELOW else ("plateau" if low <= 0 <= high else "unclear")
    return {"slope": float(fit.slope), "slope_ci_low": low, "slope_ci_high": high, "points": n, "verdict": verdict}


def slopes_table(frame: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (task, sampler, b), group in frame.groupby(["task", "sampler", "batch_size"], sort=False):
        out.append({"task": task, "sampler": sampler, "batch_size": b, "n_over_b": group["n_over_b"].iloc[0],
                    **slope(group["horizon"], group["grad_norm_sq_run_avg"])})
    return pd.DataFrame(out)


# ---- presentation ----------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 3) -> str:
    return reports._fmt(float(value), digits) if value is not None and not pd.isna(value) else "–"


def _pm(row: pd.Series, q: str) -> str:
    mean, high, n = row[q], row[f"{q}_ci_high"], row[f"{q}_n"]
    if not n:
        return "–"
    return _fmt(mean) + (f" ± {_fmt(high - mean, 2)}" if n > 1 and math.isfinite(high) else "")


def _slope_text(row: pd.Series) -> str:
    if not math.isfinite(row["slope_ci_low"]):
        return _fmt(row["slope"])
    return f"{row['slope']:+.2f} [{row['slope_ci_low']:+.2f}, {row['slope_ci_high']:+.2f}]"


def slope_rows(slopes: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    headers = ["sampler", "B", "N/B", "points", "slope [95% CI]", "verdict"]
    rows = [[r["sampler"], str(r["batch_size"]), _fmt(r["n_over_b"]), str(r["points"]), _slope_text(r), r["verdict"]]
            for _, r in slopes.sort_values(["batch_size", "slope"], kind="stable").iterrows()]
    return headers, rows


def cell_rows(cells: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    present = [q for q in QUANTITIES if cells[f"{q}_n"].sum() > 0]
    names = {"grad_norm_sq_run_avg": "‖∇F‖² run avg", "grad_norm_sq_min": "‖∇F‖² min", "gcl": "F(θ_T)",
             "grad_bias_sq": "grad bias²", "grad_var": "grad var"}
    headers = ["sampler", "B", "T", "seeds", *(names[q] for q in present)]
    rows = [[r["sampler"], str(r["batch_size"]), str(r["horizon"]), str(r["grad_norm_sq_run_avg_n"]),
             *(_pm(r, q) for q in present)]
            for _, r in cells.sort_values(["batch_size", "sampler", "horizon"], kind="stable").iterrows()]
    return headers, rows


def rate_figure(frame: pd.DataFrame, batch_size: int, title: str) -> bytes:
    """Run-average gap against T on log–log axes for one batch size: per sampler the geometric
    mean over seeds, with the 95% t-interval of the mean log gap as a band; a dotted guide of
    slope -1/2 (the theorem's rate)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    from negbench.plots import DPI, _colours

    data = frame[frame["batch_size"] == batch_size]
    labels = list(dict.fromkeys(data["sampler"]))
    colours = _colours(labels)
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for label in labels:
        rows = []
        for t, group in data[data["sampler"] == label].groupby("horizon"):
            mean, _, low, high, n = mean_ci(np.log(group["grad_norm_sq_run_avg"].to_numpy()))
            rows.append((t, math.exp(mean), math.exp(low) if n > 1 else math.nan, math.exp(high) if n > 1 else math.nan))
        t, mid, low, high = map(np.asarray, zip(*rows))
        ax.plot(t, mid, marker="o", color=colours[label], label=label, lw=2)
        ax.fill_between(t, low, high, color=colours[label], alpha=0.15, lw=0)
    horizons = np.sort(data["horizon"].unique())
    if horizons.size:
        anchor = float(np.exp(np.log(data["grad_norm_sq_run_avg"]).mean()))
        centre = float(np.exp(np.log(horizons).mean()))
        guide = anchor * (horizons / centre) ** -0.5
        ax.plot(horizons, guide, ls=":", color="grey", label="slope −½")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(horizons, [str(int(h)) for h in horizons])
    ax.set_xlabel("horizon T (SGD steps)")
    ax.set_ylabel("run-average ‖∇F(θ_t)‖²")
    n_over_b = data["n_over_b"].iloc[0] if len(data) else math.nan
    ax.set_title(f"{title} · B = {batch_size} (N/B = {_fmt(n_over_b)})")
    ax.legend(fontsize=8, frameon=False)
    fig.text(0.01, 0.005, "line: geometric mean over seeds · band: 95% t-interval of the mean log gap", fontsize=7)
    FigureCanvasAgg(fig)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    return reports.markdown_table(headers, rows)


def report(slopes: pd.DataFrame, cells: pd.DataFrame, records: Sequence[RunRecord], frame: pd.DataFrame, *,
           title: str, command: str, plots: Sequence[str]) -> str:
    init = frame["init_stopped_by"].dropna()
    init_line = ("warm start (`--init stationary`), stopped by " + ", ".join(f"{k} in {v} runs" for k, v in init.value_counts().items())
                 if len(init) else "cold start (`--init random`)")
    config = next((r.config for r in records if r.status == "completed"), {})
    versions = config.get("versions", {})
    lrs = frame.groupby("horizon")["lr"].first()
    settings = (f"task `{config.get('task')}` (N = {config.get('num_items')}), SGD (momentum {config.get('momentum')}) at "
                + ", ".join(f"η = {_fmt(lr)} for T = {t}" for t, lr in lrs.items())
                + f", β = {config.get('beta')}, device {config.get('device')} ({versions.get('device_name', '?')}), "
                f"negbench {versions.get('negbench')}, torch {versions.get('torch')}"
                + (f", commit {versions['git_commit'][:10]}" if versions.get("git_commit") else ""))
    lines = [f"# {title}", "", "Regenerate (finished runs are skipped):", "", "```bash", command, "```", "",
             settings + f"; {init_line}.", "", "## Rate of the run-average stationarity gap", "",
             _markdown(*slope_rows(slopes)), "",
             "Slope of log(run-average ‖∇F‖²) against log T by least squares over the per-seed points "
             "(scipy.stats.linregress), 95% interval from the t distribution with points − 2 degrees of freedom. "
             f"`falls`: the interval lies below {FALLS_BELOW}; `plateau`: it contains 0; `unclear`: otherwise. "
             "The theorem's O(1/√T) is slope −0.5.", "", "## Per horizon", "", _markdown(*cell_rows(cells)), "",
             f"Mean ± half-width of the {CONFIDENCE:.0%} Student-t interval over seeds. Run avg: the mean of the "
             "exact gap over the evaluations at t < T; min: over all evaluations; grad bias² / var: the means over "
             "the run's evaluations of `grad_bias_sq` and `grad_var` (`--grad-split`)."]
    problems = [r for r in records if r.status not in ("completed", "missing")]
    missing = [r for r in records if r.status == "missing"]
    if problems or missing:
        lines += ["", "## Runs not counted", ""]
        lines += [f"- `{r.label}` B={r.batch_size} T={r.config.get('steps', '?')} seed {r.seed}: **{r.status}**"
                  + (f" — {one_line(r.reason)}" if r.reason else "") for r in problems]
        counts: dict[str, int] = {}
        for r in missing:
            key = f"`{r.label}` B={r.batch_size} T={r.config.get('steps', '?')}"
            counts[key] = counts.get(key, 0) + 1
        lines += [f"- {key}: {n} run(s) **not run** (missing)" for key, n in counts.items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write(folder: Path, records: list[RunRecord], *, title: str, command: str, console: Console) -> pd.DataFrame:
    """Aggregate and write points.csv, cells.csv, slopes.csv, table.md and a plot per batch
    size into ``folder`` (each atomically); print the slope table. Returns the slopes."""
    frame = points(records)
    if frame.empty:
        raise UserError("no run of the study has completed yet; run it without --collect first")
    cells, slopes = cells_table(frame), slopes_table(frame)
    images = {f"rate_b{b}.png": rate_figure(frame, int(b), title) for b in sorted(frame["batch_size"].unique())}
    text = report(slopes, cells, records, frame, title=title, command=command, plots=list(images))
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in (("points.csv", frame), ("cells.csv", cells), ("slopes.csv", slopes)):
        atomic_write_bytes(folder / name, table.to_csv(index=False).encode())
    atomic_write_bytes(folder / "table.md", text.encode())
    for name, data in images.items():
        atomic_write_bytes(folder / name, data)
    for stale in folder.glob("rate_b*.png"):
        if stale.name not in images:
            stale.unlink()
    if not console.is_terminal:
        console.width = max(console.width, 160)
    headers, rows = slope_rows(slopes)
    table = Table(title=f"{title}: slope of log(run-average ‖∇F‖²) on log T", caption=f"every figure in {folder}/table.md")
    for header in headers:
        table.add_column(header, justify="left" if header in ("sampler", "verdict") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return slopes
