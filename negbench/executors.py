"""Where the cells of a grid run (issue 16): in this process, in N local worker processes, on a
Dask cluster, or as a Slurm job array through submitit — on existing engines, not a scheduler
of our own. :func:`run_cells` takes a list of payloads and a per-cell callable and yields each
cell's :class:`Finished` as it finishes, in any order. Results do not depend on the backend:
a cell is a pure function of its payload (a run's seeds derive from its config alone).

- ``local``, ``jobs = 1``: the cells run here, one after another (no subprocess at all).
- ``local``, ``jobs = N > 1``: :class:`concurrent.futures.ProcessPoolExecutor` with the
  *spawn* start method. Spawn, not fork: a forked child inherits torch's OpenMP thread pool
  in an undefined state (a known deadlock), and spawn is the only start method that behaves
  the same on Linux and macOS. The standard library over joblib-loky: what is needed here —
  results as they finish (``wait(FIRST_COMPLETED)``), one worker per cell at a time, a
  dead-worker error — it has, with no extra dependency; loky's extras (reusable executors,
  cloudpickled closures) are not used by a grid of module-level calls. Each worker sets
  ``torch.set_num_threads(threads)`` with ``threads`` = ``cores // N`` by default, so
  N × threads ≤ cores, and caps NumPy's BLAS pool to the same count (:mod:`negbench.threads`:
  its idle threads spin and, uncapped, took the cores from the other workers). At most N
  cells are in flight, so every submitted cell is running.
  A worker that dies (SIGKILL, the OOM killer) breaks the pool: every cell in flight is
  resubmitted once to a fresh pool (resuming from its checkpoint); a cell in flight at a
  second break is reported failed, and the next run of the grid resumes it.
- ``dask``: ``distributed.Client(scheduler)``, or a ``LocalCluster`` of ``jobs`` single-thread
  worker processes when no scheduler is given. Dask retries a cell whose worker died.
- ``submitit``: ``submitit.AutoExecutor`` — Slurm when ``sbatch`` is found (else submitit's
  local executor), one job-array task per cell; finished jobs are polled.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from negbench.errors import UserError
from negbench.threads import limit_threads

BACKENDS = ("local", "dask", "submitit")
#: how long a Dask client waits for the scheduler before giving up
CONNECT_TIMEOUT_S = 5.0
#: breaks of the local pool a cell may be in flight for before it is reported failed
MAX_ATTEMPTS = 2
#: seconds between two polls of submitit's job states
POLL_S = 2.0
EXTRAS = {"dask": ("distributed", "dask"), "submitit": ("submitit", "slurm")}
DIED = ("its worker process died (killed, or out of memory) while it ran; rerun the same command to resume it "
        "from its checkpoint")


def cores() -> int:
    """CPU cores this process may run on."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ExecutorOptions:
    """How the cells of a grid are executed; shared by every grid command (``compare``, and
    ``rate`` to come). ``None`` means unset: :meth:`validate` checks the combination and
    resolves the defaults."""

    backend: str = "local"
    jobs: int | None = None  # local worker processes, or LocalCluster workers [default 1]
    threads_per_job: int | None = None  # torch threads per cell [default cores // jobs locally]
    scheduler: str | None = None  # address of a running Dask scheduler
    slurm_partition: str | None = None
    slurm_time: str | None = None  # minutes, or [D-]HH:MM[:SS]
    slurm_gpus_per_task: int | None = None
    slurm_array_parallelism: int | None = None
    folder: Path | None = None  # submitit's logs and pickles [default <out>/.submitit]
    cluster: str | None = None  # submitit executor: None = auto (slurm if found, else local); tests: local

    def validate(self) -> "ExecutorOptions":
        """The options with defaults resolved, or a :class:`UserError` naming the problem and
        the fix. Touches nothing (connecting to a scheduler waits for :func:`run_cells`)."""
        if self.backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        slurm = [flag for flag, value in (
            ("--slurm-partition", self.slurm_partition), ("--slurm-time", self.slurm_time),
            ("--slurm-gpus-per-task", self.slurm_gpus_per_task),
            ("--slurm-array-parallelism", self.slurm_array_parallelism)) if value is not None]
        if slurm and self.backend != "submitit":
            raise UserError(f"{', '.join(slurm)} only apply to Slurm; add --backend submitit or leave them out")
        if self.scheduler is not None and self.backend != "dask":
            raise UserError("--scheduler is the address of a Dask scheduler; add --backend dask or leave it out")
        limit = 4 * cores()
        if self.jobs is not None and not 1 <= self.jobs <= limit:
            raise UserError(f"--jobs must be between 1 and {limit} (4 × the {cores()} cores), got {self.jobs}")
        if self.jobs is not None and (self.backend == "submitit" or self.scheduler is not None):
            where = "--slurm-array-parallelism" if self.backend == "submitit" else "the cluster's workers"
            raise UserError(f"--jobs sets local worker processes; with --backend {self.backend}"
                            f"{' --scheduler' if self.scheduler else ''} use {where} instead, or leave --jobs out")
        if self.threads_per_job is not None and self.threads_per_job < 1:
            raise UserError(f"--threads-per-job must be a positive integer, got {self.threads_per_job}")
        for flag, value in (("--slurm-gpus-per-task", self.slurm_gpus_per_task),
                            ("--slurm-array-parallelism", self.slurm_array_parallelism)):
            if value is not None and value < (0 if flag == "--slurm-gpus-per-task" else 1):
                raise UserError(f"{flag} must be a {'non-negative' if 'gpus' in flag else 'positive'} integer, got {value}")
        if self.slurm_time is not None:
            slurm_minutes(self.slurm_time)
        if self.backend in EXTRAS:
            module, extra = EXTRAS[self.backend]
            if find_spec(module) is None:
                raise UserError(f"--backend {self.backend} needs the optional extra {extra!r}: "
                                f"pip install -e '.[{extra}]' (or pip install 'negbench[{extra}]')")
        jobs = 1 if self.jobs is None and self.backend != "submitit" and self.scheduler is None else self.jobs
        threads = self.threads_per_job
        if threads is None and jobs is not None and (jobs > 1 or self.backend == "dask"):
            threads = max(1, cores() // jobs)
        return replace(self, jobs=jobs, threads_per_job=threads)

    @property
    def in_process(self) -> bool:
        """Whether the cells run in this process (``local`` with one job)."""
        return self.backend == "local" and (self.jobs or 1) == 1

    def describe(self) -> str:
        if self.in_process:
            return "in this process"
        threads = f", {self.threads_per_job} torch thread(s) each" if self.threads_per_job else ""
        if self.backend == "local":
            return f"{self.jobs} local worker processes{threads}"
        if self.backend == "dask":
            where = f"Dask scheduler {self.scheduler}" if self.scheduler else f"a Dask LocalCluster of {self.jobs} workers"
            return where + threads
        return f"submitit ({self.cluster or 'auto: slurm if sbatch is found, else local'}){threads}"


def slurm_minutes(text: str) -> int:
    """``--slurm-time``: minutes (``90``) or Slurm's ``[D-]HH:MM[:SS]`` → whole minutes (≥ 1)."""
    error = UserError(f"--slurm-time expects minutes or [D-]HH:MM[:SS], got {text!r}; e.g. --slurm-time 120 or 02:00:00")
    days, dash, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if dash and not days:
        raise error
    try:
        numbers = [int(p) for p in parts]
        day_count = int(days) if days else 0
    except ValueError:
        raise error from None
    if len(numbers) == 1 and not days:
        minutes = numbers[0]
    elif len(numbers) in (2, 3):
        hours, mins, secs = (numbers + [0])[:3]
        minutes = day_count * 1440 + hours * 60 + mins + (1 if secs else 0)
    else:
        raise error
    if minutes < 1 or any(n < 0 for n in numbers) or day_count < 0:
        raise error
    return minutes


@dataclass
class Finished:
    """One cell done: ``value`` is what the callable returned; ``error`` says why there is
    none (it raised, or its worker died)."""

    index: int
    value: Any = None
    error: str | None = None


# ---- what runs in a worker -------------------------------------------------------------------

_loaded_plugins: set[str] = set()


def _invoke(fn: Callable[[Any], Any], payload: Any, threads: int | None, plugins: tuple[str, ...]) -> Any:
    """A cell, in whichever process runs it: load the plugins the grid was given (once per
    process), cap torch's and the BLAS thread pools (:func:`negbench.threads.limit_threads`),
    call ``fn``."""
    from negbench.registry import load_plugin

    for path in plugins:
        if path not in _loaded_plugins:
            load_plugin(path)
            _loaded_plugins.add(path)
    with limit_threads(threads):
        return fn(payload)


def _local_worker_init() -> None:
    """A local worker ignores SIGINT between cells: Ctrl-C reaches the whole process group, and
    the run in progress (which installs its own handler) checkpoints and stops by itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _error_text(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# ---- the backends -------------------------------------------------------------------------

def run_cells(payloads: Sequence[Any], fn: Callable[[Any], Any], options: ExecutorOptions, *,
              plugins: Sequence[str | Path] = (), in_process_fn: Callable[[Any], Any] | None = None,
              ) -> Iterator[Finished]:
    """Run ``fn(payload)`` for every payload on the backend of ``options`` (validated first)
    and yield a :class:`Finished` per cell as it finishes. ``fn`` must be a module-level
    function (it is pickled by reference) whose payload and return value pickle; an exception
    it raises becomes the cell's ``error``. ``in_process_fn`` replaces ``fn`` when the cells
    run in this process. On Ctrl-C the cells in flight are collected (they checkpoint and
    stop) and :class:`KeyboardInterrupt` is raised again."""
    options = options.validate()
    plugin_paths = tuple(str(Path(p).resolve()) for p in plugins)
    if options.in_process:
        yield from _run_here(payloads, in_process_fn or fn, options.threads_per_job)
    elif options.backend == "local":
        yield from _run_pool(payloads, fn, options, plugin_paths)
    elif options.backend == "dask":
        yield from _run_dask(payloads, fn, options, plugin_paths)
    else:
        yield from _run_submitit(payloads, fn, options, plugin_paths)


def _run_here(payloads: Sequence[Any], fn: Callable[[Any], Any], threads: int | None) -> Iterator[Finished]:
    for index, payload in enumerate(payloads):
        try:
            with limit_threads(threads):
                value = fn(payload)
        except Exception as exc:  # a failing cell is a result, not a crash of the grid
            yield Finished(index, error=_error_text(exc))
        else:
            yield Finished(index, value)


def _run_pool(payloads: Sequence[Any], fn: Callable[[Any], Any], options: ExecutorOptions,
              plugins: tuple[str, ...]) -> Iterator[Finished]:
    """N spawned workers, at most N cells in flight (module docstring)."""
    jobs = options.jobs or 1
    context = multiprocessing.get_context("spawn")
    queue = deque(range(len(payloads)))
    breaks: Counter[int] = Counter()
    in_flight: dict[Future, int] = {}
    pool: ProcessPoolExecutor | None = None
    interrupted = False
    try:
        while queue or in_flight:
            if pool is None:
                pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_local_worker_init)
            while queue and len(in_flight) < jobs and not interrupted:
                index = queue.popleft()
                in_flight[pool.submit(_invoke, fn, payloads[index], options.threads_per_job, plugins)] = index
            if not in_flight:
                break
            try:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:  # the workers got it too: their runs checkpoint and return
                interrupted = True
                continue
            broken = any(isinstance(f.exception(), BrokenProcessPool) for f in done)
            settle = list(in_flight) if broken else list(done)  # a broken pool fails every future
            for future in settle:
                index = in_flight.pop(future)
                exc = future.exception()
                if isinstance(exc, BrokenProcessPool):
                    breaks[index] += 1
                    if breaks[index] < MAX_ATTEMPTS and not interrupted:
                        queue.appendleft(index)
                    else:
                        yield Finished(index, error=DIED)
                elif exc is not None:
                    yield Finished(index, error=_error_text(exc))
                else:
                    yield Finished(index, future.result())
            if broken:
                pool.shutdown(wait=True)
                pool = None
    finally:
        if pool is not None:
            for future in in_flight:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
    if interrupted:
        raise KeyboardInterrupt


def _dask_client(address: str) -> Any:
    """A client of the scheduler at ``address``, or a one-line :class:`UserError` within
    :data:`CONNECT_TIMEOUT_S` seconds."""
    import distributed

    try:
        return distributed.Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        raise UserError(f"--scheduler {address}: no Dask scheduler answered within {CONNECT_TIMEOUT_S:g} s "
                        f"({_error_text(exc)}); check the address (tcp://HOST:8786) or leave --scheduler out "
                        "for a LocalCluster") from None


def check_reachable(options: ExecutorOptions) -> None:
    """Fail now, before any output or work, when ``--scheduler`` does not answer."""
    if options.backend == "dask" and options.scheduler:
        _dask_client(options.scheduler).close()


def _run_dask(payloads: Sequence[Any], fn: Callable[[Any], Any], options: ExecutorOptions,
              plugins: tuple[str, ...]) -> Iterator[Finished]:
    import distributed

    with contextlib.ExitStack() as stack:
        if options.scheduler:
            client = _dask_client(options.scheduler)
        else:
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=options.jobs, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.ERROR))
            client = distributed.Client(cluster)
        stack.enter_context(client)
        futures = {client.submit(_invoke, fn, payload, options.threads_per_job, plugins, pure=False): index
                   for index, payload in enumerate(payloads)}
        try:
            for future in distributed.as_completed(futures):
                index = futures[future]
                try:
                    yield Finished(index, future.result())
                except Exception as exc:  # the cell raised, or its worker died too often (KilledWorker)
                    yield Finished(index, error=_error_text(exc))
        finally:
            client.cancel(list(futures))


def _run_submitit(payloads: Sequence[Any], fn: Callable[[Any], Any], options: ExecutorOptions,
                  plugins: tuple[str, ...]) -> Iterator[Finished]:
    import submitit

    folder = options.folder or Path(".submitit")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=options.cluster)
    parameters: dict[str, Any] = {
        "timeout_min": slurm_minutes(options.slurm_time) if options.slurm_time else None,
        "cpus_per_task": options.threads_per_job,
        "slurm_partition": options.slurm_partition,
        "slurm_gpus_per_task": options.slurm_gpus_per_task,
        "slurm_array_parallelism": options.slurm_array_parallelism,
        "name": "negbench",
    }
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
    with executor.batch():
        jobs = [executor.submit(_invoke, fn, payload, options.threads_per_job, plugins) for payload in payloads]
    index = {id(job): i for i, job in enumerate(jobs)}
    remaining = list(jobs)
    while remaining:
        finished = [job for job in remaining if job.done()]
        for job in finished:
            remaining.remove(job)
            try:
                yield Finished(index[id(job)], job.result())
            except Exception as exc:  # submitit's FailedJobState / UncompletedJobError
                yield Finished(index[id(job)], error=" ".join(str(exc).split())[:500])
        if remaining and not finished:
            time.sleep(POLL_S)
