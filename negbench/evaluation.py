"""The evaluator (DESIGN §4): everything computed at an evaluation point, as one metric row.

A row is built by the functions of :data:`METRIC_GROUPS`, in order, each reading an
:class:`EvalPoint` (the trainer, the window since the last row, the embeddings) and returning
its columns. **To add a metric**, write one function ``(point) -> dict`` and append it to
``METRIC_GROUPS`` (a group that needs the embeddings sees ``point.embeddings``; one that finds a
non-finite value appends its name to ``point.bad``). The groups:

- progress: ``step``, ``epoch`` (``step·B/N``), ``samples_seen`` (``step·B``);
- ``loss``: the surrogate ℓ averaged over the window;
- exact (finite-view tasks): ``gcl`` = F(θ), ``grad_norm_sq`` = ‖∇F(θ)‖², ``grad_error_sq`` =
  the window's mean ‖ĝ_t − ∇F(θ_t)‖² (``--grad-error``);
- ``grad_bias_sq``, ``grad_var``: the bias² and variance of the sampler's gradient estimate at
  θ from R draws (``--grad-split R``; :mod:`negbench.gradsplit`);
- ``sampling_tv`` and its i.i.d. floor at frozen θ (:func:`negbench.distribution.sampling_tv`);
- ``alignment``, ``uniformity`` (Wang & Isola, 2020) of the embeddings;
- ``lp_acc``, ``knn1_acc``, ``knn10_acc`` of the probes on frozen features;
- the sampler's diagnostics; cost: ``step_ms``, ``sampler_ms``, ``samples_per_s``,
  ``peak_mem_bytes``, ``state_bytes``;
- ``no_negatives: true`` (only then) when no anchor of the window got any weight on a valid
  negative: a run with nothing to learn says so in its row (issue 17).

Every row is checked against the metrics' declared ranges (:func:`negbench.contract.check_row`)
and the trainer's deferred weight-contract verdicts are read first.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from negbench import distributed
from negbench.config import derive_seed
from negbench.contract import check_row
from negbench.distribution import sampling_tv
from negbench.gradsplit import gradient_split
from negbench.metrics import alignment, peak_memory_bytes, probe_accuracies, uniformity
from negbench.training import EXACT_CHUNK, Trainer, Window

#: items of the fixed sample whose two views stand in for the finite views (random augmentations)
EVAL_SAMPLE_ITEMS = 1024


@dataclass
class EvalPoint:
    """What the metric groups of one evaluation share. ``embeddings``: (N, m, d) on
    finite-view tasks, else two views of a fixed sample of items, (n, 2, d); None while no
    group has computed them. ``bad``: the quantities found non-finite, in order."""

    trainer: Trainer
    window: Window
    probe_anchors: list[int]
    embeddings: Tensor | None = None
    exact_grads: list[Tensor] | None = None  # ∇F(θ), set by exact_objective on finite-view tasks
    bad: list[str] = field(default_factory=list)


MetricGroup = Callable[[EvalPoint], dict[str, Any]]


def progress(point: EvalPoint) -> dict[str, Any]:
    t = point.trainer
    return {"step": t.step, "epoch": t.step * t.batch_size / t.task.num_items, "samples_seen": t.step * t.batch_size}


def window_loss(point: EvalPoint) -> dict[str, Any]:
    w = point.window
    return {"loss": w.loss_sum / w.loss_count if w.loss_count else None}


def exact_objective(point: EvalPoint) -> dict[str, Any]:
    """F(θ), ‖∇F(θ)‖² and the window's gradient error on finite-view tasks (None elsewhere);
    sets ``point.embeddings``."""
    t, w = point.trainer, point.window
    if not t.task.finite_views:
        point.embeddings = evaluation_views(t)
        if not bool(torch.isfinite(point.embeddings).all()):
            point.bad.append("embeddings")
        return {"gcl": None, "grad_norm_sq": None, "grad_error_sq": None}
    value, grads = t.exact_gradient()
    point.exact_grads = grads
    point.embeddings = t.all_view_embeddings()
    if not math.isfinite(value):
        point.bad.append("gcl")
    elif not bool(torch.isfinite(point.embeddings).all()):
        point.bad.append("embeddings")
    return {
        "gcl": value,
        "grad_norm_sq": float(sum(float(g.pow(2).sum()) for g in grads)),
        "grad_error_sq": w.grad_error_sum / w.grad_error_count if w.grad_error_count else None,
    }


def gradient_bias_variance(point: EvalPoint) -> dict[str, Any]:
    """``grad_bias_sq`` and ``grad_var`` from ``--grad-split R`` draws at θ (no columns without
    it; None when F is not finite). The run's own state is left as it was."""
    t = point.trainer
    repeats = t.run.config.grad_split
    if not repeats:
        return {}
    if point.exact_grads is None or point.bad:
        return {"grad_bias_sq": None, "grad_var": None}
    # the estimates are a training step's: the model in training mode (buffers restored after)
    return gradient_split(t.model, t.params, t.task, t.sampler, t.beta, t.batch_size, point.exact_grads, repeats,
                          derive_seed(t.run.seeds.probe, f"split{t.step}"), train_mode=True)


def negative_sampling_tv(point: EvalPoint) -> dict[str, Any]:
    """``sampling_tv`` and ``sampling_tv_floor`` over ``tv_steps`` probe batches at frozen θ."""
    t = point.trainer
    tv_steps = t.run.tv_steps
    if not t.task.finite_views or tv_steps <= 0 or point.bad or point.embeddings is None:
        return {"sampling_tv": None, "sampling_tv_floor": None}
    batch = max(1, min(t.batch_size, t.task.num_items - len(point.probe_anchors)))
    tv, floor = sampling_tv(t.sampler, point.embeddings, t.beta, batch_size=batch, steps=tv_steps,
                            anchors=point.probe_anchors, seed=t.run.seeds.probe + t.step,
                            where=f"at step {t.step} (sampling_tv probe)")
    return {"sampling_tv": tv, "sampling_tv_floor": floor}


def geometry(point: EvalPoint) -> dict[str, Any]:
    assert point.embeddings is not None, "exact_objective runs first"
    return {"alignment": alignment(point.embeddings), "uniformity": uniformity(point.embeddings)}


def probes(point: EvalPoint) -> dict[str, Any]:
    """Linear-probe and k-NN accuracies on frozen features (labelled tasks)."""
    t = point.trainer
    data = t.task.eval_data()
    if data is None:
        return {}
    with torch.no_grad():
        feats = [features(t, x) for x in (data.train_x, data.test_x)]
    if all(bool(torch.isfinite(f).all()) for f in feats):
        return probe_accuracies(feats[0], data.train_y, feats[1], data.test_y)
    point.bad.append("features")  # the probes cannot fit non-finite features
    return {"lp_acc": None, "knn1_acc": None, "knn10_acc": None}


def sampler_diagnostics(point: EvalPoint) -> dict[str, Any]:
    return dict(point.trainer.sampler.diagnostics())


def cost(point: EvalPoint) -> dict[str, Any]:
    """Median step and sampler times over the window, throughput, peak memory, state bytes."""
    t, w = point.trainer, point.window
    row: dict[str, Any] = {"step_ms": None, "sampler_ms": None, "samples_per_s": None}
    if w.step_seconds:
        step_s = statistics.median(w.step_seconds)
        row = {"step_ms": 1000 * step_s, "sampler_ms": 1000 * statistics.median(w.sampler_seconds),
               "samples_per_s": t.batch_size / step_s}
    return {**row, "peak_mem_bytes": peak_memory_bytes(t.device), "state_bytes": t.sampler.state_bytes()}


def negatives(point: EvalPoint) -> dict[str, Any]:
    """``no_negatives: True`` when no anchor of the window got a negative (else nothing)."""
    return {"no_negatives": True} if point.trainer.contract.window_empty() else {}


#: the metric groups of a row, in column order (see the module docstring)
METRIC_GROUPS: list[MetricGroup] = [
    progress, window_loss, exact_objective, gradient_bias_variance, negative_sampling_tv, geometry, probes,
    sampler_diagnostics, cost, negatives,
]


def features(trainer: Trainer, x: Tensor) -> Tensor:
    """Probe features of ``x`` (the encoder's ``features`` layer), chunk by chunk, on the CPU."""
    out = [trainer.model.features(x[s : s + EXACT_CHUNK].to(trainer.device)).float().cpu()
           for s in range(0, x.shape[0], EXACT_CHUNK)]
    return torch.cat(out)


@torch.no_grad()
def evaluation_views(trainer: Trainer) -> Tensor:
    """Two views of a fixed sample of items (for alignment/uniformity without finite views)."""
    gen = torch.Generator().manual_seed(trainer.run.seeds.probe + 1)
    n = trainer.task.num_items
    items = torch.randperm(n, generator=gen)[: min(n, EVAL_SAMPLE_ITEMS)]
    views = torch.full((items.numel() * 2,), -1, dtype=torch.long)
    inputs = trainer.task.inputs(items.repeat_interleave(2), views, gen).to(trainer.device)
    return trainer.model(inputs).reshape(items.numel(), 2, -1)


class Evaluator:
    """Computes the metric row of a trainer's current step with :data:`METRIC_GROUPS`."""

    def __init__(self, trainer: Trainer, groups: list[MetricGroup] | None = None) -> None:
        self.trainer = trainer
        self.groups = list(METRIC_GROUPS if groups is None else groups)
        n = trainer.task.num_items
        probe_order = torch.randperm(n, generator=torch.Generator().manual_seed(trainer.run.seeds.probe))
        #: the fixed items whose negative distributions ``sampling_tv`` compares
        self.probe_anchors: list[int] = probe_order[: min(trainer.run.config.tv_anchors, max(1, n - 1))].tolist()

    def evaluate(self) -> dict[str, Any]:
        """The metric row of the current step; the trainer's window starts again. When the
        embeddings, ``gcl`` or the probe features are not finite, the metrics that need them
        are None and ``diverged_metric`` names the first such quantity."""
        t = self.trainer
        t.at_step = t.step
        t.contract.flush()  # a deferred weight-contract violation stops the run before its row
        distributed.check_replicas(t.params, t.sampler.state_dict())
        was_training = t.model.training
        t.model.eval()
        point = EvalPoint(t, t.window, self.probe_anchors)
        row: dict[str, Any] = {}
        for group in self.groups:
            row.update(group(point))
        check_row(row)  # an impossible value (a TV above 1, ...) never reaches a table
        if point.bad:
            row["diverged_metric"] = point.bad[0]
        t.window = Window()
        t.model.train(was_training)
        return row
