"""Statistics of a comparison (docs/design.md §6), over the seeds whose run completed, per
task × sampler × batch size × metric:

    mean  m = 1/n Σ_s x_s,   std  s = sqrt(1/(n-1) Σ_s (x_s - m)²),
    95% CI  m ± t_{0.975, n-1} · s/√n          (scipy.stats.t; undefined for n = 1)

of each metric's final value (``summary.json``'s ``final``, plus ``grad_norm_sq_avg`` and
``grad_norm_sq_min``). Paired ratios against a reference sampler at the same batch size, on
the seeds both completed: the geometric mean of the per-seed ratios r_s = x_s / x_s^ref,

    ratio = exp(mean_s log r_s),  CI = exp(t-interval of log r_s),

defined for metrics whose two values are positive. Diverged, failed and interrupted runs are
not averaged in; they are counted and listed with their reason. A run whose final
``uniformity`` exceeds :data:`COLLAPSE_UNIFORMITY` is counted as collapsed (docs/design.md §4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from negbench.metric_registry import metric_order
from negbench.results import RunRecord

CONFIDENCE = 0.95
#: uniformity = log mean exp(-2‖e - e'‖²) ∈ [-4, 0]; 0 means every embedding is the same point.
#: Above -0.5 the mean Gaussian-kernel similarity exceeds e^-0.5 ≈ 0.61, i.e. a typical pair of
#: different items sits at ‖e - e'‖² ≲ 0.25 (cosine ≳ 0.88): the embeddings have collapsed.
COLLAPSE_UNIFORMITY = -0.5
#: run statuses that are not averaged, in the order they are reported
NOT_COUNTED = ("diverged", "failed", "interrupted", "unreadable", "missing")


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float, int]:
    """(mean, std with ddof 1, CI low, CI high, n): the Student-t interval
    m ± t_{(1+c)/2, n-1} · s/√n. With n = 1 the std and interval are NaN; with s = 0 the
    interval is the mean itself."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan, 1
    std = float(x.std(ddof=1))
    sem = std / math.sqrt(n)
    if sem == 0:
        return mean, std, mean, mean, n
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return mean, std, float(low), float(high), n


CELL_KEYS = ["task", "sampler", "batch_size"]


def _cells_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per cell: N/B, run counts by status, the status line, reasons, collapse count."""
    rows = []
    for key, group in _grouped(records).items():
        task, label, batch_size = key
        counts = {s: sum(r.status == s for r in group) for s in ("completed", *NOT_COUNTED)}
        parts = [f"{counts[s]} {s}" for s in ("completed", *NOT_COUNTED) if counts[s]]
        status = "completed" if counts["completed"] == len(group) else ", ".join(parts)
        reasons = sorted({f"seed {r.seed}: {r.status}: {r.reason}" if r.reason else f"seed {r.seed}: {r.status}"
                          for r in group if r.status != "completed"}, key=str)
        collapsed = sum(r.status == "completed" and r.final.get("uniformity", -math.inf) > COLLAPSE_UNIFORMITY
                        for r in group)
        n_over_b = next((r.n_over_b for r in group if r.n_over_b is not None), None)
        rows.append({"task": task, "sampler": label, "batch_size": batch_size,
                     "n_over_b": math.nan if n_over_b is None else float(n_over_b),
                     "runs": len(group), **counts, "status": status, "reason": "; ".join(reasons),
                     "collapsed": collapsed})
    return pd.DataFrame(rows)


def _grouped(records: Sequence[RunRecord]) -> dict[tuple[str, str, int], list[RunRecord]]:
    groups: dict[tuple[str, str, int], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.task, r.label, r.batch_size), []).append(r)
    return groups


def metric_names(records: Sequence[RunRecord]) -> list[str]:
    """The metrics some record has, in the registry's table order (undeclared keys last, sorted)."""
    present = {k for r in records for k in r.final}
    order = metric_order()
    return [m for m in order if m in present] + sorted(present - set(order))

def final_values(records: Sequence[RunRecord]) -> pd.DataFrame:
    """Long frame of the completed runs' final values: task, sampler, batch_size, seed, metric, value."""
    rows = [{"task": r.task, "sampler": r.label, "batch_size": r.batch_size, "seed": r.seed, "metric": m, "value": v}
            for r in records if r.status == "completed" for m, v in r.final.items()]
    return pd.DataFrame(rows, columns=[*CELL_KEYS, "seed", "metric", "value"])


def aggregate(records: Sequence[RunRecord], reference: str | None) -> pd.DataFrame:
    """The tidy table: one row per cell × metric with mean, std, ci_low, ci_high, n over the
    completed seeds; the paired ratio to ``reference`` (ratio, ratio_ci_low, ratio_ci_high,
    ratio_n); and the cell's N/B, run counts, status, reasons and collapse count."""
    cells = _cells_frame(records)
    # every cell gets a row for every metric (n = 0 where it has no value); when no run has
    # any value, a cell keeps one row with an empty metric name so that it is still listed
    metrics = metric_names(records) or [""]
    values = final_values(records)
    grid = cells[CELL_KEYS].merge(pd.DataFrame({"metric": pd.Series(metrics, dtype=object)}), how="cross")
    if not values.empty:
        summary = (values.groupby([*CELL_KEYS, "metric"], sort=False)["value"]
                   .apply(lambda v: pd.Series(mean_ci(v.to_numpy()), index=["mean", "std", "ci_low", "ci_high", "n"]))
                   .unstack())
        table = grid.merge(summary.reset_index(), on=[*CELL_KEYS, "metric"], how="left")
    else:
        table = grid
    for column in ("mean", "std", "ci_low", "ci_high", "n"):
        if column not in table:
            table[column] = math.nan
    table["n"] = table["n"].fillna(0).astype(int)
    table = table.merge(paired_ratios(values, reference), on=[*CELL_KEYS, "metric"], how="left")
    table["ratio_n"] = table["ratio_n"].fillna(0).astype(int)
    table["reference"] = reference or ""
    table = table.merge(cells, on=CELL_KEYS, how="left")
    order = [*CELL_KEYS, "n_over_b", "metric", "mean", "std", "ci_low", "ci_high", "n", "ratio", "ratio_ci_low",
             "ratio_ci_high", "ratio_n", "reference", "runs", "completed", *NOT_COUNTED, "status", "collapsed", "reason"]
    return table[order]


def paired_ratios(values: pd.DataFrame, reference: str | None) -> pd.DataFrame:
    """Geometric mean and t-interval (on the log scale) of x_s / x_s^ref over the seeds both
    the cell and the reference cell (same task and batch size) completed, where both > 0."""
    columns = [*CELL_KEYS, "metric", "ratio", "ratio_ci_low", "ratio_ci_high", "ratio_n"]
    empty = pd.DataFrame({"task": pd.Series(dtype=object), "sampler": pd.Series(dtype=object),
                          "batch_size": pd.Series(dtype="int64"), "metric": pd.Series(dtype=object),
                          **{c: pd.Series(dtype=float) for c in columns[4:]}})
    if reference is None or values.empty:
        return empty
    ref = values[values["sampler"] == reference].drop(columns="sampler")
    paired = values.merge(ref, on=["task", "batch_size", "seed", "metric"], suffixes=("", "_ref"))
    paired = paired[(paired["value"] > 0) & (paired["value_ref"] > 0)]
    if paired.empty:
        return empty
    paired = paired.assign(log_ratio=np.log(paired["value"] / paired["value_ref"]))

    def summarise(logs: pd.Series) -> pd.Series:
        mean, _, low, high, n = mean_ci(logs.to_numpy())
        return pd.Series({"ratio": math.exp(mean), "ratio_ci_low": math.exp(low), "ratio_ci_high": math.exp(high),
                          "ratio_n": n})

    out = paired.groupby([*CELL_KEYS, "metric"], sort=False)["log_ratio"].apply(summarise).unstack().reset_index()
    return out[columns]


def curves(records: Sequence[RunRecord]) -> pd.DataFrame:
    """Per-evaluation rows of the completed and diverged runs (long enough to plot), with the
    cell keys and the seed."""
    rows = [{"task": r.task, "sampler": r.label, "batch_size": r.batch_size, "seed": r.seed, **row}
            for r in records if r.status in ("completed", "diverged") for row in r.rows if "step" in row]
    return pd.DataFrame(rows)
