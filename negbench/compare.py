"""``negbench compare`` (DESIGN §6): a grid of runs over samplers × batch sizes × seeds, run
where missing (through :func:`negbench.runner.run`, which skips finished runs and resumes
interrupted ones), read back and aggregated over seeds.

Aggregation (per task × sampler × batch size × metric, over the seeds whose run completed):

    mean  m = 1/n Σ_s x_s,   std  s = sqrt(1/(n-1) Σ_s (x_s - m)²),
    95% CI  m ± t_{0.975, n-1} · s/√n          (scipy.stats.t; undefined for n = 1)

of each metric's final value (``summary.json``'s ``final``, plus ``grad_norm_sq_avg`` and
``grad_norm_sq_min``). Paired ratios against a reference sampler at the same batch size, on
the seeds both completed: the geometric mean of the per-seed ratios r_s = x_s / x_s^ref,

    ratio = exp(mean_s log r_s),  CI = exp(t-interval of log r_s),

defined for metrics whose two values are positive. Diverged, failed and interrupted runs are
not averaged in; they are counted and listed with their reason. A run whose final
``uniformity`` exceeds :data:`COLLAPSE_UNIFORMITY` is counted as collapsed (DESIGN §4).
"""

from __future__ import annotations

import glob
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from scipy import stats

from negbench import runner
from negbench.config import RunConfig, resolve_device, split_set_options
from negbench.errors import UserError, suggest
from negbench.metrics import reset_peak_memory
from negbench.registry import SAMPLERS, TASKS
from negbench.results import CHECKPOINT, CONFIG, METRICS, SUMMARY, atomic_write_bytes, read_json, read_rows

CONFIDENCE = 0.95
#: uniformity = log mean exp(-2‖e - e'‖²) ∈ [-4, 0]; 0 means every embedding is the same point.
#: Above -0.5 the mean Gaussian-kernel similarity exceeds e^-0.5 ≈ 0.61, i.e. a typical pair of
#: different items sits at ‖e - e'‖² ≲ 0.25 (cosine ≳ 0.88): the embeddings have collapsed.
COLLAPSE_UNIFORMITY = -0.5
#: The metrics of DESIGN §4 (final values) and the summary's gap statistics, in table order.
METRIC_ORDER = (
    "gcl", "grad_norm_sq", "grad_norm_sq_avg", "grad_norm_sq_min", "loss", "grad_error_sq",
    "sampling_tv", "sampling_tv_floor", "alignment", "uniformity", "lp_acc", "knn1_acc", "knn10_acc",
    "accept_rate", "stale_frac", "empty_frac", "chain_age", "step_ms", "sampler_ms", "samples_per_s",
    "peak_mem_bytes", "state_bytes",
)
#: sorted best first: descending for these, ascending for every other metric
HIGHER_IS_BETTER = frozenset({"lp_acc", "knn1_acc", "knn10_acc", "samples_per_s", "accept_rate"})
_NOT_METRICS = frozenset({"step", "epoch", "samples_seen"})
#: ``--samplers all``: every registered sampler, plus these variants (DESIGN §2.1: both
#: ``stale`` treatments of EMC²)
EXTRA_VARIANTS = {"emc2": ("emc2:stale=refresh",)}
#: run statuses that are not averaged, in the order they are reported
NOT_COUNTED = ("diverged", "failed", "interrupted", "unreadable", "missing")
#: plot files this module owns in a comparison folder (stale ones are removed)
PLOT_FILES = ("grad_norm_sq.png", "gcl.png", "sampling_tv.png", "cost.png", "accuracy.png")

Warn = Callable[[str], None]


# ---- parsing the grid ----------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSpec:
    """One row of the grid: a sampler with parameters, e.g. ``emc2:stale=refresh``."""

    label: str
    name: str
    params: tuple[tuple[str, str], ...] = ()


def parse_sampler_spec(text: str) -> SamplerSpec:
    """``name[:key=value[:key=value]]`` → a spec labelled with the canonical sampler name (an
    alias such as ``simclr`` becomes ``in_batch``) and the parameters as written. Unknown
    samplers and bad parameters raise :class:`UserError`."""
    text = text.strip()
    name, *pairs = [part.strip() for part in text.split(":")]
    if not name:
        raise UserError(f"--samplers entry {text!r} has no sampler name; write e.g. emc2:stale=refresh")
    cls = SAMPLERS.get_class(name)
    params: list[tuple[str, str]] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--samplers entry {text!r}: expected key=value after ':', got {pair!r}; e.g. emc2:stale=refresh")
        params.append((key.strip(), value.strip()))
    cls.resolve_params(dict(params))  # validates keys and values
    canonical = SAMPLERS.canonical(name)
    label = ":".join([canonical, *(f"{k}={v}" for k, v in params)])
    return SamplerSpec(label, canonical, tuple(params))


def parse_sampler_specs(text: str | None) -> list[SamplerSpec]:
    """A comma-separated list of specs; ``all`` (the default) is every registered sampler plus
    :data:`EXTRA_VARIANTS`."""
    if text is None or text.strip() == "all":
        entries = []
        for name in SAMPLERS.names():
            entries += [name, *EXTRA_VARIANTS.get(name, ())]
    else:
        entries = [e for e in (part.strip() for part in text.split(",")) if e]
    if not entries:
        raise UserError("--samplers is empty; give a comma-separated list, e.g. --samplers in_batch,emc2 (or all)")
    specs = [parse_sampler_spec(e) for e in entries]
    labels = [s.label for s in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"--samplers lists {', '.join(repeated)} more than once; list each sampler once")
    return specs


def _int_list(option: str, text: str, example: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"{option} expects integers separated by commas, got {text!r}; e.g. {option} {example}") from None
    if not values:
        raise UserError(f"{option} is empty; e.g. {option} {example}")
    if len(set(values)) != len(values):
        raise UserError(f"{option} repeats a value in {text!r}; list each once")
    return values


def parse_seeds(text: str) -> list[int]:
    """``3`` → seeds 0, 1, 2; ``0,5`` (any comma) → exactly those seeds."""
    if "," not in text:
        count = _int_list("--seeds", text, "3")[0]
        if count < 1:
            raise UserError(f"--seeds must be a positive count or a comma-separated list of seeds, got {text!r}; e.g. --seeds 3")
        return list(range(count))
    seeds = _int_list("--seeds", text, "0,1,2")
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise UserError(f"--seeds must be in [0, 2^32), got {bad[0]}")
    return seeds


def parse_batch_sizes(text: str) -> list[int]:
    sizes = _int_list("--batch-sizes", text, "4,32")
    bad = [b for b in sizes if b < 1]
    if bad:
        raise UserError(f"--batch-sizes must be positive integers, got {bad[0]}")
    return sizes


def route_set_options(pairs: Sequence[str], samplers: Sequence[str], task: str) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """``--set`` for a grid: a task key goes to the task; a sampler key goes to every sampler
    of the grid that has it (``sampler.key=`` / ``task.key=`` disambiguate). A key no sampler
    of the grid and not the task has is an error. Returns, per sampler name, its
    (sampler_params, task_params) as :func:`negbench.config.split_set_options` routes them."""
    task_keys = TASKS.get_class(task).params
    routed: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    used: set[str] = set()
    for name in dict.fromkeys(samplers):
        sampler_keys = SAMPLERS.get_class(name).params
        mine = []
        for pair in pairs:
            key = pair.partition("=")[0].strip()
            scope, dot, bare = key.partition(".")
            if dot and scope == "task":
                keep = True  # validated by the task itself when the cell is prepared
            elif dot and scope == "sampler":
                keep = bare in sampler_keys
            else:  # a malformed pair is kept so that split_set_options reports it
                keep = "=" not in pair or not key or key in task_keys or key in sampler_keys
            if keep:
                mine.append(pair)
                used.add(pair)
        routed[name] = split_set_options(mine, name, task)
    for pair in pairs:
        if pair not in used:
            key = pair.partition("=")[0].strip()
            known = sorted({*task_keys, *(k for n in samplers for k in SAMPLERS.get_class(n).params)})
            raise UserError(
                f"unknown --set key {key!r}{suggest(key.split('.')[-1], known)}; the task {task!r} and the samplers "
                f"of the grid take: {', '.join(known) or 'no parameters'}"
            )
    return routed


# ---- the grid ------------------------------------------------------------------------------

@dataclass
class Cell:
    """One run of the grid (a sampler spec at one batch size and one seed)."""

    spec: SamplerSpec
    batch_size: int
    seed: int
    config: RunConfig
    run_dir: Path | None = None
    n_over_b: float | None = None
    error: str | None = None  # why it cannot run or why it failed
    ran: bool = False  # trained in this invocation (not skipped as finished)
    busy: bool = False  # left alone: another process holds its run folder (e.g. an overlapping grid)


@dataclass
class Grid:
    task: str
    specs: list[SamplerSpec]
    batch_sizes: list[int]
    seeds: list[int]
    cells: list[Cell]


def build_grid(base: RunConfig, specs: list[SamplerSpec], batch_sizes: list[int], seeds: list[int],
               set_pairs: Sequence[str] = ()) -> Grid:
    """Resolve and validate every cell with :func:`negbench.runner.prepare` (writing nothing):
    any bad option raises :class:`UserError` before a single run starts. A sampler that
    cannot run on the task (it needs finite views, the task draws random augmentations) is
    not an input error: its cells are kept, marked failed with the reason."""
    task_cls = TASKS.get_class(base.task)
    routes = route_set_options(set_pairs, [s.name for s in specs], base.task)
    cells: list[Cell] = []
    seen: dict[Path, str] = {}
    for spec in specs:
        cls = SAMPLERS.get_class(spec.name)
        set_params, task_params = routes[spec.name]
        sampler_params = {**set_params, **dict(spec.params)}
        incompatible = None
        if cls.requires_finite_views and not task_cls.finite_views:
            incompatible = (f"sampler {spec.name!r} needs a finite view set but task {base.task!r} draws "
                            "random augmentations")
        for batch_size in batch_sizes:
            for seed in seeds:
                config = replace(base, sampler=spec.name, batch_size=batch_size, seed=seed,
                                 sampler_params=sampler_params, task_params=task_params)
                cell = Cell(spec, batch_size, seed, config, error=incompatible)
                if incompatible is None:
                    prep = runner.prepare(config)
                    cell.run_dir = prep.run_dir
                    cell.n_over_b = prep.resolved["items_per_batch_ratio"]
                    if prep.run_dir in seen:
                        raise UserError(
                            f"--samplers {seen[prep.run_dir]} and {spec.label} are the same configuration; list it once"
                        )
                    seen[prep.run_dir] = spec.label
                    del prep  # the task's data: reloaded when the cell runs
                cells.append(cell)
    ratio = {c.batch_size: c.n_over_b for c in cells if c.n_over_b is not None}
    for cell in cells:
        cell.n_over_b = ratio.get(cell.batch_size)
    return Grid(base.task, specs, batch_sizes, seeds, cells)


def run_grid(grid: Grid, console: Console) -> bool:
    """Run every cell that is not finished, in grid order, with one progress bar over cells
    (each run's own bar is off). A run that raises is recorded on its cell as failed and the
    grid goes on; a run whose folder another process holds (an overlapping grid, a `negbench
    run`) is left to it, reported, and read back later if it has finished by then. Returns
    False when a run was interrupted (by a signal): stop and rerun."""
    progress = Progress(
        TextColumn("[bold]compare[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
        TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
    )
    with progress:
        bar = progress.add_task("", total=len(grid.cells))
        for cell in grid.cells:
            progress.update(bar, description=f"{cell.spec.label} B={cell.batch_size} seed {cell.seed}")
            if cell.error is None:
                reset_peak_memory(resolve_device(cell.config.device))
                try:
                    outcome = runner.run(cell.config, console=console, show_progress=False)
                except runner.RunFolderBusy:
                    cell.busy = True
                    console.print(f"[yellow]{cell.spec.label} B={cell.batch_size} seed {cell.seed}: running in another "
                                  "negbench process, left to it[/yellow]")
                except Exception as exc:  # a failing cell is a result of the comparison, not a crash
                    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                    cell.error = _one_line(text)
                    console.print(f"[red]{cell.spec.label} B={cell.batch_size} seed {cell.seed} failed:[/red] {cell.error}")
                else:
                    cell.ran = not outcome.skipped
                    if outcome.summary.get("status") == "interrupted":
                        return False
            progress.advance(bar)
        ran = sum(c.ran for c in grid.cells)
        failed = sum(c.error is not None for c in grid.cells)
        busy = sum(c.busy for c in grid.cells)
        progress.update(bar, description=f"{ran} trained, {len(grid.cells) - ran - failed - busy} already finished, "
                                         f"{failed} failed" + (f", {busy} running elsewhere" if busy else ""))
    return True


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---- reading runs back -------------------------------------------------------------------

@dataclass
class RunRecord:
    """One seed of one grid cell, as read back from its run folder (or why it has none)."""

    task: str
    label: str
    batch_size: int
    seed: int | None
    status: str  # completed | diverged | interrupted | failed | unreadable | missing
    reason: str | None = None
    n_over_b: float | None = None
    final: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


def read_run(run_dir: Path, warn: Warn) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None:
    """(config, summary, rows) of a finished-or-stopped run folder, or None — after one warning
    line naming the folder — when it is unreadable or partial: config.json or summary.json
    missing or corrupt, or metrics.jsonl missing, with a bad line, or ending before the step
    the summary reports."""
    def skip(why: str) -> None:
        warn(f"skipped {run_dir}: {why}")

    for name in (CONFIG, SUMMARY, METRICS):
        if not (run_dir / name).is_file():
            extra = " (still running, or killed before it ended)" if name == SUMMARY else ""
            skip(f"no {name}{extra}")
            return None
    try:
        config = read_json(run_dir / CONFIG)
        summary = read_json(run_dir / SUMMARY)
        rows = read_rows(run_dir / METRICS, strict=True)
    except UserError as exc:
        skip(_one_line(str(exc).split(";")[0]))
        return None
    for key in ("task", "sampler", "batch_size", "seed"):
        if key not in config:
            skip(f"{CONFIG} has no {key!r}")
            return None
    if not isinstance(summary.get("final"), dict) or "status" not in summary:
        skip(f"{SUMMARY} has no status or final values")
        return None
    last = max((r.get("step", -1) for r in rows), default=-1)
    if summary["status"] in ("completed", "diverged") and last != summary.get("steps_done"):
        skip(f"{METRICS} ends at step {last} but {SUMMARY} reports step {summary.get('steps_done')} (truncated)")
        return None
    return config, summary, rows


def _numbers(summary: dict[str, Any]) -> dict[str, float]:
    """The final value of every numeric metric, plus the summary's gap statistics."""
    values = {k: float(v) for k, v in summary["final"].items()
              if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in ("grad_norm_sq_avg", "grad_norm_sq_min"):
        if isinstance(summary.get(key), (int, float)):
            values[key] = float(summary[key])
    return {k: v for k, v in values.items() if math.isfinite(v)}


def _record(task: str, label: str, batch_size: int, seed: int | None, run_dir: Path, n_over_b: float | None,
            warn: Warn) -> RunRecord:
    read = read_run(run_dir, warn)
    if read is None:
        return RunRecord(task, label, batch_size, seed, "unreadable", f"unreadable run folder {run_dir.name}",
                         n_over_b, run_dir=run_dir)
    config, summary, rows = read
    n_over_b = config.get("items_per_batch_ratio", n_over_b)
    return RunRecord(task, label, batch_size, config.get("seed", seed), summary["status"], summary.get("reason"),
                     n_over_b, _numbers(summary), rows, config, run_dir)


def collect_grid(grid: Grid, warn: Warn) -> list[RunRecord]:
    """A record per cell: read back, failed (with the reason), or missing (never run, or still
    running in another process)."""
    records = []
    for cell in grid.cells:
        label, b = cell.spec.label, cell.batch_size
        finished = cell.run_dir is not None and (cell.run_dir / SUMMARY).exists()
        if cell.error is not None and not finished:
            records.append(RunRecord(grid.task, label, b, cell.seed, "failed", cell.error, cell.n_over_b))
        elif cell.busy and not finished:
            records.append(RunRecord(grid.task, label, b, cell.seed, "missing", "running in another negbench process",
                                     cell.n_over_b))
        elif cell.run_dir is None or not cell.run_dir.exists():
            records.append(RunRecord(grid.task, label, b, cell.seed, "missing", "not run yet", cell.n_over_b))
        else:
            records.append(_record(grid.task, label, b, cell.seed, cell.run_dir, cell.n_over_b, warn))
    return records


def _is_run_folder(path: Path) -> bool:
    return any((path / name).exists() for name in (CONFIG, SUMMARY, METRICS, CHECKPOINT))


def expand_run_paths(paths: Sequence[str]) -> list[Path]:
    """Run folders from arguments: folders, globs (expanded here when the shell did not), or a
    folder of run folders (its subfolders). A path that matches nothing is a :class:`UserError`."""
    found: list[Path] = []
    for text in paths:
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else ([text] if Path(text).exists() else [])
        if not matches:
            raise UserError(f"no run folder matches {text!r}; pass run folders (results/runs/<run-id>) or a glob")
        for match in map(Path, matches):
            if not match.is_dir():
                raise UserError(f"{str(match)!r} is not a folder; pass run folders (results/runs/<run-id>)")
            if _is_run_folder(match):
                found.append(match)
            else:
                found += sorted(p for p in match.iterdir() if p.is_dir() and not p.name.startswith("."))
    return list(dict.fromkeys(found))


#: resolved options that, when they differ between the given runs, are appended to their label
_SETTING_KEYS = ("task_params", "steps", "optimizer", "lr", "momentum", "weight_decay", "beta", "eval_every",
                 "grad_error", "tv_steps", "tv_anchors", "device")


def sampler_label(config: dict[str, Any]) -> str:
    """``name[:key=value...]`` with the parameters that differ from the sampler's defaults (all
    of them when the sampler is not registered here)."""
    name = config["sampler"]
    params = config.get("sampler_params") or {}
    try:
        defaults = {k: p.default for k, p in SAMPLERS.get_class(name).params.items()}
    except UserError:
        defaults = {}
    return ":".join([name, *(f"{k}={v}" for k, v in sorted(params.items()) if defaults.get(k, object()) != v)])


def collect_dirs(run_dirs: Sequence[Path], warn: Warn) -> list[RunRecord]:
    """Records of the given run folders, grouped by task, sampler label and batch size; runs
    whose other settings (steps, lr, ...) differ get those settings in their label."""
    loaded = []
    for run_dir in run_dirs:
        read = read_run(run_dir, warn)
        if read is not None:
            loaded.append((run_dir, *read))
    varying = {task: [k for k in _SETTING_KEYS
                      if len({repr(c.get(k)) for _, c, _, _ in loaded if c["task"] == task}) > 1]
               for task in {c["task"] for _, c, _, _ in loaded}}
    records = []
    for run_dir, config, summary, rows in loaded:
        label = sampler_label(config)
        if varying[config["task"]]:
            varying_keys = varying[config["task"]]
            label += " [" + ", ".join(f"{k}={config.get(k)}" for k in varying_keys) + "]"
        n_over_b = config.get("items_per_batch_ratio")
        records.append(RunRecord(config["task"], label, int(config["batch_size"]), config["seed"], summary["status"],
                                 summary.get("reason"), n_over_b, _numbers(summary), rows, config, run_dir))
    return records


# ---- aggregation ---------------------------------------------------------------------------

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
    present = {k for r in records for k in r.final}
    return [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))


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


# ---- presentation --------------------------------------------------------------------------

#: (metric, header) of the headline table; a column appears when some cell has a value
HEADLINE = (
    ("gcl", "gcl F(θ)"), ("grad_norm_sq", "‖∇F‖² final"), ("grad_norm_sq_avg", "‖∇F‖² avg"),
    ("sampling_tv", "sampling TV"), ("sampling_tv_floor", "TV floor"), ("uniformity", "uniformity"),
    ("lp_acc", "lp_acc"), ("knn10_acc", "knn10_acc"), ("stale_frac", "stale_frac"), ("empty_frac", "empty_frac"),
    ("step_ms", "step ms"), ("peak_mem_bytes", "peak MiB"),
)
#: the subset printed on the terminal (table.md has every HEADLINE column)
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
    present = [m for m, _ in HEADLINE if m in has_values and (not compact or m in CONSOLE)]
    if sort in has_values and sort not in present:
        present.append(sort)
    cells = table.drop_duplicates(CELL_KEYS)[[*CELL_KEYS, "n_over_b", "runs", "completed", *NOT_COUNTED, "collapsed"]]
    sort_means = table[table["metric"] == sort].set_index(CELL_KEYS)["mean"]
    key = [sort_means.get(tuple(k), math.nan) for k in cells[CELL_KEYS].itertuples(index=False)]
    sign = -1.0 if sort in HIGHER_IS_BETTER else 1.0
    cells = cells.assign(_order=[sign * k for k in key])
    cells = cells.sort_values(["task", "batch_size", "_order"], kind="stable", na_position="last")
    indexed = table.set_index([*CELL_KEYS, "metric"])
    ratio_header = "×ref" if compact else f"×{reference}"
    headers = ["sampler", "B", "N/B", "seeds"]
    for metric in present:
        headers.append(dict(HEADLINE).get(metric, metric) + (" ▲" if metric == sort else ""))
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
            line.append(_fmt_stat(row, 2**20 if metric == "peak_mem_bytes" else 1.0, "±" if compact else " ± "))
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
        lines += [f"- `{r.label}` B={r.batch_size} seed {r.seed}: **{r.status}**" + (f" — {_one_line(r.reason)}" if r.reason else "")
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
    if sort not in METRIC_ORDER:
        raise UserError(f"--sort {sort!r} is not a metric{suggest(sort, METRIC_ORDER)}; one of: {', '.join(METRIC_ORDER)}")


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
    for name in PLOT_FILES:
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
