"""The PNG plots of a comparison (docs/design.md §6), drawn with matplotlib's object API on the Agg
canvas (no pyplot, no global backend switch), returned as PNG bytes for atomic writing.

- ``grad_norm_sq.png``: the stationarity gap ‖∇F(θ)‖² (log scale) against the step, a line per
  sampler (mean over seeds) with a band (min–max over seeds), a panel per batch size;
- ``gcl.png``: the exact GCL F(θ) against the step, likewise;
- ``sampling_tv.png``: final sampling TV against the batch size (mean, 95% CI), with the
  i.i.d. noise floor;
- ``cost.png``: throughput, time inside the sampler and peak memory per sampler and batch size;
- ``accuracy.png``: linear-probe and k-NN test accuracy (labelled tasks).
"""

from __future__ import annotations

import math
import warnings
from io import BytesIO
from typing import Sequence

import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from negbench.metric_registry import metric as declared_metric

DPI = 130
BAND_NOTE = "line: mean over seeds · band: min–max over seeds"
BAR_NOTE = "bar: mean over seeds · whisker: 95% CI"
#: the plot files of a comparison folder (stale ones are removed when a plot has no data)
PLOT_FILES = ("grad_norm_sq.png", "gcl.png", "sampling_tv.png", "cost.png", "accuracy.png")


def _ylabel(metric: str) -> str:
    """The registry's axis label of ``metric``."""
    return declared_metric(metric).plot_label or metric


def _axis(metric: str, suffix: str = "") -> str:
    """The registry's axis label of ``metric`` (with ``suffix``) and its better direction."""
    return f"{_ylabel(metric)}{suffix} {declared_metric(metric).arrow}"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _colours(labels: Sequence[str]) -> dict[str, tuple[float, ...]]:
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _panels(frame: pd.DataFrame) -> list[tuple[str, int]]:
    return sorted({(t, int(b)) for t, b in zip(frame["task"], frame["batch_size"])}, key=lambda k: (k[0], k[1]))


def _panel_title(task: str, batch_size: int, n_over_b: dict[tuple[str, int], float], multi_task: bool) -> str:
    ratio = n_over_b.get((task, batch_size), math.nan)
    text = f"B = {batch_size}" + (f"  (N/B = {ratio:.3g})" if math.isfinite(ratio) else "")
    return f"{task}: {text}" if multi_task else text


def _legend(fig: Figure, labels: Sequence[str], colours: dict[str, tuple[float, ...]], extra: Sequence = ()) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[label], lw=2.5, label=label) for label in labels] + list(extra)
    fig.legend(handles=handles, loc="outside center right", title="sampler", frameon=False)


def curve_figure(curves: pd.DataFrame, metric: str, ylabel: str, *, log: bool, title: str, labels: Sequence[str],
                 colours: dict[str, tuple[float, ...]], n_over_b: dict[tuple[str, int], float]) -> bytes | None:
    """``metric`` against the step: a line per sampler (mean over seeds at each evaluation
    step) and a band from the smallest to the largest seed; one panel per batch size."""
    if metric not in curves:
        return None
    data = curves.dropna(subset=[metric])
    if log:
        data = data[data[metric] > 0]
    if data.empty:
        return None
    panels = _panels(data)
    multi_task = len({t for t, _ in panels}) > 1
    fig = Figure(figsize=(1.8 + 4.4 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    shown = []
    for ax, (task, batch_size) in zip(axes, panels):
        panel = data[(data["task"] == task) & (data["batch_size"] == batch_size)]
        for label in labels:
            runs = panel[panel["sampler"] == label]
            if runs.empty:
                continue
            by_step = runs.groupby("step")[metric]
            mean, low, high = by_step.mean(), by_step.min(), by_step.max()
            ax.plot(mean.index, mean.to_numpy(), color=colours[label], lw=1.8, marker="o", ms=2.5)
            if runs["seed"].nunique() > 1:
                ax.fill_between(low.index, low.to_numpy(), high.to_numpy(), color=colours[label], alpha=0.18, lw=0)
            shown.append(label)
        if log:
            ax.set_yscale("log")
        ax.set_title(_panel_title(task, batch_size, n_over_b, multi_task))
        ax.set_xlabel("training step")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(f"{title}\n{BAND_NOTE}", fontsize=10)
    _legend(fig, [label for label in labels if label in shown], colours)
    return _png(fig)


def _means(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = table[(table["metric"] == metric) & (table["n"] > 0)]
    return rows.assign(half=(rows["ci_high"] - rows["mean"]).fillna(0.0))


def tv_figure(table: pd.DataFrame, *, title: str, labels: Sequence[str], colours: dict[str, tuple[float, ...]]) -> bytes | None:
    """Final ``sampling_tv`` against the batch size (mean and 95% CI per sampler, slightly
    offset so that whiskers do not overlap), with the i.i.d. floor ``sampling_tv_floor``
    (mean over the samplers at each batch size) dashed."""
    tv = _means(table, "sampling_tv")
    if tv.empty:
        return None
    floor = _means(table, "sampling_tv_floor").groupby(["task", "batch_size"])["mean"].mean()
    tasks = sorted(tv["task"].unique())
    fig = Figure(figsize=(1.8 + 5.0 * len(tasks), 4.2), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    from matplotlib.lines import Line2D

    for ax, task in zip(axes, tasks):
        sizes = sorted(table.loc[table["task"] == task, "batch_size"].unique())
        present = [label for label in labels if label in set(tv.loc[tv["task"] == task, "sampler"])]
        for i, label in enumerate(present):
            rows = tv[(tv["task"] == task) & (tv["sampler"] == label)].sort_values("batch_size")
            offset = 2 ** (0.06 * (i - (len(present) - 1) / 2))
            ax.errorbar(rows["batch_size"] * offset, rows["mean"], yerr=rows["half"], color=colours[label],
                        marker="o", ms=5, lw=1.5, capsize=3)
        if task in floor.index.get_level_values(0):
            line = floor.loc[task].sort_index()
            ax.plot(line.index, line.to_numpy(), color="black", ls="--", marker="x", lw=1.2)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(s) for s in sizes])
        if len(sizes) == 1:
            ax.set_xlim(sizes[0] / 1.5, sizes[0] * 1.5)
        ax.set_ylim(0, min(ax.get_ylim()[1], 1.02))  # a total variation is at most 1
        ax.set_xlabel("batch size B (items per step)")
        ax.set_ylabel("sampling TV to the exact softmax (final)")
        ax.set_title(task if len(tasks) > 1 else "lower is better; read against the floor")
        ax.grid(True, alpha=0.3)
    floor_handle = Line2D([], [], color="black", ls="--", marker="x", label="i.i.d. floor")
    fig.suptitle(f"{title}\nsampling TV: mean over seeds · whisker: 95% CI", fontsize=10)
    _legend(fig, [label for label in labels if label in set(tv["sampler"])], colours, [floor_handle])
    return _png(fig)


def bar_figure(table: pd.DataFrame, panels: Sequence[tuple[str, str, float]], *, title: str, labels: Sequence[str],
               colours: dict[str, tuple[float, ...]], n_over_b: dict[tuple[str, int], float],
               ylim: tuple[float, float] | None = None) -> bytes | None:
    """Grouped bars, a panel per (metric, axis label, divisor): a group per batch size, a bar
    per sampler (mean over seeds, whisker: 95% CI); 'n/a' where a cell has no value."""
    panels = [p for p in panels if not _means(table, p[0]).empty]
    if not panels:
        return None
    groups = _panels(table)
    multi_task = len({t for t, _ in groups}) > 1
    width = 0.8 / max(1, len(labels))
    panel_width = max(3.6, 0.32 * len(labels) * len(groups) + 1.4)
    fig = Figure(figsize=(1.8 + panel_width * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, axis_label, divisor) in zip(axes, panels):
        rows = _means(table, metric).set_index(["task", "batch_size", "sampler"])
        tops: list[tuple[float, float]] = []
        for g, (task, batch_size) in enumerate(groups):
            for i, label in enumerate(labels):
                x = g + (i - (len(labels) - 1) / 2) * width
                key = (task, batch_size, label)
                if key in rows.index:
                    row = rows.loc[key]
                    mean, half = row["mean"] / divisor, row["half"] / divisor
                    # the whisker stops at 0: these quantities are non-negative
                    ax.bar(x, mean, width * 0.92, color=colours[label], yerr=[[min(half, max(mean, 0.0))], [half]],
                           capsize=2, error_kw={"lw": 1})
                    tops.append((mean, mean + half))
                else:
                    ax.text(x, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="0.4")
        if ylim:
            ax.set_ylim(*ylim)
        elif tops:
            # whiskers of 2-3 seeds can be huge (t_{0.975,1} = 12.7): let them run off the top
            # rather than squash the bars
            highest_mean = max(m for m, _ in tops)
            top = min(max(t for _, t in tops), 2.5 * highest_mean) if highest_mean > 0 else None
            ax.set_ylim(0, top * 1.08 if top else None)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([_panel_title(t, b, n_over_b, multi_task).replace("  (", "\n(") for t, b in groups])
        ax.set_ylabel(axis_label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{title}\n{BAR_NOTE}", fontsize=10)
    _legend(fig, labels, colours)
    return _png(fig)


def make_plots(table: pd.DataFrame, curves: pd.DataFrame, *, title: str, device: str | None = None) -> dict[str, bytes]:
    """Every plot the data supports, by file name (in :data:`PLOT_FILES`).
    Characters the installed fonts lack (a CJK ``--name``) are drawn as boxes with one warning,
    not matplotlib's one per glyph and figure."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figures = _figures(table, curves, title=title, device=device)
    missing = [w for w in caught if "missing from font" in str(w.message)]
    for w in caught:
        if w not in missing:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing:
        warnings.warn(f"the plot titles use {len({str(w.message).split(' (')[0] for w in missing})} characters the "
                      "installed fonts lack; they are drawn as boxes", UserWarning, stacklevel=2)
    return figures


def _figures(table: pd.DataFrame, curves: pd.DataFrame, *, title: str, device: str | None) -> dict[str, bytes]:
    labels = list(dict.fromkeys(table["sampler"]))
    colours = _colours(labels)
    cells = table.drop_duplicates(["task", "batch_size"])
    n_over_b = {(t, int(b)): float(r) for t, b, r in zip(cells["task"], cells["batch_size"], cells["n_over_b"])}
    common = {"labels": labels, "colours": colours}
    memory = ", process RSS" if device == "cpu" else ", CUDA allocated" if device == "cuda" else ""
    figures = {
        "grad_norm_sq.png": curve_figure(curves, "grad_norm_sq", _ylabel("grad_norm_sq"), log=True,
                                         title=f"{title}: stationarity gap (lower is better)", n_over_b=n_over_b, **common),
        "gcl.png": curve_figure(curves, "gcl", _ylabel("gcl"), log=False,
                                title=f"{title}: global contrastive loss", n_over_b=n_over_b, **common),
        "sampling_tv.png": tv_figure(table, title=f"{title}: sampling bias", **common),
        "cost.png": bar_figure(table, [("samples_per_s", _axis("samples_per_s"), 1.0),
                                       ("sampler_ms", _axis("sampler_ms"), 1.0),
                                       ("peak_mem_bytes", _axis("peak_mem_bytes", memory), declared_metric("peak_mem_bytes").scale)],
                               title=f"{title}: cost", n_over_b=n_over_b, **common),
        "accuracy.png": bar_figure(table, [(m, _axis(m), 1.0) for m in ("lp_acc", "knn1_acc", "knn10_acc")],
                                   title=f"{title}: representation (test accuracy)", n_over_b=n_over_b,
                                   ylim=(0.0, 1.0), **common),
    }
    return {name: png for name, png in figures.items() if png is not None}

