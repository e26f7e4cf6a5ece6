"""The Python API that returns tables (docs/design.md §6): :func:`compare`, the ``negbench
compare`` command as a function, and :func:`load_runs`, every metric row of any run folders as
one pandas DataFrame. The command line is a thin wrapper over :func:`compare`.

``compare`` returns, besides the files it writes, the aggregated table of ``table.csv`` (one row
per task × sampler × batch size × metric: mean m, std s, the 95% interval m ± t₀.₉₇₅,ₙ₋₁·s/√n,
paired ratios; :mod:`negbench.stats`) and a per-run frame (one row per run of the grid, its
final values as columns)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import pandas as pd
from rich.console import Console
from rich.markup import escape

from negbench.config import DEFAULT_BATCH_SIZES, DEFAULT_SEEDS, RunConfig
from negbench.errors import UserError
from negbench.metric_registry import DEFAULT_SORT
from negbench.results import (CONFIG, METRICS, SUMMARY, RunRecord, Warn, expand_run_paths, read_json, read_rows,
                              sampler_label)

PathLike = Union[str, Path]
_D = RunConfig()

#: config.json keys joined to every row by :func:`load_runs` (besides ``sampler_label``)
CONFIG_COLUMNS = ("run_id", "task", "sampler", "batch_size", "seed", "steps", "optimizer", "lr", "momentum",
                  "weight_decay", "beta", "device", "num_items", "items_per_batch_ratio", "eval_every", "tv_steps",
                  "grad_error")
#: the leading columns of :attr:`CompareResult.runs`
RUN_COLUMNS = ("task", "sampler", "batch_size", "seed", "status", "reason", "n_over_b", "run_id", "run_dir")


class Interrupted(KeyboardInterrupt):
    """A run of the grid was stopped by a signal (its checkpoint kept): call again to resume."""


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare` returns.

    Attributes:
        table: the aggregated tidy table, exactly the rows and columns of ``folder/table.csv``.
        runs: one row per run (grid cell or given folder): ``task, sampler`` (the label, e.g.
            ``emc2:stale=refresh``), ``batch_size, seed, status, reason, n_over_b, run_id,
            run_dir``, then the final value of every metric (NaN where a run has none).
        folder: the comparison folder written (``table.csv``, ``table.md``, the plots).
        plots: the file names of the plots written into ``folder``.
        failed: ``label B=b seed s`` of every run that failed (``negbench compare`` then exits 1;
            a diverged run is a result, and a sampler the task cannot run is a failed row, not a
            failed run).
    """

    table: pd.DataFrame
    runs: pd.DataFrame
    folder: Path
    plots: tuple[str, ...]
    failed: tuple[str, ...] = ()


def _as_text(value: Union[str, int, Sequence[Any], None], option: str) -> str | None:
    """A grid option given from Python (a string as on the command line, or a list) as the
    command line's text; a list of one seed becomes ``"5,"`` (seed 5, not a count)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise UserError(f"{option} takes a comma-separated string or a list, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Sequence):
        text = ",".join(str(v) for v in value)
        return text + "," if option == "--seeds" and len(value) == 1 else text
    raise UserError(f"{option} takes a comma-separated string or a list, got {type(value).__name__}")


def _set_pairs(params: Union[Mapping[str, Any], Sequence[str], None]) -> list[str]:
    """``--set`` pairs from a mapping ``{"burn_in": 0.25}`` or a list ``["burn_in=0.25"]``."""
    if params is None:
        return []
    if isinstance(params, Mapping):
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]
    if isinstance(params, str):
        return [params]
    return [str(p) for p in params]


def command_line(options: Sequence[tuple[str, object, object]], set_pairs: Sequence[str], command: str = "compare") -> str:
    """``negbench compare`` (or ``command``) with every option that differs from its default
    (for table.md)."""
    words = ["negbench", command]
    for flag, value, default in options:
        if value is None or value == default or value is False:
            continue
        words += [flag] if value is True else [flag, str(value)]
    for pair in set_pairs:
        words += ["--set", pair]
    return " ".join(words)


def _runs_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per record: its keys and status, then its final values as columns."""
    rows = []
    for r in records:
        rows.append({"task": r.task, "sampler": r.label, "batch_size": r.batch_size, "seed": r.seed,
                     "status": r.status, "reason": r.reason, "n_over_b": r.n_over_b,
                     "run_id": r.config.get("run_id", r.run_dir.name if r.run_dir else None),
                     "run_dir": str(r.run_dir) if r.run_dir else None, **r.final})
    return pd.DataFrame(rows, columns=list(dict.fromkeys([*RUN_COLUMNS, *(k for row in rows for k in row)])))


def compare(
    runs: Union[PathLike, Sequence[PathLike], None] = None, *,
    task: str | None = None, samplers: Union[str, Sequence[str], None] = None,
    batch_sizes: Union[str, int, Sequence[int], None] = None, seeds: Union[str, int, Sequence[int], None] = None,
    steps: int | None = None, epochs: float | None = None, optimizer: str = _D.optimizer, lr: float | None = None,
    momentum: float = _D.momentum, weight_decay: float = _D.weight_decay, beta: float = _D.beta,
    device: str = _D.device, eval_every: int | None = None, out: PathLike = _D.out, data_root: PathLike | None = None,
    params: Union[Mapping[str, Any], Sequence[str], None] = None, grad_error: bool = False,
    tv_steps: int | None = None, tv_anchors: int = _D.tv_anchors, plugins: Sequence[PathLike] = (),
    name: str | None = None, reference: str | None = None, sort: str = DEFAULT_SORT, collect: bool = False,
    checkpoint_every: int | None = None, jobs: int | None = None, threads_per_job: int | None = None,
    backend: str = "local", scheduler: str | None = None, slurm_partition: str | None = None,
    slurm_time: str | None = None, slurm_gpus_per_task: int | None = None, slurm_array_parallelism: int | None = None,
    console: Console | None = None, table_console: Console | None = None,
) -> CompareResult:
    """``negbench compare`` from Python: run the missing cells of a samplers × batch sizes ×
    seeds grid (a finished run is skipped, an interrupted one resumed), or take the given run
    folders (``runs``: folders, folders of run folders or globs), aggregate over seeds and write
    ``table.csv``, ``table.md`` and the plots into the comparison folder, atomically.

    Every option is the command's (``--batch-sizes`` is ``batch_sizes``, ``--set`` is
    ``params``, ``--plugin`` is ``plugins``; ``jobs``, ``backend``, ``scheduler`` and the
    ``slurm_*`` options choose where the cells run, :mod:`negbench.executors`). ``samplers``,
    ``batch_sizes`` and ``seeds`` take the command's text (``"in_batch,emc2"``, ``"4,32"``,
    ``3`` or ``"0,5"``) or a list (``seeds=[5]`` is seed 5 alone). ``console`` receives
    progress and warnings (default: stderr); ``table_console``, when given, the headline table
    the command prints.

    Returns:
        A :class:`CompareResult` (``table``, ``runs``, ``folder``, ``plots``).

    Raises:
        UserError: bad input (unknown sampler or task, bad seeds, an unwritable folder, ...),
            before any run starts and before anything is written.
        Interrupted: a run was stopped by a signal; call again to resume.
    """
    from negbench import report
    from negbench.executors import ExecutorOptions
    from negbench.registry import load_plugin

    for path in plugins:
        load_plugin(Path(path))
    err = console if console is not None else Console(stderr=True)

    def warn(message: str) -> None:
        err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True, highlight=False)

    report.check_sort(sort)
    out, set_pairs = Path(out), _set_pairs(params)
    executor = ExecutorOptions(
        backend=backend, jobs=jobs, threads_per_job=threads_per_job, scheduler=scheduler,
        slurm_partition=slurm_partition, slurm_time=slurm_time, slurm_gpus_per_task=slurm_gpus_per_task,
        slurm_array_parallelism=slurm_array_parallelism, folder=out / ".submitit",
    ).validate()
    shown = table_console if table_console is not None else Console(quiet=True)
    given = [] if runs is None else [str(runs)] if isinstance(runs, (str, Path)) else [str(r) for r in runs]
    if given:
        grid_options = [flag for flag, value in (("--task", task), ("--samplers", samplers), ("--batch-sizes", batch_sizes),
                                                  ("--seeds", seeds), ("--collect", collect or None)) if value is not None]
        if grid_options:
            raise UserError(f"give run folders or a grid ({', '.join(grid_options)}), not both")
        comparison, failed = _compare_folders(given, out=out, name=name, reference=reference, sort=sort, warn=warn,
                                      console=shown)
    else:
        comparison, failed = _compare_grid(
            RunConfig(task=task or _D.task, steps=steps, epochs=epochs, optimizer=optimizer, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, beta=beta, device=device, eval_every=eval_every, out=out,
                      data_root=Path(data_root) if data_root is not None else None, grad_error=grad_error,
                      tv_steps=tv_steps, tv_anchors=tv_anchors, checkpoint_every=checkpoint_every),
            samplers=_as_text(samplers, "--samplers"), batch_sizes=_as_text(batch_sizes, "--batch-sizes"),
            seeds=_as_text(seeds, "--seeds"), set_pairs=set_pairs, name=name, reference=reference, sort=sort,
            collect=collect, executor=executor, plugins=tuple(str(p) for p in plugins), err=err, warn=warn,
            console=shown)
    return CompareResult(comparison.table, _runs_frame(comparison.records), comparison.folder,
                         tuple(comparison.plots), tuple(failed))


def _compare_folders(runs: list[str], *, out: Path, name: str | None, reference: str | None, sort: str,
                     warn: Warn, console: Console) -> tuple[Any, list[str]]:
    """:func:`compare` of given run folders (no grid): a :class:`negbench.report.Comparison` and
    the failed runs."""
    from negbench import grid as grids
    from negbench import report
    from negbench.config import check_writable
    from negbench.results import collect_dirs

    records = collect_dirs(expand_run_paths(runs), warn)
    if not records:
        raise UserError("none of the given folders holds a readable run; pass run folders (results/runs/<run-id>)")
    tasks = sorted({r.task for r in records})
    name = (tasks[0] if len(tasks) == 1 else "compare") if name is None else name
    folder = report.comparison_folder(out, name)
    check_writable(folder)
    ref = report.check_reference(reference or "in_batch", records, explicit=reference is not None)
    command = command_line([("--out", out, _D.out), ("--name", name, None),
                            ("--reference", reference, None), ("--sort", sort, DEFAULT_SORT)], [])
    command = command.replace("negbench compare", "negbench compare " + " ".join(runs), 1)
    comparison = report.write_comparison(folder, records, reference=ref, sort=sort,
                                         title=report.default_title(records, name), command=command, console=console)
    return comparison, grids.failed_runs(records)


def _compare_grid(base: RunConfig, *, samplers: str | None, batch_sizes: str | None, seeds: str | None,
                  set_pairs: list[str], name: str | None, reference: str | None, sort: str, collect: bool,
                  executor: Any, plugins: tuple[str, ...], err: Console, warn: Warn,
                  console: Console) -> tuple[Any, list[str]]:
    """:func:`compare` of a grid: validate every cell, run the missing ones, aggregate; the
    comparison and the failed runs."""
    from negbench import grid as grids
    from negbench import report
    from negbench.config import check_writable

    task = base.task
    specs = grids.parse_sampler_specs(samplers)
    sizes = grids.parse_batch_sizes(batch_sizes or DEFAULT_BATCH_SIZES)
    seed_list = grids.parse_seeds(seeds or DEFAULT_SEEDS)
    name = task if name is None else name
    folder = report.comparison_folder(base.out, name)
    check_writable(folder)
    ref_label = grids.parse_sampler_spec(reference).label if reference else "in_batch"
    if reference and ref_label not in {s.label for s in specs}:
        raise UserError(f"--reference {reference!r} is not in --samplers; add it or choose one of: "
                        f"{', '.join(s.label for s in specs)}")
    grid = grids.build_grid(base, specs, sizes, seed_list, set_pairs)
    seeds_text = str(len(seed_list)) if seed_list == list(range(len(seed_list))) else ",".join(map(str, seed_list))
    b = base
    command = command_line([
        ("--task", task, None), ("--samplers", ",".join(s.label for s in specs), None),
        ("--batch-sizes", ",".join(map(str, sizes)), None), ("--seeds", seeds_text, None), ("--steps", b.steps, None),
        ("--epochs", b.epochs, None), ("--optimizer", b.optimizer, _D.optimizer), ("--lr", b.lr, None),
        ("--momentum", b.momentum, _D.momentum), ("--weight-decay", b.weight_decay, _D.weight_decay),
        ("--beta", b.beta, _D.beta), ("--device", b.device, _D.device), ("--eval-every", b.eval_every, None),
        ("--out", b.out, _D.out), ("--data-root", b.data_root, None), ("--grad-error", b.grad_error, False),
        ("--tv-steps", b.tv_steps, None), ("--tv-anchors", b.tv_anchors, _D.tv_anchors),
        ("--checkpoint-every", b.checkpoint_every, None), ("--name", name, task),
        ("--reference", reference, None), ("--sort", sort, DEFAULT_SORT),
    ], set_pairs)
    if not collect:
        from negbench.executors import check_reachable

        check_reachable(executor)
        err.print(f"compare: {len(grid.cells)} runs ({len(specs)} samplers × {len(sizes)} batch sizes × "
                  f"{len(seed_list)} seeds) in {b.out}/")
        if not grids.run_grid(grid.cells, err, executor=executor, plugins=plugins):
            raise Interrupted("compare interrupted; rerun the same comparison to resume")
    records = grids.collect_grid(grid, warn)
    ref = report.check_reference(ref_label, records, explicit=reference is not None)
    comparison = report.write_comparison(folder, records, reference=ref, sort=sort,
                                         title=report.default_title(records, name), command=command, console=console)
    return comparison, grids.failed_runs(records, grid)


def load_runs(path_or_glob: Union[PathLike, Sequence[PathLike]], *, warn: Warn | None = None) -> pd.DataFrame:
    """Every metric row of the given run folders as one tidy DataFrame: one row per line of each
    ``metrics.jsonl`` (``step``, ``epoch``, ``samples_seen`` and every metric as columns), with
    the run's configuration joined — ``sampler_label`` (``name[:key=value]`` with the sampler
    parameters that differ from their defaults), the :data:`CONFIG_COLUMNS` of ``config.json``
    (run id, task, sampler, batch size, seed, steps, optimizer, lr, β, ...), ``status`` (from
    ``summary.json``; ``unfinished`` while a run is going or after it was killed) and
    ``run_dir``.

    ``path_or_glob``: a run folder, a folder of run folders (e.g. ``results/runs``), a glob
    (``results/runs/digits-emc2-*``), or a list of them. A folder whose ``config.json`` or
    ``metrics.jsonl`` cannot be read is skipped, after one ``warn`` line (default: a Python
    warning) naming it.

    Raises:
        UserError: a path that matches nothing, or no readable run among the folders.
    """
    import warnings

    report_skip = warn if warn is not None else (lambda message: warnings.warn(message, stacklevel=3))
    given = [path_or_glob] if isinstance(path_or_glob, (str, Path)) else list(path_or_glob)
    if not given:
        raise UserError("load_runs got no path; pass a run folder, a folder of run folders or a glob")
    frames = []
    for run_dir in expand_run_paths([str(p) for p in given]):
        frame = _run_rows(run_dir, report_skip)
        if frame is not None:
            frames.append(frame)
    if not frames:
        raise UserError(f"no readable run folder in {', '.join(map(str, given))}; pass run folders "
                        "(results/runs/<run-id>) holding config.json and metrics.jsonl")
    frames = [f for f in frames if not f.empty] or frames[:1]
    return pd.concat(frames, ignore_index=True, sort=False)


def _run_rows(run_dir: Path, warn: Warn) -> pd.DataFrame | None:
    """The rows of one run folder with its configuration joined, or None (after a warning)."""
    try:
        if not (run_dir / CONFIG).is_file() or not (run_dir / METRICS).is_file():
            raise UserError(f"no {CONFIG if not (run_dir / CONFIG).is_file() else METRICS}")
        config = read_json(run_dir / CONFIG)
        rows = read_rows(run_dir / METRICS)
        summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
        if "sampler" not in config or "task" not in config:
            raise UserError(f"{CONFIG} names no sampler or task")
    except UserError as exc:
        warn(f"skipped {run_dir}: {str(exc).split(';')[0]}")
        return None
    joined = {"sampler_label": sampler_label(config), **{k: config.get(k) for k in CONFIG_COLUMNS},
              "status": summary.get("status", "unfinished"), "run_dir": str(run_dir)}
    if joined["run_id"] is None:
        joined["run_id"] = run_dir.name
    if not rows:
        return pd.DataFrame(columns=list(joined))
    frame = pd.DataFrame(rows)
    config_frame = pd.DataFrame({k: [v] * len(frame) for k, v in joined.items() if k not in frame})
    return pd.concat([config_frame, frame], axis=1)
