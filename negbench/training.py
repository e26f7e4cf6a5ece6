"""The trainer (DESIGN §5): one optimiser step — data → encoder → sampler → loss → optimiser —
and the state a checkpoint needs to continue it exactly.

Per step: B items drawn without replacement within an epoch, two views of each (A = 2B
anchors); the anchors are encoded with gradients; the sampler may :meth:`~Sampler.propose`
extra candidates (encoded with gradients, in two passes beyond ``EXTRA_CHUNK`` of them to bound
memory, or given as stale constants: :func:`~negbench.sampler.join_candidates`); it weighs the
candidates from the detached similarities; the surrogate

    ℓ = β/A · Σ_a [ Σ_c W_ac <e_a, e_c>  -  <e_a, e_a⁺> ]

is back-propagated, the optimiser steps, and the sampler refreshes its caches. The loss and
the time of the step and of the sampler accumulate in a :class:`Window` until the next metric
row (:mod:`negbench.evaluation`).

Trust (issue 17): every W is checked against the weight contract (:mod:`negbench.contract`)
before the loss uses it, and :meth:`Trainer.blow_up` tells the session when ‖θ‖ or ‖∇‖ grew
past ``BLOW_UP`` times its initial value.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor

from negbench import distributed
from negbench.config import RunConfig, derive_seed, resolve_device
from negbench.contract import WeightContract
from negbench.distribution import draw_views
from negbench.encoders import full_precision
from negbench.objective import exact_gradient
from negbench.registry import SAMPLERS
from negbench.resolution import Prepared, ResolvedRun, resolve
from negbench.sampler import Batch, Sampler, SamplerContext, join_candidates
from negbench.task import Task, resolve_free_views

#: steps at the start of a run (or a resume) left out of the timing medians
WARMUP_STEPS = 5
#: extras beyond this many are encoded twice (no-grad, then chunked with grad) to bound memory
EXTRA_CHUNK = 4096
#: rows per encoder call when every view is encoded (exact metrics, probe features)
EXACT_CHUNK = 1024
#: a run whose parameter norm or gradient norm exceeds this multiple of its initial value is
#: diverged. Healthy training changes ‖θ‖ by a small factor (10× is already a lot); at 10⁶× a
#: step of the initial parameters' scale is below float32's resolution (2⁻²³ ≈ 1.2·10⁻⁷) of the
#: grown ones, so training has stopped in all but name, while every value is still finite.
BLOW_UP = 1e6


@dataclass
class Window:
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
    def from_state(cls, state: dict[str, float | int]) -> "Window":
        return cls(**{key: state[key] for key in cls.SAVED})


def make_optimizer(config: RunConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or Adam, with ``weight_decay``, at learning rate ``lr``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)


class Trainer:
    """One run's model, optimiser, sampler, data order and generators, stepped by
    :meth:`train_step`. :func:`negbench.run` drives it; :meth:`build` makes one for a loaded
    task without a run folder (``negbench bench``)."""

    def __init__(self, run: ResolvedRun, task: Task, sampler: Sampler) -> None:
        self.run = run
        self.task = task
        self.device = run.device
        self.beta = run.beta
        self.batch_size = run.batch_size
        seeds = run.seeds
        torch.manual_seed(seeds.init)
        self.model = distributed.replicate_model(task.make_encoder().to(self.device))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(run.config, self.params, run.lr)
        self.order_generator = torch.Generator().manual_seed(seeds.order)
        self.data_generator = torch.Generator().manual_seed(seeds.data + 1)
        self.sampler_generator = torch.Generator(device=self.device).manual_seed(seeds.sampler)
        self.sampler = sampler.bind(SamplerContext(
            num_items=task.num_items, num_views=task.num_views, beta=self.beta, dim=self.model.dim,
            device=self.device, generator=self.sampler_generator,
        ))
        self.permutation = torch.randperm(task.num_items, generator=self.order_generator)
        self.position = 0
        self.epoch = 0
        self.step = 0
        self.start_step = 0  # where this process started (timings skip its first steps)
        self.window = Window()
        self._prefetch: Iterator[tuple[Tensor, Tensor]] | None = None
        self._prefetch_unsupported = False
        # no host synchronisation per step on a GPU: the verdicts are read at the next flush
        self.contract = WeightContract(self.sampler, deferred=self.device.type == "cuda")
        #: ‖θ‖ at the start and ‖∇‖ of the first step with a gradient: the BLOW_UP references
        self.norm_reference: dict[str, float | None] = {"parameter": self.norms()[0], "gradient": None}
        self.at_step = 0  # the step in progress, which a failure names

    @classmethod
    def from_prepared(cls, prep: Prepared) -> "Trainer":
        """The trainer of a prepared run (:func:`negbench.resolution.prepare`)."""
        return cls(prep.run, prep.task, prep.sampler)

    @classmethod
    def build(cls, config: RunConfig, task: Task) -> "Trainer":
        """A trainer of ``config.sampler`` (with ``config.sampler_params``) on ``task``, already
        loaded; seeds, learning rate and schedule resolved as a run resolves them
        (``config.seed`` None: 0). Nothing is written.

        Example:
            >>> task = get_task("synthetic", num_items=16); task.load(seed=0)
            >>> trainer = Trainer.build(RunConfig(sampler="in_batch", batch_size=4, steps=3), task)
            >>> loss = trainer.train_step()
        """
        sampler = SAMPLERS.get_class(config.sampler)(**config.sampler_params)
        device = resolve_device(config.device)
        seed = 0 if config.seed is None else config.seed
        return cls(resolve(config, task, sampler, device, seed, versions=False), task, sampler)

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

    def _upcoming_items(self, current: Tensor) -> Iterator[tuple[int, Tensor]]:
        """(step, items) of this step (``current``, just drawn) and of every step still to
        come, replaying :meth:`next_items` on a copy of the item order taken now, so the
        trainer's own state (and its checkpoints) is untouched."""
        shadow = copy.copy(self)
        shadow.order_generator = torch.Generator()
        shadow.order_generator.set_state(self.order_generator.get_state())

        def replay() -> Iterator[tuple[int, Tensor]]:
            yield shadow.step + 1, current
            for step in range(shadow.step + 2, self.run.steps + 1):
                yield step, Trainer.next_items(shadow)

        return replay()

    def anchor_inputs(self, items: Tensor, anchor_items: Tensor, views: Tensor) -> Tensor:
        """Inputs of the 2B anchors: from the task's prefetching stream when it has one
        (fresh views seeded by the step, computed ahead by workers), else the task's inputs. All
        2B of them, on the host: every rank builds every input (see :meth:`shard_inputs`)."""
        if self.task.num_views is None and not self._prefetch_unsupported:
            if self._prefetch is None:
                self._prefetch = self.task.prefetch(
                    self._upcoming_items(items.cpu()), seed=derive_seed(self.run.seeds.data, "views"),
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
    def sync(self) -> None:
        """Wait for the device (CUDA) so that a wall-clock reading covers the work queued."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _anchor_batch(self) -> tuple[Tensor, Batch]:
        """This step's anchors: their embeddings (with gradients) and the batch the sampler sees."""
        items = self.next_items()
        if self.task.num_views is not None:
            anchor_views = draw_views(items.numel(), self.task.num_views, self.data_generator).reshape(-1)
            input_views = anchor_views
        else:
            anchor_views = torch.tensor([0, 1]).repeat(items.numel())
            input_views = torch.full_like(anchor_views, -1)
        anchor_items = items.repeat_interleave(2)
        anchor_emb = self.encode_with_grad(self.anchor_inputs(items, anchor_items, input_views))
        batch = Batch.from_anchors(anchor_items.to(self.device), anchor_views.to(self.device), anchor_emb.detach())
        return anchor_emb, batch

    def train_step(self) -> float:
        """One optimiser step; returns the surrogate loss (may be non-finite). W is checked
        against the weight contract before the loss uses it."""
        self.at_step = self.step + 1
        self.sync()
        t_start = time.perf_counter()
        anchor_emb, batch = self._anchor_batch()

        self.sync()
        t_sampler = time.perf_counter()
        extras = self.sampler.propose(batch)
        self.sync()
        sampler_seconds = time.perf_counter() - t_sampler

        self._two_pass_inputs = None
        batch, candidate_emb = join_candidates(batch, anchor_emb, extras, self.encode_extras, self.resolve_views)
        extra_inputs, self._two_pass_inputs = self._two_pass_inputs, None

        self.sync()
        t_sampler = time.perf_counter()
        with torch.no_grad():
            sims = batch.anchor_emb @ candidate_emb.detach().T
            weights = self.sampler.weigh(sims, batch)
            self.contract.check(weights, batch, self.step + 1, sims)
        self.sync()
        sampler_seconds += time.perf_counter() - t_sampler

        loss = distributed.rank_loss(anchor_emb, candidate_emb, weights, batch.positive, self.beta)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if extra_inputs is not None:
            self._backward_extras(extra_inputs, weights, anchor_emb.detach(), batch.num_anchors)

        loss_value = distributed.sum_gradients(self.params, loss)
        if self.run.config.grad_error and math.isfinite(loss_value):
            self._record_grad_error()
        if math.isfinite(loss_value):
            self.optimizer.step()
            self.sync()
            t_sampler = time.perf_counter()
            with torch.no_grad():
                self.sampler.refresh(self.encode_no_grad)
            self.sync()
            sampler_seconds += time.perf_counter() - t_sampler
        self.sync()
        self.step += 1
        if self.step > self.start_step + WARMUP_STEPS:
            self.window.step_seconds.append(time.perf_counter() - t_start)
            self.window.sampler_seconds.append(sampler_seconds)
        self.window.loss_sum += loss_value
        self.window.loss_count += 1
        return loss_value

    _two_pass_inputs: Tensor | None = None

    def encode_extras(self, items: Tensor, views: Tensor) -> Tensor:
        """Embeddings of a step's encoded extras, with gradients, identical on every rank. More
        than ``EXTRA_CHUNK`` of them are encoded without a graph here and pulled back by
        :meth:`_backward_extras` after the backward pass (their inputs wait in ``_two_pass_inputs``)."""
        extra_inputs = self.shard_inputs(items, views)
        if items.numel() > EXTRA_CHUNK:
            with torch.no_grad():
                extra_emb = torch.cat([self.model(extra_inputs[s : s + EXTRA_CHUNK]) for s in range(0, extra_inputs.shape[0], EXTRA_CHUNK)])
            self._two_pass_inputs = extra_inputs
        else:
            extra_emb = self.model(extra_inputs)
        return distributed.gather_rows(extra_emb, items.numel())

    def _backward_extras(self, extra_inputs: Tensor, weights: Tensor, anchor_emb: Tensor, num_anchors: int) -> None:
        """The second pass for extras encoded without gradients: ∂ℓ/∂e_c = β/A Σ_a W_ac e_a,
        pulled back through the encoder chunk by chunk."""
        extra_grad = self.beta / num_anchors * weights[:, num_anchors:].T @ anchor_emb
        extra_grad = extra_grad[distributed.shard(extra_grad.shape[0])]
        for s in range(0, extra_inputs.shape[0], EXTRA_CHUNK):
            self.model(extra_inputs[s : s + EXTRA_CHUNK]).backward(extra_grad[s : s + EXTRA_CHUNK])

    def _record_grad_error(self) -> None:
        """Add ‖ĝ_t − ∇F(θ_t)‖² of this step's (summed) gradient to the window."""
        _, exact = self.exact_gradient()
        error = sum(float((p.grad - g).pow(2).sum()) for p, g in zip(self.params, exact) if p.grad is not None)
        self.window.grad_error_sum += error
        self.window.grad_error_count += 1

    @torch.no_grad()
    def encode_no_grad(self, items: Tensor, views: Tensor) -> Tensor:
        """Embeddings of (item, view) pairs without gradients (a sampler's ``refresh``)."""
        views = self.resolve_views(views)
        inputs = self.shard_inputs(items, views)
        # max(1, ·): a rank whose shard is empty still returns a (0, d) tensor to the gather
        chunks = [self.model(inputs[s : s + EXTRA_CHUNK]) for s in range(0, max(1, inputs.shape[0]), EXTRA_CHUNK)]
        return distributed.gather_rows(torch.cat(chunks), items.numel())

    # ---- exact quantities (finite-view tasks) ---------------------------------------------
    @full_precision()  # exact metrics never use autocast
    def exact_gradient(self) -> tuple[float, list[Tensor]]:
        """``(F(θ), ∇F(θ))``: the exact GCL over every view and its gradient per parameter."""
        inputs = self.task.all_views().to(self.device)
        return exact_gradient(self.model, self.params, inputs, self.beta, EXACT_CHUNK)

    @full_precision()
    @torch.no_grad()
    def all_view_embeddings(self) -> Tensor:
        """The (N, m, d) embeddings of every view of every item."""
        inputs = self.task.all_views().to(self.device)
        n, m = inputs.shape[:2]
        flat = inputs.reshape(n * m, *inputs.shape[2:])
        emb = torch.cat([self.model(flat[s : s + EXACT_CHUNK]) for s in range(0, n * m, EXACT_CHUNK)])
        return emb.reshape(n, m, -1)

    # ---- divergence beyond NaN --------------------------------------------------------------
    def norms(self) -> tuple[float, float]:
        """(‖θ‖, ‖∇‖) over all trainable parameters, in one host synchronisation (float64: the
        float32 norm of finite float32 entries can overflow)."""
        grads = [p.grad.detach().double().norm() for p in self.params if p.grad is not None]
        values = torch.stack([
            torch.stack([p.detach().double().norm() for p in self.params]).norm(),
            torch.stack(grads).norm() if grads else torch.zeros((), dtype=torch.float64, device=self.device),
        ]).tolist()
        return values[0], values[1]

    def blow_up(self) -> str | None:
        """Why the parameters or the gradient grew past ``BLOW_UP`` times their initial norm,
        or None; the first step with a non-zero gradient sets the gradient's reference."""
        theta, grad = self.norms()
        ref = self.norm_reference
        if ref["gradient"] is None and grad > 0:
            ref["gradient"] = grad
        for name, value, start in (("parameter", theta, ref["parameter"]), ("gradient", grad, ref["gradient"])):
            if start and value > BLOW_UP * start:
                return (f"{name} norm grew past {BLOW_UP:.0e} x its initial value at step {self.step} "
                        f"({value:.3g}, initially {start:.3g})")
        return None

    # ---- checkpoint -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs to continue exactly where this run is, but the metric rows
        (the session adds how many it covers)."""
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
            "contract": self.contract.state(),  # flushes: never a checkpoint past a violation
            "norm_reference": dict(self.norm_reference),
        }

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint_state`'s ``state``."""
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
        self.window = Window.from_state(state["window"]) if "window" in state else Window()
        self.order_generator.set_state(state["generators"]["order"])
        self.data_generator.set_state(state["generators"]["data"])
        self.sampler_generator.set_state(state["generators"]["sampler"])
        if "contract" in state:  # checkpoints of earlier versions: the counts start afresh
            self.contract.load_state(state["contract"])
        if "norm_reference" in state:
            self.norm_reference = dict(state["norm_reference"])
