"""The run session (DESIGN §6): the run folder, its lock, resume, checkpoints, signals and
divergence around a :class:`~negbench.training.Trainer` and an
:class:`~negbench.evaluation.Evaluator`.

A checkpoint (``checkpoint.pt``, written atomically) holds everything a resumed run needs to
end identical, on the CPU, to one never stopped: the step and the data order, the model, the
optimiser, the sampler's state and the accumulators of its diagnostics, every generator's
state, the sums behind the current metric window, and how many metric rows it covers. It is
written every ``checkpoint_every`` steps (default: at each metric row) and when SIGINT/SIGTERM
stops the loop (after the step in progress). Rerunning the same configuration resumes from
it, dropping rows written after it; a finished run is skipped. One lock per run folder
(``.lock``, a lease file: :mod:`negbench.lock`) keeps two processes out of one run. A loss, gradient, parameter or
sampler state that becomes NaN or infinite (checked after every step; -inf is allowed in
sampler states, where it marks entries not set yet), or a metric row whose ``gcl``, embeddings
or probe features are, stops the run at that step as ``diverged``: ``reason`` names the
quantity and the step, the rows so far are kept, and a last row carries ``diverged_metric``.

Trust (issue 17). A parameter or gradient norm past ``BLOW_UP`` times its initial value
(:meth:`Trainer.blow_up`) is a divergence too, though nothing is NaN yet (normalised embeddings
hide an exploding θ). A weight-contract violation or a metric outside its declared range ends
the run as ``failed``; a failed run keeps its traceback in ``error.log``. A finished run is
skipped only when its ``metrics.jsonl`` matches the record in its summary
(:func:`negbench.results.verify_rows`); a damaged one is resumed from a checkpoint whose rows
are intact, or its files are moved aside to ``<run-id>.damaged-N`` and the run starts again. A
checkpoint whose rows changed is never resumed. A finished run removes its ``.lock``.

Step hooks: :func:`after_each_step` installs a callable run with the step number once the
step is done and its metric row and checkpoint are written (how the tests kill a run at a
chosen step, see ``tests/faults.py``).
"""

from __future__ import annotations

import contextlib
import math
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor

from negbench import distributed, metric_registry, warmstart
from negbench.config import RunConfig
from negbench.contract import MetricRangeError, WeightContractError
from negbench.errors import UserError
from negbench.evaluation import Evaluator
from negbench.lock import LeaseLock, LockBusy
from negbench.resolution import Prepared, prepare
from negbench.results import (
    CHECKPOINT, CONFIG, ERROR_LOG, METRICS, SUMMARY, append_row, atomic_torch_save, atomic_write_bytes,
    atomic_write_json, read_json, read_rows, rewrite_rows, row_record, rows_digest, verify_rows,
)
from negbench.sampler import Sampler
from negbench.training import Trainer


@dataclass
class RunOutcome:
    """What :func:`run` returns: the run folder, its summary, and whether it was skipped
    (already finished)."""

    run_dir: Path
    summary: dict[str, Any]
    skipped: bool = False


class RunFolderBusy(UserError):
    """Another process holds the run folder's lock."""


StepHook = Callable[[int], None]
_STEP_HOOKS: list[StepHook] = []


@contextlib.contextmanager
def after_each_step(hook: StepHook) -> Iterator[None]:
    """Within this context every run calls ``hook(step)`` after each step, once that step's
    metric row and checkpoint (if any) are written."""
    _STEP_HOOKS.append(hook)
    try:
        yield
    finally:
        _STEP_HOOKS.remove(hook)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, bool]]:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and stops after the current step."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        flag["stop"] = True

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not in the main thread
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def folder_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lease on ``run_dir/.lock`` (:mod:`negbench.lock`: NFS-safe, taken over at
    once when its owner on this host has died); :class:`RunFolderBusy` at once when another
    live process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = LeaseLock(run_dir / ".lock")
    try:
        lock.acquire()
    except LockBusy as exc:
        owner = f" (pid {exc.owner.get('pid')} on {exc.owner.get('host')})" if exc.owner else ""
        raise RunFolderBusy(
            f"run folder {run_dir} is in use by another negbench process{owner}; wait for it to end, then rerun"
        ) from None
    try:
        yield
    finally:
        lock.release()


def bad_sampler_state(sampler: Sampler) -> bool:
    """Whether a floating-point state tensor holds NaN or +inf (-inf is allowed: sogclr's
    log u and emc2's chain score use it for "not set yet"). One host synchronisation."""
    tensors = [t for t in (getattr(sampler, name) for name in sampler.state_attributes)
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not tensors:
        return False
    return bool(torch.stack([(torch.isnan(t) | torch.isposinf(t)).any() for t in tensors]).any())


def not_finite(tensors: list[Tensor]) -> bool:
    """Whether some entry of ``tensors`` is NaN or ±inf (one host synchronisation)."""
    return bool(tensors) and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def diverged_quantity(trainer: Trainer, loss: float) -> str | None:
    """What became non-finite in the step just done: the loss, a gradient, the parameters or
    the sampler's state (in that order), or None."""
    if not math.isfinite(loss):
        return "loss"
    if not_finite([p.grad for p in trainer.params if p.grad is not None]):
        return "gradient"
    if not_finite([p.detach() for p in trainer.params]):
        return "parameters"
    if bad_sampler_state(trainer.sampler):
        return "sampler state"
    return None


def summarise(rows: list[dict[str, Any]], steps: int, status: str, reason: str | None,
              steps_done: int | None = None) -> dict[str, Any]:
    """The summary: status, the steps done (default: the step of the last row; an interrupted
    run may have gone past it), each metric's final value, and the stationarity-gap statistics
    ``grad_norm_sq_avg`` (mean over the evaluations of the second half), ``_min``, and
    ``_run_avg`` (mean over the evaluations at t < T: the run's average, 1/T Σ_{t<T} ‖∇F(θ_t)‖²,
    what the convergence theorems bound)."""
    final: dict[str, Any] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None:
                final[key] = value
    gaps = [(r["step"], r["grad_norm_sq"]) for r in rows if r.get("grad_norm_sq") is not None]
    second_half = [g for s, g in gaps if s >= steps / 2] or [g for _, g in gaps[-1:]]
    before_end = [g for s, g in gaps if s < steps] or [g for _, g in gaps[-1:]]
    return {
        "status": status,
        "reason": reason,
        "steps_planned": steps,
        "steps_done": steps_done if steps_done is not None else (rows[-1]["step"] if rows else 0),
        "final": final,
        "grad_norm_sq_avg": sum(second_half) / len(second_half) if second_half else None,
        "grad_norm_sq_min": min((g for _, g in gaps), default=None),
        "grad_norm_sq_run_avg": sum(before_end) / len(before_end) if before_end else None,
        **row_record(rows),  # what a rerun checks metrics.jsonl against before it skips the run
    }




def summary_table(summary: dict[str, Any], title: str) -> Table:
    """The final value of each summary metric, the second-half gap and the status."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("final", justify="right")
    final = summary["final"]
    for key in metric_registry.summary_keys():
        if key in final:
            value = final[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    if summary.get("grad_norm_sq_avg") is not None:
        table.add_row("grad_norm_sq_avg", f"{summary['grad_norm_sq_avg']:.4g}")
    table.add_row("status", summary["status"] + (f" ({summary['reason']})" if summary.get("reason") else ""))
    return table


def finished_summary(summary_path: Path) -> dict[str, Any] | None:
    """The summary of a completed or diverged run (nothing left to do), else None."""
    previous = read_json(summary_path) if summary_path.exists() else None
    return previous if previous is not None and previous.get("status") in ("completed", "diverged") else None


def damage(run_dir: Path, summary: dict[str, Any]) -> str | None:
    """Why a finished run's ``metrics.jsonl`` does not match its summary, or None."""
    try:
        rows = read_rows(run_dir / METRICS, strict=True)
    except UserError as exc:
        return str(exc).split(";")[0]
    return verify_rows(rows, summary)


def rows_match(state: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    """Whether ``metrics.jsonl`` still holds the rows a checkpoint covers."""
    covered = state["rows"]
    return len(rows) >= covered and ("rows_digest" not in state or rows_digest(rows[:covered]) == state["rows_digest"])


def move_aside(run_dir: Path) -> Path:
    """Move the files of a damaged run folder (all but the lock, which the caller holds) into a
    new sibling ``<run-id>.damaged-N``; returns it. Nothing is deleted."""
    number = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.damaged-{number}")).exists():
        number += 1
    aside.mkdir()
    for path in run_dir.iterdir():
        if path.name != ".lock":
            path.rename(aside / path.name)
    return aside


def repair(run_dir: Path, why: str, console: Console) -> None:
    """A damaged finished run (the caller holds its lock): resume from its checkpoint when that
    checkpoint's rows are intact, else move its files aside to run the configuration again."""
    checkpoint = run_dir / CHECKPOINT
    with contextlib.suppress(Exception):
        if checkpoint.exists() and rows_match(torch.load(checkpoint, map_location="cpu", weights_only=False),
                                              read_rows(run_dir / METRICS)):
            (run_dir / SUMMARY).unlink(missing_ok=True)
            console.print(f"[yellow]warning:[/yellow] {run_dir.name}: {why}; resuming from its checkpoint",
                          soft_wrap=True, highlight=False)
            return
    aside = move_aside(run_dir)
    console.print(f"[yellow]warning:[/yellow] {run_dir.name}: {why}; moved the damaged folder to {aside} and "
                  "running it again", soft_wrap=True, highlight=False)


class Session:
    """One run's folder and loop: what :func:`run` does once it holds the folder's lock."""

    def __init__(self, prep: Prepared, console: Console, show_progress: bool) -> None:
        self.prep, self.console, self.show_progress = prep, console, show_progress
        self.main = distributed.is_main()  # with several processes only rank 0 writes files
        self.run_dir = prep.run_dir
        self.trainer = Trainer(prep.run, prep.task, prep.sampler)
        if prep.config.init == "stationary":
            warmstart.start_trainer(self.trainer, prep.resolved, console)
        self.evaluator = Evaluator(self.trainer)
        self.rows: list[dict[str, Any]] = []

    # ---- files ---------------------------------------------------------------------------
    def start(self) -> None:
        """Clear a killed writer's temporary files, resume from the checkpoint if there is
        one (dropping rows past it), write ``config.json``, say what runs."""
        run_dir, rid = self.run_dir, self.prep.run.run_id
        if self.main:
            for stale in run_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        checkpoint_path, metrics_path = run_dir / CHECKPOINT, run_dir / METRICS
        # rank 0 reads the checkpoint for every rank, onto the CPU (where generator states live)
        state = distributed.from_main(
            lambda: torch.load(checkpoint_path, map_location="cpu", weights_only=False) if checkpoint_path.exists() else None
        )
        if state is not None and not distributed.from_main(lambda: rows_match(state, read_rows(metrics_path))):
            if self.main:  # the rows it covers changed or are gone: a resume would skip them
                aside = move_aside(run_dir)
                self.console.print(f"[yellow]warning:[/yellow] {rid}: {METRICS} does not hold the rows its checkpoint "
                                   f"covers; moved the folder to {aside} and starting again", soft_wrap=True,
                                   highlight=False)
            state = None
        if state is not None:
            self.trainer.load_checkpoint(state)
            self.rows = distributed.from_main(lambda: read_rows(metrics_path))[: state["rows"]]
            if self.main:
                rewrite_rows(metrics_path, self.rows)
            self.console.print(f"resuming {rid} from step {self.trainer.step}")
        elif self.main:
            metrics_path.unlink(missing_ok=True)
        if self.main:
            (run_dir / SUMMARY).unlink(missing_ok=True)
            (run_dir / ERROR_LOG).unlink(missing_ok=True)  # the traceback of an earlier failed attempt
            atomic_write_json(run_dir / CONFIG, self.prep.resolved)
        self.trainer.start_step = self.trainer.step
        if state is None:
            self._announce()

    def _announce(self) -> None:
        prep, n = self.prep, self.prep.task.num_items
        self.console.print(
            f"run {prep.run.run_id}: sampler {prep.sampler.name}, task {prep.task.name} "
            f"(N={n}, N/B={n / prep.config.batch_size:.1f}), seed {prep.seed}, {prep.steps} steps on {prep.device.type}"
        )
        if distributed.world_size() > 1:
            self.console.print(f"{distributed.world_size()} processes ({prep.resolved['distributed']['backend']}), "
                               f"{prep.config.batch_size // distributed.world_size()} items each per step")

    def save_checkpoint(self) -> None:
        if self.main:
            atomic_torch_save(self.run_dir / CHECKPOINT, {**self.trainer.checkpoint_state(), "rows": len(self.rows),
                                                          "rows_digest": rows_digest(self.rows)})

    def record(self, row: dict[str, Any]) -> None:
        """Append a metric row (and checkpoint, with the default schedule)."""
        self.rows.append(row)
        if self.main:
            append_row(self.run_dir / METRICS, row)
        if self.prep.config.checkpoint_every is None:
            self.save_checkpoint()

    def evaluate_and_record(self) -> str | None:
        """Record a metric row; returns the quantity that became non-finite, if one did."""
        row = self.evaluator.evaluate()
        self.record(row)
        return row.get("diverged_metric")

    def finish(self, status: str, reason: str | None) -> dict[str, Any]:
        """Write ``summary.json`` (and drop the checkpoint of a run that has ended; a failed
        run's traceback, in an ``except`` block, goes to ``error.log``)."""
        summary = summarise(self.rows, self.prep.steps, status, reason, self.trainer.step)
        if self.main and status == "failed":
            atomic_write_bytes(self.run_dir / ERROR_LOG, traceback.format_exc().encode())
        if self.main:
            atomic_write_json(self.run_dir / SUMMARY, summary)
            if status in ("completed", "diverged"):
                (self.run_dir / CHECKPOINT).unlink(missing_ok=True)
        return summary

    # ---- the loop ------------------------------------------------------------------------
    def loop(self) -> tuple[str, str | None]:
        """Train to the end, a signal or a divergence; returns ``(status, reason)``."""
        trainer, prep, every = self.trainer, self.prep, self.prep.config.checkpoint_every
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, disable=not self.show_progress, transient=False,
        )
        blown: str | None = None  # the reason of a norm past BLOW_UP
        with stop_on_signals() as flag, progress:
            bar = progress.add_task(prep.sampler.name, total=prep.steps, completed=trainer.step, info="")
            bad = self.evaluate_and_record() if not self.rows else None
            while trainer.step < prep.steps and bad is None:
                if distributed.any_rank(flag["stop"]):  # every rank stops at the same step
                    self.save_checkpoint()
                    return "interrupted", f"stopped by a signal at step {trainer.step}; rerun the same command to resume"
                loss = trainer.train_step()
                progress.update(bar, advance=1, info=f"loss {loss:.4g}")
                if not math.isfinite(loss):
                    trainer.contract.flush()  # bad weights are a failure, not a divergence
                bad = diverged_quantity(trainer, loss)
                if bad is None and (why := trainer.blow_up()) is not None:
                    bad, blown = why.split(" grew")[0], why
                if bad is not None:  # a row that names it; the rows before are kept
                    row = {"step": trainer.step, "loss": None, "diverged_metric": bad}
                    self.rows.append(row)
                    if self.main:
                        append_row(self.run_dir / METRICS, row)
                    break
                if trainer.step % prep.eval_every == 0 or trainer.step == prep.steps:
                    bad = self.evaluate_and_record()
                    if bad is not None:
                        break
                if every is not None and trainer.step % every == 0:
                    self.save_checkpoint()
                for hook in list(_STEP_HOOKS):
                    hook(trainer.step)
        trainer.contract.flush()
        if bad is not None:
            return "diverged", blown or f"{bad} became non-finite at step {trainer.step}"
        return "completed", None


def run(
    config: RunConfig,
    *,
    console: Console | None = None,
    show_progress: bool = True,
    prepared: Prepared | None = None,
) -> RunOutcome:
    """Run (or resume, or skip when already finished) one configuration.

    Args:
        config: the run's options; ``None`` fields take the defaults of
            :mod:`negbench.resolution`.
        console: where progress and messages go (default: stderr).
        show_progress: draw a progress bar.
        prepared: ``prepare(config)`` when the caller has already called it.

    Returns:
        A :class:`RunOutcome`: the run folder, its summary (``status``: completed, diverged,
        interrupted or failed) and whether the run was skipped as already finished.

    Raises:
        UserError: bad input, before anything is written; :class:`RunFolderBusy` (a
            ``UserError``) when another process holds the run folder, also before anything
            is written.

    Example:
        >>> outcome = run(RunConfig(sampler="in_batch", task="synthetic", steps=20, seed=0))
        >>> outcome.summary["final"]["grad_norm_sq"] >= 0
        True
    """
    console = console or Console(stderr=True)
    prep = prepared or prepare(config)
    main = distributed.is_main()  # with several processes only rank 0 prints and writes files
    if not main:
        console, show_progress = Console(stderr=True, quiet=True), False
    run_dir = prep.run_dir
    summary_path = run_dir / SUMMARY

    def skipped(locked: bool) -> RunOutcome | None:
        """The outcome of a finished run whose rows check out; a damaged one is repaired
        (under the lock) and None returned, so that it runs."""
        previous = distributed.from_main(lambda: finished_summary(summary_path))
        if previous is None:
            return None
        why = distributed.from_main(lambda: damage(run_dir, previous))
        if why is None:
            console.print(f"[dim]{prep.run.run_id}: already {previous['status']}, skipped[/dim]")
            return RunOutcome(run_dir, previous, skipped=True)
        if locked and main:
            repair(run_dir, why, console)
        return None

    outcome = skipped(locked=False)
    if outcome is not None:
        return outcome
    with folder_lock(run_dir) if main else contextlib.nullcontext():
        outcome = skipped(locked=True)  # another process may have finished it between the check and the lock
        if outcome is not None:
            return outcome
        session = Session(prep, console, show_progress)
        session.start()
        try:
            status, reason = session.loop()
        except UserError:
            raise
        except Exception as exc:
            contract = isinstance(exc, (WeightContractError, MetricRangeError))
            reason = str(exc) if contract else f"{type(exc).__name__}: {exc}"
            session.finish("failed", reason)
            # what the command line prints on its one line (exit code 1)
            setattr(exc, "negbench_log", run_dir / ERROR_LOG)
            setattr(exc, "negbench_message", f"run {prep.run.run_id} failed at step {session.trainer.at_step}: {reason}")
            raise
        summary = session.finish(status, reason)
    return RunOutcome(run_dir, summary)
