"""``uniform``, ``in_batch`` and ``full_softmax`` against their definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from negbench import get_task
from negbench.distribution import draw_views, frozen_step, sampling_tv
from negbench.objective import exact_gradient, surrogate_loss
from negbench.sampler import Batch
from reference import nt_xent_reference
from samplerkit import BETA, bound_sampler, frozen_views


def surrogate_gradient(model, task, sampler, items, pair_views, beta):
    """The runner's estimator: encode anchors (and extras), weigh, backprop ℓ."""
    anchor_items = items.repeat_interleave(2)
    anchor_views = pair_views.reshape(-1)
    inputs = task.all_views()
    anchor_emb = model(inputs[anchor_items, anchor_views])
    batch = Batch.from_anchors(anchor_items, anchor_views, anchor_emb.detach())
    extras = sampler.propose(batch)
    candidate_emb = anchor_emb
    if extras is not None:
        batch = batch.with_extras(extras)
        candidate_emb = torch.cat([anchor_emb, model(inputs[extras.items, extras.views])])
    weights = sampler.weigh(batch.anchor_emb @ candidate_emb.detach().T, batch)
    loss = surrogate_loss(anchor_emb, candidate_emb, weights, batch.positive, beta)
    return torch.autograd.grad(loss, list(model.parameters()))


def test_full_softmax_with_the_whole_data_set_gives_the_exact_gradient():
    task = get_task("synthetic", num_items=20, input_dim=6, hidden=8, dim=5)
    task.load(seed=0)
    torch.manual_seed(0)
    model = task.make_encoder().double()
    task.view_inputs = task.view_inputs.double()
    sampler = bound_sampler("full_softmax", n=20, m=2, beta=BETA)
    items = torch.randperm(20)
    pair_views = draw_views(20, 2, torch.Generator().manual_seed(0))
    estimate = surrogate_gradient(model, task, sampler, items, pair_views, BETA)
    _, exact = exact_gradient(model, list(model.parameters()), task.all_views(), BETA, chunk_size=7)
    flat_est = torch.cat([g.flatten() for g in estimate])
    flat_exact = torch.cat([g.flatten() for g in exact])
    assert torch.linalg.norm(flat_est - flat_exact) <= 1e-5 * torch.linalg.norm(flat_exact)


def test_in_batch_with_positive_is_exactly_nt_xent():
    torch.manual_seed(0)
    num_items, dim, beta = 6, 5, 7.0
    raw = torch.randn(2 * num_items, dim, dtype=torch.float64, requires_grad=True)
    z = F.normalize(raw, dim=1)
    expected = torch.autograd.grad(nt_xent_reference(z, beta), raw)[0]

    sampler = bound_sampler("in_batch", n=num_items, beta=beta, include_positive=True)
    items = torch.arange(num_items).repeat_interleave(2)
    z2 = F.normalize(raw, dim=1)
    batch = Batch.from_anchors(items, torch.tensor([0, 1]).repeat(num_items), z2.detach())
    weights = sampler.weigh(z2.detach() @ z2.detach().T, batch)
    got = torch.autograd.grad(surrogate_loss(z2, z2, weights, batch.positive, beta), raw)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_in_batch_without_positive_is_the_softmax_over_negatives():
    views = frozen_views()
    sampler = bound_sampler("in_batch", include_positive=False)
    batch, weights = frozen_step(sampler, views, torch.arange(5), draw_views(5, 2, torch.Generator().manual_seed(0)), torch.Generator())
    sims = batch.anchor_emb @ batch.anchor_emb.T
    for a in range(batch.num_anchors):
        mask = batch.valid[a]
        expected = torch.softmax(BETA * sims[a][mask], 0)
        torch.testing.assert_close(weights[a][mask], expected)
        assert weights[a, batch.positive[a]] == 0


def test_uniform_weights_are_equal():
    views = frozen_views()
    sampler = bound_sampler("uniform")
    batch, weights = frozen_step(sampler, views, torch.arange(4), draw_views(4, 2, torch.Generator()), torch.Generator())
    assert torch.allclose(weights[batch.valid], torch.full_like(weights[batch.valid], 1 / 6))


@pytest.mark.parametrize("beta", [5.0, 10.0])
def test_uniform_is_biased_and_full_softmax_is_exact(beta):
    views = frozen_views(n=60, d=4, seed=2)
    kwargs = dict(batch_size=12, steps=200, anchors=[0, 1, 2, 3], seed=0)
    uniform_tv, uniform_floor = sampling_tv(bound_sampler("uniform", n=60, beta=beta), views, beta, **kwargs)
    exact_tv, exact_floor = sampling_tv(bound_sampler("full_softmax", n=60, beta=beta), views, beta, **kwargs)
    assert uniform_tv > 3 * uniform_floor, (uniform_tv, uniform_floor)
    # zero bias, and exact weights have no sampling noise: floor 0 (negatives_per_anchor is None)
    assert exact_tv < 1e-6 and exact_floor == 0.0
    # and the distribution function itself: in_batch at frozen embeddings is unbiased too
    # only up to the O(batch) softmax-over-batch effect; it must land between the two
    batch_tv, _ = sampling_tv(bound_sampler("in_batch", n=60, beta=beta, include_positive=False), views, beta, **kwargs)
    assert exact_tv < batch_tv < uniform_tv
