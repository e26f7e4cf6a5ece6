"""The bias and variance of a sampler's gradient estimate at a fixed θ (``--grad-split R``).

A sampler's gradient estimate ĝ is the gradient of the surrogate ℓ (DESIGN §1.3) on one random
batch — B items drawn uniformly without replacement, two views of each, as a training step
draws them — with the sampler's own randomness, from its current state. At an evaluation
point θ with exact gradient g = ∇F(θ), R independent estimates ĝ_1 … ĝ_R are drawn, each
from the *same* starting sampler state (a fresh copy of it, with its own generator), and

    ḡ = 1/R Σ_r ĝ_r,
    grad_var     = 1/(R-1) Σ_r ‖ĝ_r - ḡ‖²              (unbiased for tr Σ = E‖ĝ - Eĝ‖²),
    grad_bias_sq = ‖ḡ - g‖² - grad_var / R              (unbiased for ‖Eĝ - g‖²).

The correction: E‖ḡ - g‖² = ‖Eĝ - g‖² + tr Σ / R, so without it the bias would be overstated
by the variance of the mean; with it a single estimate may come out slightly negative when
the bias is small against tr Σ / R. E‖ĝ - g‖² = bias² + variance is the mean-squared error.

Nothing of the run changes: the sampler is copied (its state, diagnostics and generator are
untouched), batches, views and sampler draws come from generators seeded for this
evaluation, parameter gradients are taken with ``torch.autograd.grad`` (``.grad`` untouched)
and module buffers (BatchNorm statistics) are restored. Cost: R sampler steps (encoder
forward and backward over the batch and the sampler's extras) per evaluation; the exact
gradient is the evaluation's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from negbench.distribution import clone_sampler, draw_views
from negbench.objective import surrogate_loss
from negbench.sampler import Batch, Sampler
from negbench.task import Task, resolve_free_views


def sampler_gradient(model: nn.Module, params: Sequence[nn.Parameter], task: Task, sampler: Sampler, beta: float,
                     items: Tensor, pair_views: Tensor, data_generator: torch.Generator) -> list[Tensor]:
    """∇_θ ℓ of one training-style step on ``items`` (views ``pair_views``, shape (B, 2)) with
    ``sampler`` (whose state it advances): the sampler's gradient estimate ĝ."""
    device = next(iter(params)).device
    m = task.num_views
    anchor_items = items.repeat_interleave(2)
    anchor_views = pair_views.reshape(-1)
    anchor_emb = model(task.inputs(anchor_items, anchor_views, data_generator).to(device))
    batch = Batch.from_anchors(anchor_items.to(device), anchor_views.to(device), anchor_emb.detach())
    extras = sampler.propose(batch)
    candidate_emb = anchor_emb
    if extras is not None and extras.items.numel():
        if m is not None:
            extras.views = resolve_free_views(extras.views, m, data_generator)
        extra_inputs = task.inputs(extras.items.cpu(), extras.views.cpu(), data_generator).to(device)
        candidate_emb = torch.cat([anchor_emb, model(extra_inputs)])
        batch = batch.with_extras(extras)
    with torch.no_grad():
        weights = sampler.weigh(batch.anchor_emb @ candidate_emb.detach().T, batch)
    loss = surrogate_loss(anchor_emb, candidate_emb, weights, batch.positive, beta)
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def split(estimates: Sequence[Sequence[Tensor]], exact: Sequence[Tensor]) -> dict[str, float]:
    """``grad_bias_sq`` and ``grad_var`` of the module docstring from R ≥ 2 estimates (each a
    list of per-parameter tensors) and the exact gradient."""
    if len(estimates) < 2:
        raise ValueError("the variance needs at least two estimates")
    flat = torch.stack([torch.cat([g.detach().double().reshape(-1) for g in est]) for est in estimates])
    target = torch.cat([g.detach().double().reshape(-1) for g in exact])
    r = flat.shape[0]
    mean = flat.mean(dim=0)
    var = float((flat - mean).pow(2).sum()) / (r - 1)
    bias_sq = float((mean - target).pow(2).sum()) - var / r
    return {"grad_bias_sq": bias_sq, "grad_var": var}


def gradient_split(model: nn.Module, params: Sequence[nn.Parameter], task: Task, sampler: Sampler, beta: float,
                   batch_size: int, exact: Sequence[Tensor], repeats: int, seed: int,
                   train_mode: bool = True) -> dict[str, float | None]:
    """Draw ``repeats`` estimates at the current θ from copies of ``sampler``'s state (module
    docstring) and return :func:`split` of them against ``exact`` = ∇F(θ). Every draw derives
    from ``seed``; the model (parameters, buffers, train/eval mode) and ``sampler`` are left
    as they were."""
    device = next(iter(params)).device
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train(train_mode)
    batch_generator = torch.Generator().manual_seed(seed)
    estimates = []
    try:
        for r in range(repeats):
            copy = clone_sampler(sampler, torch.Generator(device=device).manual_seed(seed + 1 + r))
            items = torch.randperm(task.num_items, generator=batch_generator)[:batch_size]
            assert task.num_views is not None, "the exact gradient needs a finite-view task"
            pair_views = draw_views(batch_size, task.num_views, batch_generator)
            estimates.append(sampler_gradient(model, params, task, copy, beta, items, pair_views, batch_generator))
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    out: dict[str, float | None] = {}
    for key, value in split(estimates, exact).items():
        out[key] = value if math.isfinite(value) else None
    return out
