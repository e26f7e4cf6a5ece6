"""The training loop: config → task batches + encoder → sampler weights → surrogate loss →
metrics → run folder (DESIGN §5, §6). Samplers and tasks never import this module.

Reliability (issue 7). A checkpoint (``checkpoint.pt``, written atomically) holds everything a
resumed run needs to end identical, on the CPU, to one never stopped: the step and the data
order, the model, the optimiser, the sampler's state and the accumulators of its
diagnostics, every generator's state, the sums behind the current metric window, and how
many metric rows it covers. It is written every ``checkpoint_every`` steps (default: at each
metric row) and when SIGINT/SIGTERM stops the loop (after the step in progress). Rerunning
the same configuration resumes from it, dropping rows written after it; a finished run is
skipped. One lock per run folder (``.lock``, ``fcntl.flock``) keeps two processes out of one
run. A loss, gradient, parameter or sampler state that becomes NaN or infinite (checked after
every step; -inf is allowed in sampler states, where it marks entries not set yet), or a metric
row whose ``gcl``, embeddings or probe features are, stops the run at that step as
``diverged``: ``reason`` names the quantity and the step, the rows so far are kept, and a last
row carries ``diverged_metric``.

Test hook: ``NEGBENCH_TEST_KILL_AT_STEP=k`` (or ``k:TERM``, ``k:INT``) makes the process send
itself SIGKILL (or that signal) once step k is done, its metric row and checkpoint written —
how tests kill a run at a chosen step. Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import math
import os
import platform
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor

from negbench import __version__, distributed, metric_registry
from negbench.config import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    RunConfig,
    as_dict,
    check_writable,
    choose_seed,
    derive_seed,
    resolve_device,
    validate_numbers,
)
from negbench.distribution import draw_views, sampling_tv
from negbench.encoders import full_precision
from negbench.errors import UserError
from negbench.metrics import PROBE_PROTOCOL, alignment, peak_memory_bytes, probe_accuracies, uniformity
from negbench.objective import exact_gradient
from negbench.registry import SAMPLERS, TASKS, finite_view_tasks
from negbench.results import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    SUMMARY,
    append_row,
    atomic_torch_save,
    atomic_write_json,
    read_json,
    read_rows,
    rewrite_rows,
    run_id,
)
from negbench.sampler import Batch, Sampler, SamplerContext
from negbench.task import Task, resolve_free_views

#: steps at the start of a run (or a resume) left out of the timing medians
WARMUP_STEPS = 5
#: extras beyond this many are encoded twice (no-grad, then chunked with grad) to bound memory
EXTRA_CHUNK = 4096
EXACT_CHUNK = 1024
EVAL_SAMPLE_ITEMS = 1024


@dataclass
class RunOutcome:
    run_dir: Path
    summary: dict[str, Any]
    skipped: bool = False


@dataclass
class Prepared:
    """A validated, resolved run: nothing has been written yet."""

    config: RunConfig
    resolved: dict[str, Any]
    run_dir: Path
    task: Task
    sampler: Sampler
    device: torch.device
    steps: int
    eval_every: int
    lr: float
    seed: int


def provenance(device: torch.device) -> dict[str, Any]:
    """negbench, torch, torchvision, Python and CUDA versions, the device name, and the git
    commit when run from a checkout (recorded in config.json and by ``negbench bench``)."""
    import torchvision

    info: dict[str, Any] = {
        "negbench": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
    }
    with contextlib.suppress(Exception):
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    return info


def prepare(config: RunConfig) -> Prepared:
    """Validate every option and resolve every default, loading the task's data (which may
    fail with a clear error), but writing nothing."""
    validate_numbers(config)
    distributed.init_from_env(config.device)
    distributed.check_batch_size(config.batch_size)
    sampler = SAMPLERS.get_class(config.sampler)(**config.sampler_params)
    task = TASKS.get_class(config.task)(**config.task_params)
    if sampler.requires_finite_views and not task.finite_views:
        raise UserError(
            f"sampler {sampler.name!r} needs a finite view set but task {task.name!r} draws random "
            f"augmentations; use a finite-view task ({finite_view_tasks()})"
        )
    device = distributed.rank_device(resolve_device(config.device))
    check_writable(config.out)
    seed = distributed.from_main(choose_seed) if config.seed is None else config.seed
    task.download = config.download
    task.load(seed=derive_seed(seed, "data"), data_root=config.data_root)
    if config.max_items:
        task.subsample(config.max_items)
    n = task.num_items
    if config.batch_size > n:
        raise UserError(f"--batch-size {config.batch_size} is larger than the data set ({n} items); use at most {n}")
    sampler.check_task(n, task.num_views)  # e.g. emc2 chain=view on random augmentations
    if config.epochs is not None:
        steps = max(1, math.ceil(config.epochs * n / config.batch_size))
    else:
        steps = config.steps or DEFAULT_STEPS
    eval_every = min(config.eval_every or max(1, steps // 10), steps)
    lr = DEFAULT_LR[config.optimizer] if config.lr is None else config.lr
    experiment = {
        "sampler": sampler.name,
        "sampler_params": sampler.config,
        "task": task.name,
        "task_params": task.config,
        "batch_size": config.batch_size,
        "steps": steps,
        "optimizer": config.optimizer,
        "lr": lr,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "beta": config.beta,
        "seed": seed,
        "device": device.type,
        "eval_every": eval_every,
        "grad_error": config.grad_error,
        "tv_steps": config.tv_steps if task.finite_views else 0,
        "tv_anchors": config.tv_anchors,
    }
    if config.max_items:  # only when set, so run ids without it stay as they were
        experiment["max_items"] = config.max_items
    rid = run_id(experiment)
    resolved = {
        **experiment,
        "run_id": rid,
        "data_root": None if config.data_root is None else str(config.data_root),
        "seeds": {p: derive_seed(seed, p) for p in ("data", "init", "order", "sampler", "probe")},
        "task_info": task.describe(),
        "finite_views": task.finite_views,
        "num_items": n,
        "items_per_batch_ratio": n / config.batch_size,
        "eval_protocol": PROBE_PROTOCOL if task.labelled else None,
        "versions": provenance(device),
        "distributed": distributed.describe(),
        "options": as_dict(config),
    }
    return Prepared(config, resolved, config.out / rid, task, sampler, device, steps, eval_every, lr, seed)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
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


class RunFolderBusy(UserError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def _folder_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``run_dir/.lock`` (released by the OS if the process dies);
    :class:`RunFolderBusy` at once when another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(
                f"run folder {run_dir} is in use by another negbench process; wait for it to end, then rerun"
            ) from None
        yield


def _kill_hook() -> tuple[int, signal.Signals] | None:
    """``NEGBENCH_TEST_KILL_AT_STEP`` (see the module docstring), or None."""
    text = os.environ.get("NEGBENCH_TEST_KILL_AT_STEP")
    if not text:
        return None
    step, _, name = text.partition(":")
    return int(step), signal.Signals[f"SIG{name or 'KILL'}"]


@dataclass
class _Window:
    """What accumulates between two metric rows."""

    loss_sum: float = 0.0
    loss_count: int = 0
    grad_error_sum: float = 0.0
    grad_error_count: int = 0
    step_seconds: list[float] = field(default_factory=list)
    sampler_seconds: list[float] = field(default_factory=list)

    #: what a checkpoint keeps (timings are not: they never enter a comparison of results)
    SAVED = ("loss_sum", "loss_count", "grad_error_sum", "grad_error_count")

    def state(self) -> dict[str, float | int]:
        return {key: getattr(self, key) for key in self.SAVED}

    @classmethod
    def from_state(cls, state: dict[str, float | int]) -> "_Window":
        return cls(**{key: state[key] for key in cls.SAVED})


class Trainer:
    """One run of one sampler on one task. Use :func:`run` rather than this class."""

    def __init__(self, prep: Prepared, console: Console, show_progress: bool) -> None:
        self.prep = prep
        self.console = console
        self.show_progress = show_progress
        self.task = prep.task
        self.device = prep.device
        self.beta = prep.config.beta
        self.batch_size = prep.config.batch_size
        seeds = prep.resolved["seeds"]
        torch.manual_seed(seeds["init"])
        self.model = self.task.make_encoder().to(self.device)
        self.model = distributed.replicate_model(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = prep.config
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.params, lr=prep.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            self.optimizer = torch.optim.Adam(self.params, lr=prep.lr, weight_decay=cfg.weight_decay)
        self.order_generator = torch.Generator().manual_seed(seeds["order"])
        self.data_generator = torch.Generator().manual_seed(seeds["data"] + 1)
        self.sampler_generator = torch.Generator(device=self.device).manual_seed(seeds["sampler"])
        self.sampler = prep.sampler.bind(
            SamplerContext(
                num_items=self.task.num_items,
                num_views=self.task.num_views,
                beta=self.beta,
                dim=self.model.dim,
                device=self.device,
                generator=self.sampler_generator,
            )
        )
        n = self.task.num_items
        probe_order = torch.randperm(n, generator=torch.Generator().manual_seed(seeds["probe"]))
        self.probe_anchors = probe_order[: min(cfg.tv_anchors, max(1, n - 1))].tolist()
        self.permutation = torch.randperm(n, generator=self.order_generator)
        self.position = 0
        self.epoch = 0
        self.step = 0
        self.window = _Window()
        self.rows: list[dict[str, Any]] = []

    # ---- data ---------------------------------------------------------------------------
    def next_items(self) -> Tensor:
        """B items drawn without replacement within an epoch (a fresh permutation each epoch)."""
        n = self.task.num_items
        if self.position + self.batch_size > n:
            self.permutation = torch.randperm(n, generator=self.order_generator)
            self.position = 0
            self.epoch += 1
        items = self.permutation[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return items

    def resolve_views(self, views: Tensor) -> Tensor:
        """On finite-view tasks a view of -1 becomes a uniformly random fixed view."""
        m = self.task.num_views
        return views if m is None else resolve_free_views(views, m, self.data_generator)

    def shard_inputs(self, items: Tensor, views: Tensor) -> Tensor:
        """The encoder inputs of this rank's shard of the views (all of them in one process).
        Every rank builds every input, so the data generator stays the same on all ranks."""
        return self.own_shard(self.task.inputs(items.cpu(), views.cpu(), self.data_generator))

    def own_shard(self, x: Tensor) -> Tensor:
        """This rank's rows of a batch of inputs, on the device."""
        return x[distributed.shard(x.shape[0])].to(self.device, non_blocking=True)

    def encode_with_grad(self, inputs: Tensor) -> Tensor:
        """Embeddings of every row of ``inputs`` with gradients, identical on every rank: each
        rank encodes its shard and the shards are all-gathered with gradients."""
        return distributed.gather_rows(self.model(self.own_shard(inputs)), inputs.shape[0])

    # ---- prefetched augmentations (random-view tasks with Task.prefetch) ------------------
    _prefetch: Iterator[tuple[Tensor, Tensor]] | None = None
    _prefetch_unsupported = False

    def _upcoming_items(self, current: Tensor) -> Iterator[tuple[int, Tensor]]:
        """(step, items) of this step (``current``, just drawn) and of every step still to
        come, replaying :meth:`next_items` on a copy of the item order taken now, so the
        trainer's own state (and its checkpoints) is untouched."""
        shadow = copy.copy(self)
        shadow.order_generator = torch.Generator()
        shadow.order_generator.set_state(self.order_generator.get_state())

        def replay() -> Iterator[tuple[int, Tensor]]:
            yield shadow.step + 1, current
            for step in range(shadow.step + 2, self.prep.steps + 1):
                yield step, Trainer.next_items(shadow)

        return replay()

    def anchor_inputs(self, items: Tensor, anchor_items: Tensor, views: Tensor) -> Tensor:
        """Inputs of the 2B anchors: from the task's prefetching stream when it has one
        (fresh views seeded by the step, computed ahead by workers), else the task's inputs. All
        2B of them, on the host: every rank builds every input (see :meth:`shard_inputs`)."""
        if self.task.num_views is None and not self._prefetch_unsupported:
            if self._prefetch is None:
                self._prefetch = self.task.prefetch(
                    self._upcoming_items(items.cpu()), seed=derive_seed(self.prep.resolved["seeds"]["data"], "views"),
                    pin_memory=self.device.type == "cuda",
                )
                self._prefetch_unsupported = self._prefetch is None
            if self._prefetch is not None:
                streamed, x = next(self._prefetch)
                if not torch.equal(streamed, items.cpu()):
                    raise RuntimeError("the prefetched batch differs from next_items(); Trainer._upcoming_items must replay it")
                return x
        return self.task.inputs(anchor_items.cpu(), views.cpu(), self.data_generator)

    # ---- one step -----------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> float:
        """One optimiser step; returns the surrogate loss (may be non-finite)."""
        self._sync()
        t_start = time.perf_counter()
        items = self.next_items()
        if self.task.num_views is not None:
            pair_views = draw_views(items.numel(), self.task.num_views, self.data_generator)
            anchor_views = pair_views.reshape(-1)
            input_views = anchor_views
        else:
            anchor_views = torch.tensor([0, 1]).repeat(items.numel())
            input_views = torch.full_like(anchor_views, -1)
        anchor_items = items.repeat_interleave(2)
        anchor_emb = self.encode_with_grad(self.anchor_inputs(items, anchor_items, input_views))
        anchor_items = anchor_items.to(self.device)
        anchor_views = anchor_views.to(self.device)
        batch = Batch.from_anchors(anchor_items, anchor_views, anchor_emb.detach())

        self._sync()
        t_sampler = time.perf_counter()
        extras = self.sampler.propose(batch)
        self._sync()
        sampler_seconds = time.perf_counter() - t_sampler

        extra_emb = None
        two_pass = False
        if extras is not None and extras.items.numel():
            extras.views = self.resolve_views(extras.views)
            extra_inputs = self.shard_inputs(extras.items, extras.views)
            two_pass = extras.items.numel() > EXTRA_CHUNK
            if two_pass:
                with torch.no_grad():
                    extra_emb = torch.cat([self.model(extra_inputs[s : s + EXTRA_CHUNK]) for s in range(0, extra_inputs.shape[0], EXTRA_CHUNK)])
            else:
                extra_emb = self.model(extra_inputs)
            extra_emb = distributed.gather_rows(extra_emb, extras.items.numel())
            batch = batch.with_extras(extras)
        candidate_emb = anchor_emb if extra_emb is None else torch.cat([anchor_emb, extra_emb])

        self._sync()
        t_sampler = time.perf_counter()
        with torch.no_grad():
            sims = batch.anchor_emb @ candidate_emb.detach().T
            weights = self.sampler.weigh(sims, batch)
        self._sync()
        sampler_seconds += time.perf_counter() - t_sampler

        loss = distributed.rank_loss(anchor_emb, candidate_emb, weights, batch.positive, self.beta)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if two_pass:
            # ∂ℓ/∂e_c = β/A Σ_a W_ac e_a for the detached extras, pulled back chunk by chunk.
            a = batch.num_anchors
            extra_grad = self.beta / a * weights[:, a:].T @ anchor_emb.detach()
            extra_grad = extra_grad[distributed.shard(extra_grad.shape[0])]
            for s in range(0, extra_inputs.shape[0], EXTRA_CHUNK):
                self.model(extra_inputs[s : s + EXTRA_CHUNK]).backward(extra_grad[s : s + EXTRA_CHUNK])

        loss_value = distributed.sum_gradients(self.params, loss)
        if self.prep.config.grad_error and math.isfinite(loss_value):
            _, exact = self.exact(return_embeddings=False)
            error = sum(float((p.grad - g).pow(2).sum()) for p, g in zip(self.params, exact))
            self.window.grad_error_sum += error
            self.window.grad_error_count += 1
        if math.isfinite(loss_value):
            self.optimizer.step()
            self._sync()
            t_sampler = time.perf_counter()
            with torch.no_grad():
                self.sampler.refresh(self._encode_no_grad)
            self._sync()
            sampler_seconds += time.perf_counter() - t_sampler
        self._sync()
        self.step += 1
        if self.step > self.start_step + WARMUP_STEPS:
            self.window.step_seconds.append(time.perf_counter() - t_start)
            self.window.sampler_seconds.append(sampler_seconds)
        self.window.loss_sum += loss_value
        self.window.loss_count += 1
        return loss_value

    @torch.no_grad()
    def _encode_no_grad(self, items: Tensor, views: Tensor) -> Tensor:
        views = self.resolve_views(views)
        inputs = self.shard_inputs(items, views)
        # max(1, ·): a rank whose shard is empty still returns a (0, d) tensor to the gather
        chunks = [self.model(inputs[s : s + EXTRA_CHUNK]) for s in range(0, max(1, inputs.shape[0]), EXTRA_CHUNK)]
        return distributed.gather_rows(torch.cat(chunks), items.numel())

    # ---- evaluation -----------------------------------------------------------------------
    @full_precision()  # exact metrics never use autocast
    def exact(self, return_embeddings: bool = True) -> tuple[float, list[Tensor]] | tuple[float, list[Tensor], Tensor]:
        inputs = self.task.all_views().to(self.device)
        value, grads = exact_gradient(self.model, self.params, inputs, self.beta, EXACT_CHUNK)
        if not return_embeddings:
            return value, grads
        n, m = inputs.shape[:2]
        flat = inputs.reshape(n * m, *inputs.shape[2:])
        with torch.no_grad():
            emb = torch.cat([self.model(flat[s : s + EXACT_CHUNK]) for s in range(0, n * m, EXACT_CHUNK)])
        return value, grads, emb.reshape(n, m, -1)

    @torch.no_grad()
    def evaluation_views(self) -> Tensor:
        """Two views of a fixed sample of items (for alignment/uniformity without finite views)."""
        gen = torch.Generator().manual_seed(self.prep.resolved["seeds"]["probe"] + 1)
        n = self.task.num_items
        items = torch.randperm(n, generator=gen)[: min(n, EVAL_SAMPLE_ITEMS)]
        views = torch.full((items.numel() * 2,), -1, dtype=torch.long)
        inputs = self.task.inputs(items.repeat_interleave(2), views, gen).to(self.device)
        return self.model(inputs).reshape(items.numel(), 2, -1)

    def evaluate(self) -> dict[str, Any]:
        """The metric row of the current step (DESIGN §4); the window's sums start again. When
        the embeddings, ``gcl`` or the probe features are not finite, the metrics that need
        them are None and ``diverged_metric`` names the first such quantity."""
        distributed.check_replicas(self.params, self.sampler.state_dict())
        bad: list[str] = []
        was_training = self.model.training
        self.model.eval()
        row: dict[str, Any] = {
            "step": self.step,
            "epoch": self.step * self.batch_size / self.task.num_items,
            "samples_seen": self.step * self.batch_size,
        }
        w = self.window
        row["loss"] = w.loss_sum / w.loss_count if w.loss_count else None
        if self.task.finite_views:
            value, grads, emb = self.exact()  # type: ignore[misc]
            row["gcl"] = value
            row["grad_norm_sq"] = float(sum(float(g.pow(2).sum()) for g in grads))
            row["grad_error_sq"] = w.grad_error_sum / w.grad_error_count if w.grad_error_count else None
            if not math.isfinite(value):
                bad.append("gcl")
            elif not bool(torch.isfinite(emb).all()):
                bad.append("embeddings")
            if self.prep.resolved["tv_steps"] > 0 and not bad:
                num_probe = len(self.probe_anchors)
                batch = max(1, min(self.batch_size, self.task.num_items - num_probe))
                tv, floor = sampling_tv(
                    self.sampler, emb, self.beta, batch_size=batch, steps=self.prep.resolved["tv_steps"],
                    anchors=self.probe_anchors, seed=self.prep.resolved["seeds"]["probe"] + self.step,
                )
                row["sampling_tv"], row["sampling_tv_floor"] = tv, floor
            else:
                row["sampling_tv"] = row["sampling_tv_floor"] = None
        else:
            emb = self.evaluation_views()
            for key in ("gcl", "grad_norm_sq", "grad_error_sq", "sampling_tv", "sampling_tv_floor"):
                row[key] = None
            if not bool(torch.isfinite(emb).all()):
                bad.append("embeddings")
        row["alignment"] = alignment(emb)
        row["uniformity"] = uniformity(emb)
        data = self.task.eval_data()
        if data is not None:
            with torch.no_grad():
                feats = [self.features(x) for x in (data.train_x, data.test_x)]
            if all(bool(torch.isfinite(f).all()) for f in feats):
                row.update(probe_accuracies(feats[0], data.train_y, feats[1], data.test_y))
            else:  # the probes cannot fit non-finite features
                row.update({"lp_acc": None, "knn1_acc": None, "knn10_acc": None})
                bad.append("features")
        row.update(self.sampler.diagnostics())
        if w.step_seconds:
            step_s = statistics.median(w.step_seconds)
            row["step_ms"] = 1000 * step_s
            row["sampler_ms"] = 1000 * statistics.median(w.sampler_seconds)
            row["samples_per_s"] = self.batch_size / step_s
        else:
            row["step_ms"] = row["sampler_ms"] = row["samples_per_s"] = None
        row["peak_mem_bytes"] = peak_memory_bytes(self.device)
        row["state_bytes"] = self.sampler.state_bytes()
        if bad:
            row["diverged_metric"] = bad[0]
        self.window = _Window()
        self.model.train(was_training)
        return row

    def features(self, x: Tensor) -> Tensor:
        out = [self.model.features(x[s : s + EXACT_CHUNK].to(self.device)).float().cpu() for s in range(0, x.shape[0], EXACT_CHUNK)]
        return torch.cat(out)

    # ---- checkpoint -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs to continue exactly where this run is (module docstring)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "permutation": self.permutation,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "sampler_diagnostics": self.sampler.diagnostics_state(),
            "window": self.window.state(),
            "generators": {
                "order": self.order_generator.get_state(),
                "data": self.data_generator.get_state(),
                "sampler": self.sampler_generator.get_state(),
            },
            "rows": len(self.rows),
        }

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self.permutation = state["permutation"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        # checkpoints of earlier versions were only taken at metric rows, where both are empty
        if "sampler_diagnostics" in state:
            self.sampler.load_diagnostics_state(state["sampler_diagnostics"])
        self.window = _Window.from_state(state["window"]) if "window" in state else _Window()
        self.order_generator.set_state(state["generators"]["order"])
        self.data_generator.set_state(state["generators"]["data"])
        self.sampler_generator.set_state(state["generators"]["sampler"])

    start_step = 0


def _bad_sampler_state(sampler: Sampler) -> bool:
    """Whether a floating-point state tensor holds NaN or +inf (-inf is allowed: sogclr's
    log u and emc2's chain score use it for "not set yet"). One host synchronisation."""
    tensors = [t for t in (getattr(sampler, name) for name in sampler.state_attributes)
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not tensors:
        return False
    return bool(torch.stack([(torch.isnan(t) | torch.isposinf(t)).any() for t in tensors]).any())


def _not_finite(tensors: list[Tensor]) -> bool:
    """Whether some entry of ``tensors`` is NaN or ±inf (one host synchronisation)."""
    return bool(tensors) and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def summarise(rows: list[dict[str, Any]], steps: int, status: str, reason: str | None,
              steps_done: int | None = None) -> dict[str, Any]:
    """The summary: status, the steps done (default: the step of the last row; an interrupted
    run may have gone past it), each metric's final value, and the stationarity-gap statistics
    ``grad_norm_sq_avg`` (mean over the evaluations of the second half) and ``_min``."""
    final: dict[str, Any] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None:
                final[key] = value
    gaps = [(r["step"], r["grad_norm_sq"]) for r in rows if r.get("grad_norm_sq") is not None]
    second_half = [g for s, g in gaps if s >= steps / 2] or [g for _, g in gaps[-1:]]
    return {
        "status": status,
        "reason": reason,
        "steps_planned": steps,
        "steps_done": steps_done if steps_done is not None else (rows[-1]["step"] if rows else 0),
        "final": final,
        "grad_norm_sq_avg": sum(second_half) / len(second_half) if second_half else None,
        "grad_norm_sq_min": min((g for _, g in gaps), default=None),
    }




def summary_table(summary: dict[str, Any], title: str) -> Table:
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


def _finished_summary(summary_path: Path) -> dict[str, Any] | None:
    """The summary of a completed or diverged run (nothing left to do), else None."""
    previous = read_json(summary_path) if summary_path.exists() else None
    return previous if previous is not None and previous.get("status") in ("completed", "diverged") else None


def run(
    config: RunConfig,
    *,
    console: Console | None = None,
    show_progress: bool = True,
    prepared: Prepared | None = None,
) -> RunOutcome:
    """Run (or resume, or skip when already finished) one configuration. Bad input raises
    :class:`UserError` before anything is written; a run folder locked by another process
    raises :class:`RunFolderBusy` (a :class:`UserError`), also before anything is written."""
    console = console or Console(stderr=True)
    prep = prepared or prepare(config)
    main = distributed.is_main()  # with several processes only rank 0 prints and writes files
    if not main:
        console, show_progress = Console(stderr=True, quiet=True), False
    run_dir = prep.run_dir
    summary_path = run_dir / SUMMARY

    def skip(previous: dict[str, Any]) -> RunOutcome:
        console.print(f"[dim]{prep.resolved['run_id']}: already {previous['status']}, skipped[/dim]")
        return RunOutcome(run_dir, previous, skipped=True)

    previous = distributed.from_main(lambda: _finished_summary(summary_path))
    if previous is not None:
        return skip(previous)

    with _folder_lock(run_dir) if main else contextlib.nullcontext():
        # another process may have finished this run between the check above and the lock
        previous = distributed.from_main(lambda: _finished_summary(summary_path))
        if previous is not None:
            return skip(previous)
        if main:  # temporary files of an atomic write a killed process never finished
            for stale in run_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        trainer = Trainer(prep, console, show_progress)
        checkpoint_path = run_dir / CHECKPOINT
        metrics_path = run_dir / METRICS
        resumed = False
        # rank 0 reads the checkpoint for every rank, onto the CPU (where generator states live)
        state = distributed.from_main(
            lambda: torch.load(checkpoint_path, map_location="cpu", weights_only=False) if checkpoint_path.exists() else None
        )
        if state is not None:
            trainer.load_checkpoint(state)
            trainer.rows = distributed.from_main(lambda: read_rows(metrics_path))[: state["rows"]]
            if main:
                rewrite_rows(metrics_path, trainer.rows)
            resumed = True
            console.print(f"resuming {prep.resolved['run_id']} from step {trainer.step}")
        elif main:
            metrics_path.unlink(missing_ok=True)
        if main:
            summary_path.unlink(missing_ok=True)
            atomic_write_json(run_dir / CONFIG, prep.resolved)
        trainer.start_step = trainer.step
        if not resumed:
            console.print(
                f"run {prep.resolved['run_id']}: sampler {prep.sampler.name}, task {prep.task.name} "
                f"(N={prep.task.num_items}, N/B={prep.task.num_items / prep.config.batch_size:.1f}), "
                f"seed {prep.seed}, {prep.steps} steps on {prep.device.type}"
            )
            if distributed.world_size() > 1:
                console.print(f"{distributed.world_size()} processes ({prep.resolved['distributed']['backend']}), "
                              f"{prep.config.batch_size // distributed.world_size()} items each per step")

        every = prep.config.checkpoint_every

        def save_checkpoint() -> None:
            if main:
                atomic_torch_save(checkpoint_path, trainer.checkpoint_state())

        def record(row: dict[str, Any]) -> None:
            trainer.rows.append(row)
            if main:
                append_row(metrics_path, row)
            if every is None:
                save_checkpoint()

        def evaluate_and_record() -> str | None:
            """Record a metric row; returns the quantity that became non-finite, if one did."""
            row = trainer.evaluate()
            record(row)
            return row.get("diverged_metric")

        kill = _kill_hook()
        status, reason = "completed", None
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, disable=not show_progress, transient=False,
        )
        try:
            with _stop_on_signals() as flag, progress:
                bar = progress.add_task(prep.sampler.name, total=prep.steps, completed=trainer.step, info="")
                bad = evaluate_and_record() if not trainer.rows else None
                while trainer.step < prep.steps and bad is None:
                    if distributed.any_rank(flag["stop"]):  # every rank stops at the same step
                        save_checkpoint()
                        status, reason = "interrupted", (f"stopped by a signal at step {trainer.step}; "
                                                         "rerun the same command to resume")
                        break
                    loss = trainer.train_step()
                    progress.update(bar, advance=1, info=f"loss {loss:.4g}")
                    if not math.isfinite(loss):
                        bad = "loss"
                    elif _not_finite([p.grad for p in trainer.params if p.grad is not None]):
                        bad = "gradient"
                    elif _not_finite([p.detach() for p in trainer.params]):
                        bad = "parameters"
                    elif _bad_sampler_state(trainer.sampler):
                        bad = "sampler state"
                    if bad is not None:  # a row that names it; the rows before are kept
                        row = {"step": trainer.step, "loss": None, "diverged_metric": bad}
                        if main:
                            append_row(metrics_path, row)
                        trainer.rows.append(row)
                        break
                    if trainer.step % prep.eval_every == 0 or trainer.step == prep.steps:
                        bad = evaluate_and_record()
                        if bad is not None:
                            break
                    if every is not None and trainer.step % every == 0:
                        save_checkpoint()
                    if kill is not None and trainer.step == kill[0]:
                        os.kill(os.getpid(), kill[1])
                if bad is not None:
                    status, reason = "diverged", f"{bad} became non-finite at step {trainer.step}"
        except UserError:
            raise
        except Exception as exc:
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
            summary = summarise(trainer.rows, prep.steps, status, reason, trainer.step)
            if main:
                atomic_write_json(summary_path, summary)
            raise
        summary = summarise(trainer.rows, prep.steps, status, reason, trainer.step)
        if main:
            atomic_write_json(summary_path, summary)
        if main and status in ("completed", "diverged"):
            checkpoint_path.unlink(missing_ok=True)
    return RunOutcome(run_dir, summary)
