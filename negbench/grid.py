"""The grid of ``negbench compare`` (docs/design.md §6): parsing its specification (samplers ×
batch sizes × seeds, ``--set`` routing), resolving every cell before anything runs, and running
the cells that are not finished.

:func:`run_grid` takes any list of :class:`Cell` and a per-cell runner function, so another
command that needs a grid of ordinary runs (a rate study, parallel ``--jobs``) reuses the same
skip/resume behaviour: a finished run is skipped by :func:`negbench.runner.run`, an interrupted
one resumed, a failing one recorded on its cell, a busy one left to the process holding it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from negbench import runner
from negbench.config import RunConfig, resolve_device, split_set_options
from negbench.errors import UserError, suggest
from negbench.executors import ExecutorOptions, run_cells
from negbench.metrics import reset_peak_memory
from negbench.registry import SAMPLERS, TASKS
from negbench.resolution import finite_view_conflict
from negbench.results import SUMMARY, RunRecord, Warn, one_line, read_record


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
    """A comma-separated list of specs; ``all`` (the default) is every registered sampler, each
    followed by the variants it declares in ``compare_variants`` (e.g. ``stale=refresh``)."""
    if text is None or text.strip() == "all":
        entries = []
        for name in SAMPLERS.names():
            variants = getattr(SAMPLERS.get_class(name), "compare_variants", ())
            entries += [name, *(f"{name}:{variant}" for variant in variants)]
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
    crashed: bool = False  # its run raised in this invocation (not: the sampler cannot run on the task)

    @property
    def name(self) -> str:
        """How the progress bar and messages name the cell: ``emc2 B=32 seed 0``."""
        return f"{self.spec.label} B={self.batch_size} seed {self.seed}"


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
        incompatible = finite_view_conflict(cls, task_cls.finite_views, base.task)
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




@dataclass
class CellOutcome:
    """What a per-cell runner reports back to :func:`run_grid`."""

    skipped: bool  # the run had finished before: nothing was trained
    interrupted: bool  # stopped by a signal: stop the grid, rerun to resume


CellRunner = Callable[[Cell, Console], CellOutcome]


def run_cell(cell: Cell, console: Console) -> CellOutcome:
    """The default per-cell runner: one :func:`negbench.runner.run` of the cell's config (its
    own progress bar off), with the peak-memory counter reset first."""
    reset_peak_memory(resolve_device(cell.config.device))
    outcome = runner.run(cell.config, console=console, show_progress=False)
    return CellOutcome(skipped=outcome.skipped, interrupted=outcome.summary.get("status") == "interrupted")


def _outcome(run_one: CellRunner, cell: Cell, console: Console) -> dict[str, object]:
    """``run_one`` on ``cell``, reported as a small picklable dict (it may cross processes):
    ``{"skipped", "interrupted"}``, ``{"busy": True}``, or ``{"error"}`` when it raised."""
    try:
        outcome = run_one(cell, console)
    except runner.RunFolderBusy:
        return {"busy": True}
    except Exception as exc:  # a failing cell is a result of the comparison, not a crash
        return {"error": one_line(str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")}
    return {"skipped": outcome.skipped, "interrupted": outcome.interrupted}


def _in_worker(run_one: CellRunner, cell: Cell) -> dict[str, object]:
    """A cell in a worker process (:mod:`negbench.executors`): quiet, its result as a dict."""
    return _outcome(run_one, cell, Console(stderr=True, quiet=True))


def run_grid(cells: Sequence[Cell], console: Console, *, run_one: CellRunner = run_cell,
             title: str = "compare", executor: ExecutorOptions | None = None,
             plugins: Sequence[str | Path] = ()) -> bool:
    """Run every cell without an error through ``run_one`` on ``executor``'s backend (default:
    in order, in this process; :mod:`negbench.executors` for ``--jobs``, Dask and submitit —
    there ``run_one`` must be a module-level function), with one progress bar over cells,
    advanced as they finish. A run that raises, or whose worker dies, is recorded on its cell
    (``error``) and the grid goes on; a run whose folder another process holds
    (:class:`negbench.runner.RunFolderBusy`) is left to it (``busy``) and read back later if it
    has finished by then. Returns False when a run was interrupted (by a signal): stop and rerun."""
    executor = (executor or ExecutorOptions()).validate()
    progress = Progress(
        TextColumn(f"[bold]{title}[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
        TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
    )
    todo = [cell for cell in cells if cell.error is None]

    def here(cell: Cell) -> dict[str, object]:
        progress.update(bar, description=cell.name)
        return _outcome(run_one, cell, console)

    with progress:
        bar = progress.add_task("", total=len(cells), completed=len(cells) - len(todo))
        if not executor.in_process:
            console.print(f"{title}: {len(todo)} runs on {executor.describe()}")
        try:
            for done in run_cells(todo, partial(_in_worker, run_one), executor, plugins=plugins, in_process_fn=here):
                cell = todo[done.index]
                result = done.value if done.error is None else {"error": done.error}
                if result.get("busy"):
                    cell.busy = True
                    console.print(f"[yellow]{cell.name}: running in another negbench process, left to it[/yellow]")
                elif result.get("error"):
                    cell.error = one_line(str(result["error"]))
                    cell.crashed = True
                    console.print(f"[red]{cell.name} failed:[/red] {cell.error}")
                else:
                    cell.ran = not result["skipped"]
                progress.advance(bar)
                if not executor.in_process:
                    progress.update(bar, description=f"{cell.name}: {'busy' if cell.busy else 'failed' if cell.error else 'done'}")
                if result.get("interrupted"):  # stop: the cells not started stay for the rerun
                    return False
        except KeyboardInterrupt:
            return False
        ran = sum(c.ran for c in cells)
        failed = sum(c.error is not None for c in cells)
        busy = sum(c.busy for c in cells)
        progress.update(bar, description=f"{ran} trained, {len(cells) - ran - failed - busy} already finished, "
                                         f"{failed} failed" + (f", {busy} running elsewhere" if busy else ""))
    return True


def failed_runs(records: Sequence[RunRecord], grid: Grid | None = None) -> list[str]:
    """``label B=b seed s`` of every run that failed — raised in this invocation, or read back
    with status failed — which makes ``negbench compare`` exit 1. A cell whose sampler cannot
    run on the task is a failed row of the table, not a failed run."""
    failed = {(r.label, r.batch_size, r.seed) for r in records if r.status == "failed" and r.run_dir is not None}
    failed |= {(c.spec.label, c.batch_size, c.seed) for c in (grid.cells if grid else []) if c.crashed}
    return [f"{label} B={b} seed {seed}" for label, b, seed in sorted(failed, key=str)]


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
            records.append(read_record(grid.task, label, b, cell.seed, cell.run_dir, cell.n_over_b, warn))
    return records
