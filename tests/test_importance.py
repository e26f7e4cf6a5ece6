"""``importance``: its weights against the self-normalised importance-sampling definition, its
proposal draws against q, and its negative distribution converging to the exact softmax as
K grows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from clikit import TINY_SYNTHETIC, invoke
from negbench import Batch, get_sampler
from negbench.distribution import sampling_tv
from negbench.sampler import SamplerContext
from samplerkit import frozen_views


def bound(n: int, beta: float, seed: int = 0, num_views: int | None = 2, dim: int = 4, **params):
    sampler = get_sampler("importance", **params)
    return sampler.bind(SamplerContext(n, num_views, beta, dim, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("proposal", ["uniform", "cache"])
def test_tv_to_the_exact_softmax_falls_as_k_grows(proposal):
    views = frozen_views(n=200, m=2, d=8, seed=0)
    tvs = [
        sampling_tv(get_sampler("importance", k=k, proposal=proposal), views, 5.0, batch_size=16, steps=40,
                    anchors=[0, 1, 2, 3], seed=0)[0]
        for k in (4, 16, 64, 256)
    ]
    for smaller_k, larger_k in zip(tvs, tvs[1:]):
        assert larger_k < 0.75 * smaller_k, tvs
    assert tvs[-1] < tvs[0] / 4, tvs


def cache_step(sampler, views, items, item_views, k_views):
    """One step by hand: anchors, proposal, extras (views given), weights."""
    anchor_items = torch.tensor(items).repeat_interleave(2)
    anchor_views = torch.tensor(item_views).reshape(-1)
    emb = views[anchor_items, anchor_views]
    batch = Batch.from_anchors(anchor_items, anchor_views, emb)
    extras = sampler.propose(batch)
    extras.views = k_views(extras.items)
    batch = batch.with_extras(extras)
    candidates = views[batch.candidate_items, batch.candidate_views]
    return batch, emb, sampler.weigh(emb @ candidates.T, batch)


def test_cache_proposal_weights_match_the_definition():
    beta, eps, n = 4.0, 0.2, 12
    views = frozen_views(n=n, m=2, d=4, seed=3)
    sampler = bound(n, beta, k=10, proposal="cache", eps=eps)
    pick_view = lambda items: items % 2  # noqa: E731
    cache = np.zeros((n, 4))
    for items, item_views in [([0, 1, 2], [(0, 1), (1, 0), (0, 1)]), ([3, 0, 4], [(1, 0), (1, 0), (0, 1)]),
                              ([5, 2, 6], [(0, 1), (0, 1), (1, 0)])]:
        batch, emb, weights = cache_step(sampler, views, items, item_views, pick_view)
        e = emb.double().numpy()
        # q(j) = (1-ε) · mean over anchors of softmax_j(β <e_a, cache_j>) + ε/N
        logits = beta * e @ cache.T
        softmax = np.exp(logits - logits.max(1, keepdims=True))
        softmax /= softmax.sum(1, keepdims=True)
        q = (1 - eps) * softmax.mean(0) + eps / n
        a = len(items) * 2
        extra_items = batch.candidate_items[a:].numpy()
        extra_emb = views[batch.candidate_items[a:], batch.candidate_views[a:]].double().numpy()
        expected = np.zeros_like(weights.double().numpy())
        for row in range(a):
            raw = np.array([
                math.exp(beta * float(e[row] @ extra_emb[c])) / q[j] if j != int(batch.anchor_items[row]) else 0.0
                for c, j in enumerate(extra_items)
            ])
            expected[row, a:] = raw / raw.sum()
        np.testing.assert_allclose(weights.double().numpy(), expected, rtol=1e-5, atol=1e-9)
        for k, item in enumerate(items):  # the cache now holds the items' first anchors
            cache[item] = e[2 * k]
        np.testing.assert_allclose(sampler.cache.double().numpy(), cache, rtol=0, atol=0)


def test_cache_proposal_draws_follow_q():
    views = frozen_views(n=10, m=2, d=4, seed=1)
    sampler = bound(10, 3.0, seed=4, k=20000, proposal="cache", eps=0.3)
    sampler.cache.copy_(views[:, 0])
    emb = views[[0, 0, 5, 5], [0, 1, 1, 0]]
    batch = Batch.from_anchors(torch.tensor([0, 0, 5, 5]), torch.tensor([0, 1, 1, 0]), emb)
    q = sampler.proposal_log_prob(emb).exp().double()
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-6) and float(q.min()) >= 0.3 / 10 * (1 - 1e-6)
    extras = sampler.propose(batch)
    counts = torch.bincount(extras.items, minlength=10).numpy()
    assert stats.chisquare(counts, q.numpy() / q.numpy().sum() * counts.sum()).pvalue > 1e-3


def test_large_beta_does_not_overflow():
    views = frozen_views(n=30, m=2, d=4, seed=2)
    for proposal in ("uniform", "cache"):
        sampler = bound(30, 100.0, k=16, proposal=proposal)
        for _ in range(3):
            _, _, weights = cache_step(sampler, views, [0, 7, 9], [(0, 1)] * 3, lambda items: items % 2)
            assert torch.isfinite(weights).all()
            torch.testing.assert_close(weights.sum(1), torch.ones(6))


def test_uniform_proposal_keeps_no_state():
    assert bound(30, 5.0).state_bytes() == 0
    assert bound(30, 5.0, proposal="cache").state_bytes() == 30 * 4 * 4


@pytest.mark.parametrize("proposal", ["uniform", "cache"])
def test_runs_through_the_cli(tmp_path, capsys, proposal):
    code, _, err = invoke(capsys, "run", *TINY_SYNTHETIC, "--sampler", "importance", "--set", "k=8", "--set",
                          f"proposal={proposal}", "--batch-size", "4", "--steps", "6", "--eval-every", "3", "--seed",
                          "0", "--tv-steps", "3", "--grad-error", "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    (run_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final"]["state_bytes"] == (24 * 8 * 4 if proposal == "cache" else 0)
    assert math.isfinite(summary["final"]["grad_error_sq"]) and math.isfinite(summary["final"]["sampling_tv"])
