"""A sampler's empirical negative distribution at frozen embeddings (DESIGN §4, `sampling_tv`).

At fixed embeddings the exact target of anchor view (i, a) is

    p_ia(j, c) = exp(β <e_ia, e_jc>) / Σ_{j' ∉ P, c'} exp(β <e_ia, e_j'c'>)   for j ∉ P,

with P the probe items. :func:`negative_distribution` runs a copy of a sampler for a number of
probe batches and accumulates the weight mass it puts on each candidate view; the total
variation ``½ Σ |q - p|`` against the target measures its sampling bias plus noise, and
:func:`iid_tv_floor` gives the noise alone for exact i.i.d. draws of the same size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from negbench.contract import check_now, check_range
from negbench.sampler import Batch, Sampler, SamplerContext, join_candidates
from negbench.task import resolve_free_views

__all__ = [
    "negative_distribution",
    "exact_negative_distribution",
    "total_variation",
    "iid_tv_floor",
    "sampling_tv",
    "clone_sampler",
    "draw_views",
    "frozen_step",
]


def clone_sampler(sampler: Sampler, generator: torch.Generator) -> Sampler:
    """A new sampler with the same parameters and a copy of the state, drawing from
    ``generator`` (the original is left untouched)."""
    assert sampler.context is not None
    copy = type(sampler)(**sampler.config)
    copy.bind(replace(sampler.context, generator=generator))
    copy.load_state_dict(sampler.state_dict())
    return copy


def draw_views(num_items: int, num_views: int, generator: torch.Generator) -> Tensor:
    """Two distinct views of each of ``num_items`` items, in random order: shape (num_items, 2).

    With m = 2 that is (0, 1) or (1, 0); which view is anchored first matters for samplers
    that share state across the two views, so the order is random."""
    keys = torch.rand(num_items, num_views, generator=generator)
    return keys.argsort(dim=1)[:, :2]


def exact_negative_distribution(views: Tensor, beta: float, anchors: Sequence[int]) -> Tensor:
    """The exact target: row ``m·k + a`` is the softmax of β<views[anchors[k], a], views[j, c]>
    over column ``m·j + c`` for every item j not in ``anchors`` (0 on probe-item columns)."""
    n, m, d = views.shape
    anchor_ids = torch.as_tensor(list(anchors), device=views.device)
    rows = views[anchor_ids].reshape(-1, d)
    flat = views.reshape(n * m, d)
    is_probe = torch.zeros(n, dtype=torch.bool, device=views.device)
    is_probe[anchor_ids] = True
    logits = (beta * rows.double() @ flat.double().T).masked_fill(
        is_probe.repeat_interleave(m)[None, :], float("-inf")
    )
    return torch.softmax(logits, dim=1)


def total_variation(q: Tensor, p: Tensor) -> Tensor:
    """Per-row total-variation distance ½ Σ_c |q_c - p_c|."""
    return 0.5 * (q.double() - p.double()).abs().sum(dim=1)


def iid_tv_floor(p: Tensor, num_samples: Tensor | int, generator: torch.Generator) -> float:
    """Mean TV between each row of ``p`` and the empirical distribution of ``num_samples``
    i.i.d. exact draws from it: the noise floor of a sampler fed that many samples."""
    counts = torch.as_tensor(num_samples).expand(p.shape[0])
    tvs = []
    for row, n in zip(p.double().cpu(), counts.tolist()):
        n = int(n)
        if n <= 0:
            continue
        draws = torch.multinomial(row, n, replacement=True, generator=generator)
        empirical = torch.bincount(draws, minlength=row.numel()).double() / n
        tvs.append(float(total_variation(empirical[None], row[None])))
    return sum(tvs) / max(len(tvs), 1)


@torch.no_grad()
def frozen_step(
    sampler: Sampler,
    views: Tensor,
    items: Tensor,
    item_views: Tensor,
    data_generator: torch.Generator,
    probe_items: Tensor | None = None,
) -> tuple[Batch, Tensor]:
    """One sampler step at frozen embeddings ``views`` (N, m, d): the anchors are views
    ``item_views[k, 0]`` and ``item_views[k, 1]`` of ``items[k]``; extras the sampler asks for
    are looked up in ``views`` (a free view -1 drawn uniformly), stale extras taken as the
    sampler gives them. With ``probe_items`` (a bool
    per item), anchors of probe items get no probe-item candidate. Returns the batch (with
    extras) and the sampler's weights (unchecked: :func:`negative_distribution` checks them
    against the weight contract; the conformance suite has its own checks)."""
    m = views.shape[1]
    anchor_items = items.repeat_interleave(2)
    anchor_views = item_views.reshape(-1)
    anchor_emb = views[anchor_items, anchor_views]
    batch = Batch.from_anchors(anchor_items, anchor_views, anchor_emb)
    probe_rows = None
    if probe_items is not None:
        probe_rows = probe_items[anchor_items]
        batch.valid &= ~(probe_rows[:, None] & probe_rows[None, :])
    extras = sampler.propose(batch)
    extra_valid = None
    if probe_rows is not None and extras is not None and extras.items.numel():
        extra_valid = ~(probe_rows[:, None] & probe_items[extras.items][None, :])
    batch, candidate_emb = join_candidates(
        batch, anchor_emb, extras, lambda it, vw: views[it, vw],
        lambda vw: resolve_free_views(vw, m, data_generator), extra_valid,
    )
    weights = sampler.weigh(anchor_emb @ candidate_emb.T, batch)
    sampler.refresh(lambda it, vw: views[it, torch.where(vw < 0, 0, vw)])
    return batch, weights


@torch.no_grad()
def negative_distribution(
    sampler: Sampler,
    views: Tensor,
    beta: float,
    *,
    batch_size: int,
    steps: int,
    anchors: Sequence[int],
    seed: int,
    where: str = "in a sampling_tv probe",
) -> Tensor:
    """The sampler's accumulated negative distribution q_a at frozen embeddings, to compare
    with the exact softmax p_a(j, c) ∝ exp(β <e_a, e_jc>) over the views of every other item.

    Each of ``steps`` probe batches holds the probe items ``anchors`` plus ``batch_size``
    other items drawn uniformly without replacement from the rest; a probe anchor's valid
    candidates are views of those other items only, and extras the sampler asks for are
    looked up in ``views`` (probe items are never valid candidates). q_a is the weight mass
    the sampler put on each candidate view, summed over the batches and normalised. Runs on a
    copy of the sampler (bound to these sizes if it is not bound yet); the sampler passed in
    is not modified.

    Args:
        sampler: a sampler, bound or not.
        views: (N, m, d) L2-normalised embeddings.
        beta: the inverse temperature β.
        batch_size: the other items of each probe batch.
        steps: the number of probe batches.
        anchors: the distinct probe item ids.
        seed: seeds the batches, the views and the sampler's generator.
        where: how a weight-contract error names this measurement.

    Every probe batch's W is checked against the weight contract (``where`` names the place in
    the error).

    Returns:
        (m·P, m·N) with P = len(anchors): row ``m·k + a`` is anchor view (anchors[k], a),
        column ``m·j + c`` candidate view (j, c); each row sums to 1 (probe-item columns are
        0; a row never anchored is all 0). :func:`negative_distribution_counts` also returns
        how often each row was an anchor.

    Example:
        >>> views = torch.nn.functional.normalize(torch.randn(20, 2, 4), dim=2)
        >>> q = negative_distribution(get_sampler("in_batch"), views, 5.0, batch_size=8, steps=50, anchors=[0, 1], seed=0)
        >>> q.shape
        torch.Size([4, 40])
    """
    return negative_distribution_counts(sampler, views, beta, batch_size=batch_size, steps=steps,
                                        anchors=anchors, seed=seed, where=where)[0]


def negative_distribution_counts(
    sampler: Sampler,
    views: Tensor,
    beta: float,
    *,
    batch_size: int,
    steps: int,
    anchors: Sequence[int],
    seed: int,
    where: str = "in a sampling_tv probe",
) -> tuple[Tensor, Tensor]:
    """:func:`negative_distribution` and, per row, the number of probe batches in which it
    was an anchor: ``(q, appearances)``, shapes (m·P, m·N) and (m·P,)."""
    n, m, d = views.shape
    anchor_list = [int(i) for i in anchors]
    if len(set(anchor_list)) != len(anchor_list) or not anchor_list:
        raise ValueError("anchors must be distinct item ids")
    num_probe = len(anchor_list)
    if batch_size < 1 or batch_size + num_probe > n:
        raise ValueError(f"batch_size + len(anchors) must be in [1+len(anchors), N={n}]")
    device = views.device
    generator = torch.Generator(device=device).manual_seed(seed)
    data_generator = torch.Generator().manual_seed(seed + 1)
    if sampler.context is None:
        context = SamplerContext(n, m, beta, d, device, generator)
        probe_sampler = type(sampler)(**sampler.config).bind(context)
    else:
        probe_sampler = clone_sampler(sampler, generator)

    probe_ids = torch.tensor(anchor_list)
    is_probe = torch.zeros(n, dtype=torch.bool)
    is_probe[probe_ids] = True
    others = torch.nonzero(~is_probe).squeeze(1)
    mass = torch.zeros(num_probe * m, n * m, dtype=torch.float64, device=device)
    appearances = torch.zeros(num_probe * m, dtype=torch.long)
    is_probe_dev = is_probe.to(device)

    for _ in range(steps):
        chosen = others[torch.randperm(others.numel(), generator=data_generator)[:batch_size]]
        items = torch.cat([probe_ids, chosen]).to(device)
        item_views = draw_views(items.numel(), m, data_generator).to(device)
        batch, weights = frozen_step(probe_sampler, views, items, item_views, data_generator, is_probe_dev)
        # a probe anchor may be left empty: extras a sampler drew are invalid when they are probe items
        check_now(weights, batch, probe_sampler, where, allow_empty=True)
        probe_rows = is_probe_dev[batch.anchor_items]
        rows = torch.nonzero(probe_rows).squeeze(1)
        row_ids = torch.arange(num_probe, device=device).repeat_interleave(2) * m + batch.anchor_views[rows]
        columns = batch.candidate_items * m + batch.candidate_views
        contribution = torch.zeros(rows.numel(), n * m, dtype=torch.float64, device=device)
        contribution.index_add_(1, columns, weights[rows].double())
        mass.index_add_(0, row_ids, contribution)
        appearances.index_add_(0, row_ids.cpu(), torch.ones(rows.numel(), dtype=torch.long))

    mass[:, is_probe_dev.repeat_interleave(m)] = 0.0
    totals = mass.sum(dim=1, keepdim=True)
    distribution = torch.where(totals > 0, mass / totals.clamp_min(1e-300), mass)
    return distribution, appearances


def sampling_tv(
    sampler: Sampler,
    views: Tensor,
    beta: float,
    *,
    batch_size: int,
    steps: int,
    anchors: Sequence[int],
    seed: int,
    where: str = "in a sampling_tv probe",
) -> tuple[float, float]:
    """``(sampling_tv, sampling_tv_floor)``: the mean TV between the sampler's negative
    distribution and the exact one, and the same for i.i.d. exact draws with as many samples
    as the sampler drew negatives (:meth:`~negbench.sampler.Sampler.negatives_per_anchor`: 2·batch_size
    in-batch candidates by default, K for ``importance`` and ``neg_cache``, per probe batch in
    which the row was an anchor; 0 for a sampler whose weights are exact). Rows never anchored
    are left out. Both are checked to lie in [0, 1] (:func:`negbench.contract.check_range`)."""
    q, appearances = negative_distribution_counts(
        sampler, views, beta, batch_size=batch_size, steps=steps, anchors=anchors, seed=seed, where=where,
    )
    p = exact_negative_distribution(views, beta, anchors).to(q.device)
    seen = appearances > 0
    tv = float(total_variation(q[seen.to(q.device)], p[seen.to(p.device)]).mean())
    floor_generator = torch.Generator().manual_seed(seed + 2)
    check_range("sampling_tv", tv)
    per_anchor = sampler.negatives_per_anchor(batch_size)
    if per_anchor is None:
        return tv, 0.0
    floor = iid_tv_floor(p[seen.to(p.device)], appearances[seen] * per_anchor, floor_generator)
    check_range("sampling_tv_floor", floor)
    return tv, floor
