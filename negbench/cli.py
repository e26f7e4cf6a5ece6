"""The ``negbench`` command line (DESIGN §6). Every bad input ends as one line on stderr and
exit code 2 (``--debug`` shows the traceback instead).

Exit codes (issue 17; README "Exit codes"): 0 completed, 1 failed (an internal error: one
line on the terminal, the traceback in the run folder's ``error.log``; ``--debug`` raises it),
2 bad input, 3 diverged, 130 interrupted. ``compare`` exits 1 when a cell failed, else 0 (a
diverged cell is a result of the comparison), 130 when interrupted."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from negbench.config import DEFAULT_BATCH_SIZES, DEFAULT_SEEDS, RunConfig, split_set_options, validate_numbers
from negbench.errors import UserError
from negbench.metric_registry import DEFAULT_SORT
from negbench.registry import SAMPLERS, TASKS, Registry, load_plugin, plugin_errors, registered_by

try:  # typer >= 0.22 vendors click; older releases depend on it
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    import click.exceptions as click_exceptions  # type: ignore[no-redef]

#: exit codes (module docstring)
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {"completed": EXIT_OK, "failed": EXIT_FAILED, "diverged": EXIT_DIVERGED, "interrupted": EXIT_INTERRUPTED}

app = typer.Typer(
    name="negbench",
    help="Benchmark negative samplers for contrastive learning on common tasks. Exit codes: 0 completed, "
         "1 failed (traceback in the run folder's error.log), 2 bad input, 3 diverged, 130 interrupted; "
         "compare: 1 when a cell failed.",
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

PLUGIN_HELP = "Python file registering extra samplers/tasks (repeatable)."

# Options shared by `run` and `compare` (and `list`/`bench` for --plugin): one definition each,
# defaults from RunConfig, so the commands cannot drift apart.
_D = RunConfig()
OPTIMIZER = typer.Option(_D.optimizer, help="sgd or adam.")
MOMENTUM = typer.Option(_D.momentum, help="SGD momentum.")
WEIGHT_DECAY = typer.Option(_D.weight_decay, help="Weight decay.")
BETA = typer.Option(_D.beta, help="Inverse temperature β = 1/τ.")
DEVICE = typer.Option(_D.device, help="auto, cpu or cuda.")
EVAL_EVERY = typer.Option(None, help="Steps between metric rows [default: steps/10, at least 10 (a run of <= 10 steps: rows at 0 and at the end)].")
OUT = typer.Option(_D.out, help="Folder of run folders.")
DATA_ROOT = typer.Option(None, help="Data folder of image tasks.")
GRAD_ERROR = typer.Option(False, "--grad-error", help="Record grad_error_sq (one exact gradient per step).")
TV_STEPS = typer.Option(None, help="Probe batches behind sampling_tv at each evaluation (0: off) [default: steps/10, at most 100].")
TV_ANCHORS = typer.Option(_D.tv_anchors, help="Probe anchor items of sampling_tv.")
PLUGIN = typer.Option(None, help=PLUGIN_HELP)
# Where a grid's cells run (negbench.executors): shared by every grid command (compare; rate).
JOBS = typer.Option(None, "--jobs", help="Run the cells in N worker processes on this machine (or a Dask "
                    "LocalCluster of N workers) [default: 1, in this process].")
THREADS_PER_JOB = typer.Option(None, "--threads-per-job", help="torch threads of each cell [default: cores // --jobs].")
BACKEND = typer.Option("local", "--backend", help="local (this machine), dask (a Dask cluster: pip install -e '.[dask]') "
                       "or submitit (a Slurm job array: pip install -e '.[slurm]').")
SCHEDULER = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler, e.g. tcp://host:8786 "
                         "[default: start a LocalCluster of --jobs workers].")
SLURM_PARTITION = typer.Option(None, "--slurm-partition", help="Slurm partition of the job array (--backend submitit).")
SLURM_TIME = typer.Option(None, "--slurm-time", help="Time limit of each cell's job: minutes or [D-]HH:MM[:SS].")
SLURM_GPUS = typer.Option(None, "--slurm-gpus-per-task", help="GPUs of each cell's job.")
SLURM_ARRAY = typer.Option(None, "--slurm-array-parallelism", help="Cells of the job array running at once.")
INIT_LR = typer.Option(_D.init_lr, help="Step size of the --init stationary gradient descent.")
INIT_TOL = typer.Option(_D.init_tol, help="--init stationary stops once ‖∇F‖² is below this ...")
INIT_STEPS = typer.Option(_D.init_steps, help="... or after this many exact gradient steps (then keeps the smallest-gap iterate).")
GRAD_SPLIT = typer.Option(_D.grad_split, help="R >= 2: at each evaluation draw R sampler gradient estimates at the same θ "
                          "and report grad_bias_sq and grad_var (0: off).")
_DEBUG = False  # --debug was given (forwarded to the processes `run --nproc` starts)


def _load_plugins(plugins: Optional[list[Path]], strict: bool = True) -> None:
    """Import the ``--plugin`` files. ``strict`` (every command but ``list``): a plugin file or
    entry point that fails to import is a one-line error (exit 2)."""
    for path in plugins or []:
        load_plugin(path, strict=strict)
    if strict:
        plugin_errors()


def _given(ctx: typer.Context) -> set[str]:
    """Names of the options given on the command line (not left at their default)."""
    given = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.add(name)
    return given


@app.command()
def run(
    ctx: typer.Context,
    sampler: str = typer.Option("emc2", help="Sampler name or alias (`negbench list samplers`)."),
    task: str = typer.Option("digits", help="Task name (`negbench list tasks`)."),
    batch_size: int = typer.Option(32, help="Items per step B (2B anchors)."),
    steps: Optional[int] = typer.Option(None, help="Training steps [default: 1000]."),
    epochs: Optional[float] = typer.Option(None, help="Training length in epochs (instead of --steps)."),
    optimizer: str = OPTIMIZER,
    lr: Optional[float] = typer.Option(None, help="Learning rate [default: 0.1 for sgd, 1e-3 for adam]; 0 freezes θ."),
    momentum: float = MOMENTUM,
    weight_decay: float = WEIGHT_DECAY,
    beta: float = BETA,
    seed: Optional[int] = typer.Option(None, help="Base seed [default: a random one, printed]."),
    device: str = DEVICE,
    eval_every: Optional[int] = EVAL_EVERY,
    out: Path = OUT,
    data_root: Optional[Path] = DATA_ROOT,
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Sampler/task parameter key=value (repeatable)."),
    grad_error: bool = GRAD_ERROR,
    tv_steps: Optional[int] = TV_STEPS,
    tv_anchors: int = TV_ANCHORS,
    plugin: Optional[list[Path]] = PLUGIN,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    nproc: int = typer.Option(1, "--nproc", help="Train with this many processes on this machine, started with "
                              "torchrun (gloo on CPU, nccl on CUDA: one GPU each); --batch-size is the global "
                              "batch and must be divisible by it."),
    preset: Optional[str] = typer.Option(
        None, help="Defaults of a published configuration: paper-stl10, paper-stl10-subset (explicit options win)."
    ),
    max_items: Optional[int] = typer.Option(
        None, help="Train on the first N items only, and cap each probe split at N (quick runs)."
    ),
    download: bool = typer.Option(False, "--download", help="Let the task download missing data (STL-10) where a network exists."),
    checkpoint_every: Optional[int] = typer.Option(
        None, help="Steps between checkpoints [default: one at each metric row]; SIGINT/SIGTERM also checkpoint. Rerun the same command to resume."
    ),
    init: str = typer.Option(_D.init, help="random (the seed's initialisation) or stationary (exact gradient descent on F "
                             "from it first, cached in <out>/.init)."),
    init_lr: float = INIT_LR,
    init_tol: float = INIT_TOL,
    init_steps: int = INIT_STEPS,
    grad_split: int = GRAD_SPLIT,
) -> None:
    """Train one sampler on one task and write results/runs/<run-id>/ (rerunning the same
    command resumes an interrupted run and skips a finished one). Exit code 0 completed, 1
    failed, 2 bad input, 3 diverged, 130 interrupted."""
    options = dict(
        sampler=sampler, task=task, batch_size=batch_size, steps=steps, epochs=epochs,
        optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, beta=beta,
        seed=seed, device=device, eval_every=eval_every, out=out, data_root=data_root,
        grad_error=grad_error, tv_steps=tv_steps, tv_anchors=tv_anchors, max_items=max_items,
        download=download, preset=preset, checkpoint_every=checkpoint_every,
        init=init, init_lr=init_lr, init_tol=init_tol, init_steps=init_steps, grad_split=grad_split,
    )
    pairs = list(set_ or [])
    if preset is None:  # before any heavy import: a bad number is a one-line error at once
        validate_numbers(RunConfig(**options))
    from negbench import distributed
    from negbench.runner import run as run_one, summary_table

    _load_plugins(plugin)
    if preset is not None:
        from negbench.presets import apply_preset

        options, pairs = apply_preset(preset, options, _given(ctx), pairs)
    sampler_params, task_params = split_set_options(pairs, options["sampler"], options["task"])
    config = RunConfig(**options, sampler_params=sampler_params, task_params=task_params)
    if nproc != 1:
        raise typer.Exit(_launch(ctx, config, nproc))
    outcome = run_one(config, show_progress=not quiet)
    if distributed.is_main():
        console = Console()
        console.print(summary_table(outcome.summary, outcome.run_dir.name))
        # on its own line, never wrapped: a path copied from a log must stay whole
        console.print(f"results: {outcome.run_dir}", soft_wrap=True, highlight=False, markup=False)
    code = EXIT_CODES.get(outcome.summary["status"], EXIT_OK)
    if code != EXIT_OK:
        raise typer.Exit(code)


def _launch(ctx: typer.Context, config: RunConfig, nproc: int) -> int:
    """``negbench run --nproc N``: validate here (one-line errors, nothing started), then rerun
    the same command without ``--nproc`` as N processes under torchrun; returns its exit code."""
    import torch

    from negbench import distributed
    from negbench.config import resolve_device
    from negbench.runner import prepare

    if nproc < 1:
        raise UserError(f"--nproc must be a positive integer, got {nproc}")
    if distributed.launched_by_torchrun():
        raise UserError("--nproc starts torchrun itself; under torchrun leave --nproc out")
    distributed.check_batch_size(config.batch_size, nproc)
    if resolve_device(config.device).type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(
            f"--nproc {nproc} needs {nproc} GPUs but {torch.cuda.device_count()} are visible; "
            "use fewer processes or --device cpu"
        )
    prepare(config)
    return distributed.launch(nproc, _forwarded_args(ctx, drop={"nproc"}))


def _forwarded_args(ctx: typer.Context, drop: set[str]) -> list[str]:
    """The command line of ``ctx`` as the user gave it (options left at their defaults are
    omitted), without the parameters named in ``drop``."""
    args = [ctx.info_name or ""]
    given = _given(ctx) - drop
    for param in ctx.command.params:
        name = param.name or ""
        if name not in given:
            continue
        value = ctx.params[name]
        flag = param.opts[0]
        if getattr(param, "is_flag", False):
            if value:
                args.append(flag)
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
            continue
        for item in value if getattr(param, "multiple", False) else [value]:
            args += [flag, str(item)]
    if _DEBUG:
        args.append("--debug")
    return args


@app.command()
def compare(
    runs: Optional[list[str]] = typer.Argument(None, help="Run folders, folders of run folders, or globs to compare instead of a grid.", show_default=False),
    task: Optional[str] = typer.Option(None, help=f"Task of the grid [default: {_D.task}]."),
    samplers: Optional[str] = typer.Option(None, help="Comma-separated samplers, each name[:key=value[:key=value]] (e.g. emc2,emc2:stale=refresh); all = every registered sampler plus the variants it declares (emc2:stale=refresh) [default: all]."),
    batch_sizes: Optional[str] = typer.Option(None, help=f"Comma-separated batch sizes [default: {DEFAULT_BATCH_SIZES}]."),
    seeds: Optional[str] = typer.Option(None, help=f"A count n (seeds 0..n-1) or a comma-separated list of seeds (5, = seed 5 alone) [default: {DEFAULT_SEEDS}]."),
    steps: Optional[int] = typer.Option(None, help="Training steps of every run [default: 1000]."),
    epochs: Optional[float] = typer.Option(None, help="Training length in epochs (instead of --steps)."),
    optimizer: str = OPTIMIZER,
    lr: Optional[float] = typer.Option(None, help="Learning rate [default: 0.1 for sgd, 1e-3 for adam]."),
    momentum: float = MOMENTUM,
    weight_decay: float = WEIGHT_DECAY,
    beta: float = BETA,
    device: str = DEVICE,
    eval_every: Optional[int] = EVAL_EVERY,
    out: Path = OUT,
    data_root: Optional[Path] = DATA_ROOT,
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Task parameter, or parameter of every sampler of the grid that has it, key=value (repeatable)."),
    grad_error: bool = GRAD_ERROR,
    tv_steps: Optional[int] = TV_STEPS,
    tv_anchors: int = TV_ANCHORS,
    plugin: Optional[list[Path]] = PLUGIN,
    name: Optional[str] = typer.Option(None, help="Comparison folder <out>/../NAME, i.e. results/NAME (or an absolute path) [default: the task]."),
    reference: Optional[str] = typer.Option(None, help="Sampler the paired ratios divide by [default: in_batch when compared]."),
    sort: str = typer.Option(DEFAULT_SORT, help="Metric the table is sorted by, best first (`negbench list --metrics`)."),
    collect: bool = typer.Option(False, "--collect", help="Only aggregate the runs that exist; train nothing."),
    checkpoint_every: Optional[int] = typer.Option(
        None, help="Steps between checkpoints [default: one at each metric row]; SIGINT/SIGTERM also checkpoint. Rerun the same command to resume."
    ),
    jobs: Optional[int] = JOBS,
    threads_per_job: Optional[int] = THREADS_PER_JOB,
    backend: str = BACKEND,
    scheduler: Optional[str] = SCHEDULER,
    slurm_partition: Optional[str] = SLURM_PARTITION,
    slurm_time: Optional[str] = SLURM_TIME,
    slurm_gpus_per_task: Optional[int] = SLURM_GPUS,
    slurm_array_parallelism: Optional[int] = SLURM_ARRAY,
) -> None:
    """Run the missing cells of a samplers × batch sizes × seeds grid (finished runs are
    skipped, interrupted ones resumed), then aggregate over seeds into results/NAME/:
    table.csv, table.md and PNG plots. Exit code 1 when a run failed (a diverged run is a result: 0),
    2 bad input, 130 interrupted."""
    from negbench import api

    err = Console(stderr=True)
    try:
        result = api.compare(
            runs or None, task=task, samplers=samplers, batch_sizes=batch_sizes, seeds=seeds, steps=steps,
            epochs=epochs, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, beta=beta,
            device=device, eval_every=eval_every, out=out, data_root=data_root, params=set_ or [],
            grad_error=grad_error, tv_steps=tv_steps, tv_anchors=tv_anchors, plugins=plugin or (), name=name,
            reference=reference, sort=sort, collect=collect, checkpoint_every=checkpoint_every, jobs=jobs,
            threads_per_job=threads_per_job, backend=backend, scheduler=scheduler, slurm_partition=slurm_partition,
            slurm_time=slurm_time, slurm_gpus_per_task=slurm_gpus_per_task,
            slurm_array_parallelism=slurm_array_parallelism, console=err, table_console=Console(),
        )
    except api.Interrupted:
        err.print("compare: interrupted; rerun the same command to resume")
        raise typer.Exit(130) from None
    err.print(f"comparison written to {result.folder}/", soft_wrap=True, highlight=False)
    if result.failed:
        err.print(f"compare: {len(result.failed)} of {len(result.runs)} runs failed ({', '.join(result.failed)}); "
                  "exit code 1", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)


@app.command()
def rate(
    task: str = typer.Option("digits", help="Task of the study (finite views: the exact gradient)."),
    samplers: str = typer.Option("in_batch,emc2,emc2:stale=refresh,sogclr,importance,full_softmax",
                                 help="Comma-separated samplers, each name[:key=value[:key=value]]."),
    batch_sizes: str = typer.Option("4,32", help="Comma-separated batch sizes."),
    horizons: str = typer.Option("400,1600,6400", help="Comma-separated, increasing horizons T (steps of a run; at least two)."),
    seeds: str = typer.Option("5", help="A count n (seeds 0..n-1) or a comma-separated list of seeds."),
    lr_scale: float = typer.Option(10.0, help="c of the SGD step size η_T = c/√T (with --step-size constant: η = c)."),
    step_size: str = typer.Option("sqrt", help="sqrt (η_T = c/√T, the theorem's) or constant (η = c for every T)."),
    evals: int = typer.Option(16, help="Evenly spaced evaluations of the exact gap per run (every ⌊T/evals⌋ steps)."),
    init: str = typer.Option("stationary", help="stationary (warm start: exact gradient descent on F, cached per task, "
                             "encoder and seed) or random (cold start)."),
    init_lr: float = INIT_LR,
    init_tol: float = INIT_TOL,
    init_steps: int = INIT_STEPS,
    grad_split: int = GRAD_SPLIT,
    momentum: float = MOMENTUM,
    beta: float = BETA,
    device: str = DEVICE,
    out: Path = OUT,
    data_root: Optional[Path] = DATA_ROOT,
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Task parameter, or parameter of every sampler of the grid that has it, key=value (repeatable)."),
    tv_steps: int = typer.Option(0, help="Probe batches behind sampling_tv at each evaluation (0: off, the default here)."),
    tv_anchors: int = TV_ANCHORS,
    threads: int = typer.Option(1, help="torch CPU threads (1: the tiny steps of a small encoder are bound by thread "
                                "synchronisation, and several grids or jobs share the cores)."),
    plugin: Optional[list[Path]] = PLUGIN,
    name: Optional[str] = typer.Option(None, help="Study folder <out>/../NAME [default: rate/<task>]."),
    collect: bool = typer.Option(False, "--collect", help="Only aggregate the runs that exist; train nothing."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints [default: one at each metric row]."),
    jobs: Optional[int] = JOBS,
    threads_per_job: Optional[int] = THREADS_PER_JOB,
    backend: str = BACKEND,
    scheduler: Optional[str] = SCHEDULER,
) -> None:
    """Convergence-rate study: samplers × batch sizes × horizons T × seeds of SGD at η_T = c/√T
    (finished runs skipped, interrupted ones resumed); per sampler and batch size the slope of
    log(run-average ‖∇F‖²) on log T with its 95% interval and a verdict (falls / plateau /
    unclear), into results/rate/<task>/: table.md, CSVs and a log–log plot per batch size."""
    from negbench import grid as grids
    from negbench import rate as study
    from negbench import report
    from negbench.executors import ExecutorOptions
    from negbench.threads import limit_threads
    from negbench.config import check_writable

    _load_plugins(plugin)
    err = Console(stderr=True)

    def warn(message: str) -> None:
        err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True, highlight=False)

    if threads < 1:
        raise UserError(f"--threads must be a positive integer, got {threads}")
    study.check_task(task)
    horizon_list = study.parse_horizons(horizons)
    schedule = study.Schedule(lr_scale, step_size, evals)
    schedule.check(horizon_list)
    specs = grids.parse_sampler_specs(samplers)
    sizes = grids.parse_batch_sizes(batch_sizes)
    seed_list = grids.parse_seeds(seeds)
    name = f"rate/{task}" if name is None else name
    folder = report.comparison_folder(out, name)
    check_writable(folder)
    base = RunConfig(task=task, momentum=momentum, beta=beta, device=device, out=out, data_root=data_root,
                     tv_steps=tv_steps, tv_anchors=tv_anchors, checkpoint_every=checkpoint_every, init=init,
                     init_lr=init_lr, init_tol=init_tol, init_steps=init_steps, grad_split=grad_split)
    grid = study.build(base, specs, sizes, horizon_list, seed_list, schedule, set_ or [])
    from negbench.api import command_line

    command = command_line([
        ("--task", task, None), ("--samplers", ",".join(s.label for s in specs), None),
        ("--batch-sizes", ",".join(map(str, sizes)), None), ("--horizons", ",".join(map(str, horizon_list)), None),
        ("--seeds", seeds, None), ("--lr-scale", lr_scale, 10.0), ("--step-size", step_size, "sqrt"),
        ("--evals", evals, 16), ("--init", init, "stationary"), ("--init-lr", init_lr, _D.init_lr),
        ("--init-tol", init_tol, _D.init_tol), ("--init-steps", init_steps, _D.init_steps),
        ("--grad-split", grad_split, 0), ("--momentum", momentum, 0.0), ("--beta", beta, 5.0),
        ("--device", device, "auto"), ("--out", out, Path("results/runs")), ("--data-root", data_root, None),
        ("--tv-steps", tv_steps, 0), ("--tv-anchors", tv_anchors, 8), ("--name", name, f"rate/{task}"),
    ], set_ or [], command="rate")
    if not collect:
        err.print(f"rate: {len(grid.cells)} runs ({len(specs)} samplers × {len(sizes)} batch sizes × "
                  f"{len(horizon_list)} horizons × {len(seed_list)} seeds) in {out}/")
        executor = ExecutorOptions(backend=backend, jobs=jobs, threads_per_job=threads_per_job, scheduler=scheduler,
                                   folder=out / ".submitit").validate()
        with limit_threads(threads):  # torch's and the BLAS pools of the cells run in this process
            finished = grids.run_grid(grid.cells, err, title="rate", executor=executor,
                                      plugins=[str(p) for p in plugin or ()])
        if not finished:
            err.print("rate: interrupted; rerun the same command to resume")
            raise typer.Exit(130)
    records = study.collect(grid, warn)
    study.write(folder, records, title=name, command=command, console=Console())
    err.print(f"rate study written to {folder}/")


def _component_table(registry: Registry[Any], title: str) -> Table:
    table = Table(title=title, show_lines=True)
    table.add_column("name")
    table.add_column("description")
    table.add_column("parameters (default)")
    for name in registry.names():
        cls = registry.get_class(name)
        if getattr(cls, "hidden", False):
            continue
        label = name + "".join(f"\n(alias {a})" for a in getattr(cls, "aliases", ()))
        params = "\n".join(f"{k}={spec.default!r}  {spec.help} [{spec.describe()}]" for k, spec in cls.params.items())
        notes = []
        if getattr(cls, "requires_finite_views", False):
            notes.append("finite-view tasks only")
        if getattr(cls, "finite_views", None) is not None:
            notes.append("finite views" if cls.finite_views else "random augmentations")
        description = cls.description + (f" ({'; '.join(notes)})" if notes else "")
        table.add_row(label, escape(description), escape(params) or "-")  # "[float in (0, 1]" is not markup
    for name, error in sorted(registry.failures.items()):
        table.add_row(f"[red]{name}[/red]", f"[red]failed to import: {error}[/red]", "-")
    return table


def _metric_table() -> Table:
    """Every metric of the registry (the samplers' diagnostics included), in table order."""
    from negbench.metric_registry import all_metrics

    table = Table(title="metrics", show_lines=False)
    for column in ("name", "description", "better", "where it applies"):
        table.add_column(column)
    for metric in all_metrics():
        table.add_row(metric.name, escape(metric.description), f"{metric.better} {metric.arrow}", escape(metric.applies))
    return table


@app.command("list")
def list_(
    what: str = typer.Argument("all", help="samplers, tasks, metrics or all."),
    metrics: bool = typer.Option(False, "--metrics", help="List the metrics (name, meaning, better direction, where each applies)."),
    plugin: Optional[list[Path]] = PLUGIN,
) -> None:
    """List the registered samplers and tasks with their parameters (--metrics: the metrics)."""
    if what not in ("samplers", "tasks", "metrics", "all"):
        raise UserError(f"`negbench list` takes samplers, tasks, metrics or all, got {what!r}")
    _load_plugins(plugin, strict=False)  # list is where a broken plugin is shown, not an error
    console = Console()
    if metrics or what == "metrics":
        console.print(_metric_table())
        return
    if what in ("samplers", "all"):
        console.print(_component_table(SAMPLERS, "samplers"))
    if what in ("tasks", "all"):
        console.print(_component_table(TASKS, "tasks"))


@app.command()
def check(
    plugins: Optional[list[Path]] = typer.Argument(None, help="Plugin files (PLUGIN.py) whose samplers and tasks to check [default: every registered one].", show_default=False),
) -> None:
    """Run the conformance suite on a plugin's samplers and tasks: one verdict line per check
    (PASS, FAIL with the reason, SKIP with why); exit 0 when none fails, 1 otherwise."""
    from negbench.conformance import run_suite

    if plugins:
        for path in plugins:  # a failure of an earlier load of the same file is not this one's
            SAMPLERS.failures.pop(path.name, None)
            TASKS.failures.pop(path.name, None)
        _load_plugins(plugins)  # one that fails to import: a one-line error, exit 2 (issue 17)
        samplers, tasks = [], []
        for path in plugins:
            mine = registered_by(path)
            samplers += mine[0]
            tasks += mine[1]
        if not samplers and not tasks:
            raise UserError(f"{', '.join(map(str, plugins))} registers no sampler or task; decorate a class with "
                            "@register_sampler(\"name\") or @register_task(\"name\")")
    else:
        samplers, tasks = SAMPLERS.names(), TASKS.names()
    verdicts = run_suite(samplers, tasks)
    for verdict in verdicts:
        print(verdict.line(), flush=True)
    failed = [v for v in verdicts if v.status == "fail"]
    counts = {s: sum(v.status == s for v in verdicts) for s in ("pass", "fail", "skip")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
          + (": " + "; ".join(f"{v.check.kind} {v.name} {v.check.id}" for v in failed) if failed else ""))
    if failed:
        raise typer.Exit(1)


@app.command()
def bench(
    device: str = DEVICE,
    samplers: Optional[str] = typer.Option(None, help="Comma-separated samplers, each name[:key=value[:key=value]] (e.g. emc2:kernel=reference) [default: every registered one plus emc2:kernel=reference]; in_batch is always measured."),
    batch_sizes: str = typer.Option("32,256,1024", help="Items per step B of the sampler-only part (comma-separated)."),
    num_items: str = typer.Option("10000,1000000", help="Data-set sizes N of the sampler-only part (comma-separated)."),
    dim: int = typer.Option(128, help="Embedding dimension d of the sampler-only part."),
    repeats: int = typer.Option(10, help="Timed repetitions per measurement (after the warm-up)."),
    warmup: int = typer.Option(3, help="Untimed repetitions first."),
    part: str = typer.Option("all", help="all, sampler (sampler-only cost) or step (training-step time)."),
    workloads: str = typer.Option(",".join(["digits-mlp", "resnet18-32px", "resnet18-96px"]), help="Workloads of the step part (comma-separated)."),
    step_batch_size: int = typer.Option(256, help="Items per training step in the step part."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads [default: torch's choice]."),
    smoke: bool = typer.Option(False, "--smoke", help="A tiny configuration that runs in seconds (tests); replaces the sizes, repeats and warm-up."),
    out: Path = typer.Option(Path("results/bench"), help="Folder of bench-<device>.csv and .json."),
    plugin: Optional[list[Path]] = PLUGIN,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Time every sampler: sampler-only cost per step, and training-step time against in_batch."""
    from negbench.bench import BenchConfig, parse_int_list, run_bench

    _load_plugins(plugin)
    config = BenchConfig(
        device=device,
        samplers=[s.strip() for s in samplers.split(",") if s.strip()] if samplers else None,
        batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
        num_items=parse_int_list(num_items, "--num-items"),
        dim=dim, repeats=repeats, warmup=warmup, part=part,
        workloads=[w.strip() for w in workloads.split(",") if w.strip()],
        step_batch_size=step_batch_size, threads=threads, smoke=smoke, out=out,
    )
    outcome = run_bench(config, show_progress=not quiet)
    console = Console()
    if not console.is_terminal:  # a file or a pipe: don't squeeze the tables into 80 columns
        console = Console(width=160)
    for table in outcome.tables:
        console.print(table)
    console.print(f"wrote {outcome.csv_path} and {outcome.json_path}")


def _rank_label() -> str:
    """``[rank r] `` in the processes of a multi-process run other than rank 0."""
    distributed = sys.modules.get("negbench.distributed")  # not loaded: a single process, and torch stays unloaded
    return f"[rank {distributed.rank()}] " if distributed is not None and distributed.rank() > 0 else ""


#: a word of an error message longer than this is cut (a 100 KB --set value is not echoed whole)
LONGEST_WORD = 120


def _one_line(text: str) -> str:
    """``text`` on one line, each overlong word cut to its start and its length."""
    words = [w if len(w) <= LONGEST_WORD else f"{w[:40]}… ({len(w)} characters)" for w in text.split()]
    return " ".join(words)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app, turning every expected error into one line and exit code 2."""
    global _DEBUG
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _DEBUG = "--debug" in args
    if debug:
        args.remove("--debug")
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="negbench", standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        print(f"negbench: error: {_rank_label()}{_one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except click_exceptions.NoArgsIsHelpError as exc:
        print(exc.format_message(), file=sys.stderr)
        sys.exit(2)
    except click_exceptions.UsageError as exc:
        if debug:
            raise
        hint = f" (see `negbench {exc.ctx.info_name} --help`)" if exc.ctx and exc.ctx.info_name != "negbench" else " (see `negbench --help`)"
        print(f"negbench: error: {_one_line(exc.format_message())}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("negbench: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # an internal error: one line, the traceback kept (runner.run writes it)
        if debug:
            raise
        log = getattr(exc, "negbench_log", None)
        where = f" (traceback in {log}; --debug shows it)" if log else " (rerun with --debug for the traceback)"
        text = getattr(exc, "negbench_message", None) or f"{type(exc).__name__}: {exc}"
        print(f"negbench: error: {_rank_label()}{_one_line(text)}{where}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    sys.exit(code if isinstance(code, int) else 0)
