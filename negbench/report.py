"""The report of a comparison (docs/design.md §6): the headline table (rich on the terminal,
markdown in ``table.md``), the tidy ``table.csv`` and the plots (:mod:`negbench.plots`), each
file written atomically. Headers, sort direction and display scale come from the metric
registry (:mod:`negbench.metric_registry`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from negbench.errors import UserError, suggest
from negbench.metric_registry import DEFAULT_SORT, all_metrics, get_metric, higher_is_better, metric_order
from negbench.results import RunRecord, atomic_write_bytes, one_line
from negbench.stats import CELL_KEYS, COLLAPSE_UNIFORMITY, CONFIDENCE, NOT_COUNTED, aggregate, curves

def headline_metrics() -> tuple[str, ...]:
    """The columns of the headline table (registry order); a column appears when some cell has
    a value."""
    return tuple(m.name for m in all_metrics() if m.headline)


#: the subset printed on the terminal (table.md has every headline column)
CONSOLE = ("gcl", "grad_norm_sq", "grad_norm_sq_avg", "sampling_tv", "uniformity", "lp_acc", "step_ms")
#: headline metrics that also show their paired ratio to the reference
RATIO_COLUMNS = ("grad_norm_sq_avg", "step_ms")


def _fmt(value: float | None, digits: int = 3) -> str:
    """3 significant digits; scientific (``1.23e-4``) below 1e-3 and from 1e5."""
    if value is None or not math.isfinite(value):
        return "–"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.{digits}g}"


def _fmt_stat(row: pd.Series, scale: float = 1.0, sep: str = " ± ") -> str:
    if row["n"] == 0:
        return "–"
    text = _fmt(row["mean"] / scale)
    if row["n"] > 1 and math.isfinite(row["ci_high"]):
        text += sep + _fmt((row["ci_high"] - row["mean"]) / scale, 2)
    return text


def headline(table: pd.DataFrame, sort: str, reference: str | None, *,
             compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """The wide table of table.md (``compact``: the terminal's, fewer columns): a row per
    cell, grouped by batch size, best ``sort`` first (missing values last); mean ± 95% CI
    half-width; ``seeds`` = completed/run, with the other runs' statuses."""
    has_values = set(table.loc[table["n"] > 0, "metric"])
    present = [m for m in headline_metrics() if m in has_values and (not compact or m in CONSOLE)]
    if sort in has_values and sort not in present:
        present.append(sort)
    cells = table.drop_duplicates(CELL_KEYS)[[*CELL_KEYS, "n_over_b", "runs", "completed", *NOT_COUNTED, "collapsed"]]
    sort_means = table[table["metric"] == sort].set_index(CELL_KEYS)["mean"]
    key = [sort_means.get(tuple(k), math.nan) for k in cells[CELL_KEYS].itertuples(index=False)]
    sign = -1.0 if higher_is_better(sort) else 1.0
    cells = cells.assign(_order=[sign * k for k in key])
    cells = cells.sort_values(["task", "batch_size", "_order"], kind="stable", na_position="last")
    indexed = table.set_index([*CELL_KEYS, "metric"])
    ratio_header = "×ref" if compact else f"×{reference}"
    headers = ["sampler", "B", "N/B", "seeds"]
    for metric in present:
        declared = get_metric(metric)
        headers.append((declared.header if declared else metric) + (" ▲" if metric == sort else ""))
        if reference and metric in RATIO_COLUMNS:
            headers.append(ratio_header)
    headers.append("flags")
    multi_task = table["task"].nunique() > 1
    out = []
    for cell in cells.to_dict("records"):
        label = f"{cell['task']}/{cell['sampler']}" if multi_task else cell["sampler"]
        others = ", ".join(f"{cell[s]} {s}" for s in NOT_COUNTED if cell[s])
        seeds = f"{cell['completed']}/{cell['runs']}" + (f": {others}" if others else "")
        line = [label, str(cell["batch_size"]), _fmt(cell["n_over_b"]), seeds]
        for metric in present:
            row = indexed.loc[(cell["task"], cell["sampler"], cell["batch_size"], metric)]
            declared = get_metric(metric)
            line.append(_fmt_stat(row, declared.scale if declared else 1.0, "±" if compact else " ± "))
            if reference and metric in RATIO_COLUMNS:
                line.append(f"{row['ratio']:.2f}×" if row["ratio_n"] > 0 else "–")
        line.append(f"COLLAPSE {cell['collapsed']}/{cell['completed']}" if cell["collapsed"] else "")
        out.append(line)
    return headers, out


def rich_table(headers: list[str], rows: list[list[str]], title: str, caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption, show_lines=False)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i in (0, 3) or header == "flags" else "right", no_wrap=i != 3)
    for row in rows:
        style = "red" if any(s in row[3] for s in ("failed", "diverged")) else ("yellow" if row[-1] else None)
        table.add_row(*row, style=style)
    return table


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, headers)) + " |",
             "|" + "|".join("---" if i in (0, 3, len(headers) - 1) else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def settings_line(records: Sequence[RunRecord]) -> str:
    """What the runs share (from the first readable config.json)."""
    config = next((r.config for r in records if r.config), None)
    if not config:
        return "no run could be read"
    versions = config.get("versions", {})
    parts = [f"task `{config['task']}` (N = {config.get('num_items')})", f"{config.get('steps')} steps",
             f"{config.get('optimizer')} lr {config.get('lr')}", f"β = {config.get('beta')}",
             f"device {config.get('device')} ({versions.get('device_name', '?')})",
             f"negbench {versions.get('negbench')}, torch {versions.get('torch')}"]
    if versions.get("git_commit"):
        parts.append(f"commit {versions['git_commit'][:10]}")
    return ", ".join(parts)


def markdown_report(table: pd.DataFrame, records: Sequence[RunRecord], *, title: str, command: str, sort: str,
                    reference: str | None, plots: Sequence[str]) -> str:
    headers, rows = headline(table, sort, reference)
    lines = [f"# {title}", "", "Regenerate (finished runs are skipped):", "", "```bash", command, "```", "",
             settings_line(records) + ".", "", markdown_table(headers, rows), "",
             f"Mean ± half-width of the {CONFIDENCE:.0%} Student-t interval over the completed seeds (`seeds` = "
             "completed/run); final values; `‖∇F‖² avg` is the mean stationarity gap over the second half of the "
             f"run. N/B = items per batch: an item is visited once per N/B steps. Sorted by `{sort}`, best first, "
             "within each batch size."]
    if reference:
        lines.append(f"`×{reference}`: geometric mean over shared seeds of the per-seed ratio to `{reference}` "
                     "at the same batch size.")
    lines.append(f"COLLAPSE k/n: k of the n completed seeds end with uniformity > {COLLAPSE_UNIFORMITY} (every "
                 "embedding near one point: a small gap there is not a good result). Peak memory on CPU is the "
                 "process's peak resident set size. Every metric with its std and interval: `table.csv`.")
    problems = [r for r in records if r.status != "completed"]
    if problems:
        lines += ["", "## Runs not averaged", ""]
        lines += [f"- `{r.label}` B={r.batch_size} seed {r.seed}: **{r.status}**" + (f" — {one_line(r.reason)}" if r.reason else "")
                  for r in problems]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


@dataclass
class Comparison:
    table: pd.DataFrame
    records: list[RunRecord]
    plots: list[str]
    folder: Path


def check_sort(sort: str) -> None:
    """A ``--sort`` metric must be declared in the metric registry."""
    order = metric_order()
    if sort not in order:
        raise UserError(f"--sort {sort!r} is not a metric{suggest(sort, order)}; one of: {', '.join(order)}")


def check_reference(reference: str | None, records: Sequence[RunRecord], explicit: bool) -> str | None:
    labels = {r.label for r in records}
    if reference in labels:
        return reference
    if explicit:
        raise UserError(f"--reference {reference!r} is not among the compared samplers{suggest(str(reference), labels)}; "
                        f"use one of: {', '.join(sorted(labels))}")
    return None


def write_comparison(folder: Path, records: list[RunRecord], *, reference: str | None, sort: str, title: str,
                     command: str, console: Console) -> Comparison:
    """Aggregate ``records`` and write table.csv, table.md and the plots into ``folder``, each
    file atomically; then print the headline table."""
    from negbench import plots as plotting

    table = aggregate(records, reference)
    device = next((r.config.get("device") for r in records if r.config), None)
    images = plotting.make_plots(table, curves(records), title=title, device=device)
    csv = table.to_csv(index=False).encode()
    markdown = markdown_report(table, records, title=title, command=command, sort=sort, reference=reference,
                               plots=list(images)).encode()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "table.csv", csv)
    atomic_write_bytes(folder / "table.md", markdown)
    for name, data in images.items():
        atomic_write_bytes(folder / name, data)
    for name in plotting.PLOT_FILES:
        if name not in images:
            (folder / name).unlink(missing_ok=True)
    headers, rows = headline(table, sort, reference, compact=True)
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        console.width = max(console.width, 200)
    caption = (f"mean±half-width of the {CONFIDENCE:.0%} t-interval over seeds"
               + (f"; ×ref: ratio to {reference} on shared seeds" if reference else "")
               + f"; every column in {folder / 'table.md'}")
    console.print(rich_table(headers, rows, title, caption))
    return Comparison(table, records, list(images), folder)


def comparison_folder(out: Path, name: str) -> Path:
    """Where a comparison is written: ``<out>/../<name>`` — ``results/<name>`` next to the
    default runs folder ``results/runs`` — or ``name`` itself when it is an absolute path."""
    if not name.strip():
        raise UserError("--name is empty; give a folder name, e.g. --name digits")
    path = Path(name)
    folder = path if path.is_absolute() else out.parent / path
    runs, target = out.resolve(), folder.resolve()
    if runs == target or runs.is_relative_to(target) or target.is_relative_to(runs):
        raise UserError(f"--name {name!r} would put the comparison in or around the runs folder {str(out)!r}; "
                        "choose another name, e.g. --name digits")
    return folder


def default_title(records: Sequence[RunRecord], name: str) -> str:
    """``name · 200 steps · adam lr 0.001 · β = 5`` from the runs' shared settings."""
    configs = [r.config for r in records if r.config]
    parts = [name]
    for key, fmt in (("steps", "{} steps"), ("optimizer", "{}"), ("lr", "lr {}"), ("beta", "β = {}")):
        values = {repr(c.get(key)) for c in configs}
        if len(values) == 1 and configs[0].get(key) is not None:
            parts.append(fmt.format(configs[0][key]))
    return " · ".join(parts)
