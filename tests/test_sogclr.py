"""``sogclr``: its moving average u and its weights against a hand computation, and against
LibAUC's ``GCLoss`` (the SogCLR authors' library)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clikit import TINY_SYNTHETIC, invoke
from negbench import Batch, get_sampler, surrogate_loss
from negbench.sampler import SamplerContext
from samplerkit import frozen_views


def bind(n: int, beta: float, gamma: float = 0.9, num_views: int | None = 2):
    sampler = get_sampler("sogclr", gamma=gamma)
    return sampler.bind(SamplerContext(n, num_views, beta, 4, generator=torch.Generator().manual_seed(0)))


def step(sampler, views: torch.Tensor, items: list[int], item_views: list[tuple[int, int]]):
    """One sampler step on the in-batch candidates; returns the batch and W."""
    anchor_items = torch.tensor(items).repeat_interleave(2)
    anchor_views = torch.tensor(item_views).reshape(-1)
    emb = views[anchor_items, anchor_views]
    batch = Batch.from_anchors(anchor_items, anchor_views, emb)
    return batch, sampler.weigh(emb @ emb.T, batch)


def reference_step(u: dict[int, float], views: np.ndarray, items, item_views, beta: float, gamma: float):
    """The definition, written out with loops: updates ``u`` in place, returns W (A × A)."""
    anchors = [(i, v) for i, pair in zip(items, item_views) for v in pair]
    weights = np.zeros((len(anchors), len(anchors)))
    g = {}
    for a, (i, v) in enumerate(anchors):
        scores = [math.exp(beta * float(views[i, v] @ views[j, w])) for (j, w) in anchors if j != i]
        g.setdefault(i, []).append(sum(scores) / len(scores))
    for i in items:
        mean_g = sum(g[i]) / 2
        u[i] = mean_g if i not in u else (1 - gamma) * u[i] + gamma * mean_g
    for a, (i, v) in enumerate(anchors):
        negatives = [c for c, (j, _) in enumerate(anchors) if j != i]
        for c in negatives:
            j, w = anchors[c]
            weights[a, c] = math.exp(beta * float(views[i, v] @ views[j, w])) / (len(negatives) * u[i])
    return weights


def test_u_and_weights_match_a_hand_computation_over_three_steps():
    beta, gamma = 3.0, 0.7
    views = frozen_views(n=6, m=3, d=4, seed=5)
    sampler = bind(6, beta, gamma, num_views=3)
    schedule = [
        ([0, 1, 2], [(0, 1), (2, 0), (1, 2)]),  # every item's first visit: γ = 1
        ([2, 3, 0, 4], [(1, 2), (0, 1), (2, 0), (0, 2)]),  # 2 and 0 revisited, 3 and 4 new: per item
        ([4, 1, 2], [(2, 1), (0, 1), (0, 2)]),  # all revisited (2 for the third time)
    ]
    u: dict[int, float] = {}
    for items, item_views in schedule:
        _, weights = step(sampler, views, items, item_views)
        expected = reference_step(u, views.double().numpy(), items, item_views, beta, gamma)
        np.testing.assert_allclose(weights.double().numpy(), expected, rtol=2e-5, atol=1e-12)
        for i in range(6):
            got = float(sampler.log_u[i])
            if i in u:
                assert got == pytest.approx(math.log(u[i]), rel=1e-5, abs=1e-6)
            else:
                assert got == float("-inf"), "an unvisited item keeps u = -inf"


def test_large_beta_stays_finite_and_weights_are_bounded_by_two_over_gamma():
    views = frozen_views(n=30, m=2, d=4, seed=2)
    sampler = bind(30, beta=100.0, gamma=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        items = torch.randperm(30, generator=gen)[:6].tolist()
        _, weights = step(sampler, views, items, [(0, 1)] * 6)
        assert torch.isfinite(weights).all() and torch.isfinite(sampler.log_u[items]).all()
        assert float(weights.max()) <= 2 / 0.5 + 1e-4


# ---- LibAUC cross-check ---------------------------------------------------------------------
def libauc_gcloss():
    try:
        from libauc.losses import GCLoss
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("libauc not installed: pip install --no-deps libauc==2.0.1")
    return GCLoss


def run_both(hidden_pairs, batches, beta: float, gamma: float, n: int):
    """Feed the same batches to LibAUC's GCLoss (SogCLR, unimodal) and to ours; per step yield
    (libauc u, our u, libauc grads, our grads) for the batch items."""
    loss_fn = libauc_gcloss()(mode="unimodal", N=n, tau=1 / beta, gamma=gamma, device=torch.device("cpu"))
    sampler = bind(n, beta, gamma)
    for (h1, h2), index in zip(hidden_pairs, batches):
        index = torch.tensor(index)
        a1, a2 = h1.clone().requires_grad_(), h2.clone().requires_grad_()
        loss_fn(a1, a2, index).backward()

        b1, b2 = h1.clone().requires_grad_(), h2.clone().requires_grad_()
        emb = torch.stack([F.normalize(b1, dim=1), F.normalize(b2, dim=1)], dim=1).flatten(0, 1)
        batch = Batch.from_anchors(index.repeat_interleave(2), torch.tensor([0, 1]).repeat(len(index)), emb.detach())
        weights = sampler.weigh(emb.detach() @ emb.detach().T, batch)
        surrogate_loss(emb, emb, weights, batch.positive, beta).backward()
        yield (loss_fn.loss_fn.u[index].squeeze(1), sampler.log_u[index].exp(),
               torch.cat([a1.grad, a2.grad]), torch.cat([b1.grad, b2.grad]))


BATCHES = [[0, 1, 2, 3], [4, 5, 6, 7], [2, 0, 3, 1], [5, 7, 4, 6], [1, 2, 0, 3]]
# LibAUC's first-visit rule is per batch (γ = 1 while every u in the batch is 0): each batch
# above is all-new or all-revisited, where it coincides with ours.


def test_u_matches_libauc_gcloss():
    beta, gamma, n = 5.0, 0.9, 8
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)) for _ in BATCHES]
    for u_libauc, u_ours, _, _ in run_both(pairs, BATCHES, beta, gamma, n):
        torch.testing.assert_close(u_ours, u_libauc, rtol=1e-5, atol=0)


def test_gradient_is_beta_over_two_times_libauc_gcloss():
    """LibAUC weighs view v by its own partial update (1-γ)u + γ g_v, we by the averaged u
    (the paper's Algorithm 1): they coincide when g_1 = g_2 for every item, which holds when
    the second views are a reflection H (symmetric, orthogonal) of the first: then
    <e1_i, e2_j> = <e2_i, e1_j> and <e2_i, e2_j> = <e1_i, e1_j>."""
    beta, gamma, n = 5.0, 0.9, 8
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(6, 1, generator=gen)
    reflection = torch.eye(6) - 2 * v @ v.T / (v.T @ v)
    pairs = []
    for _ in BATCHES:
        h1 = torch.randn(4, 6, generator=gen)
        pairs.append((h1, h1 @ reflection))
    for u_libauc, u_ours, grad_libauc, grad_ours in run_both(pairs, BATCHES, beta, gamma, n):
        torch.testing.assert_close(u_ours, u_libauc, rtol=1e-5, atol=0)
        assert float(grad_ours.norm()) > 1e-3
        torch.testing.assert_close(grad_ours, beta / 2 * grad_libauc, rtol=1e-4, atol=1e-6)


def test_runs_through_the_cli(tmp_path, capsys):
    code, _, err = invoke(capsys, "run", *TINY_SYNTHETIC, "--sampler", "sogclr", "--batch-size", "4", "--steps", "6",
                          "--eval-every", "3", "--seed", "0", "--tv-steps", "3", "--grad-error",
                          "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    (run_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final"]["state_bytes"] == 24 * 4
    assert math.isfinite(summary["final"]["grad_error_sq"]) and math.isfinite(summary["final"]["sampling_tv"])
