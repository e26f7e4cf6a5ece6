"""``neg_cache``: its draws follow the softmax over the cache (never the anchor's own item), its
weights sit on the drawn extras, its cache is maintained as documented, and at frozen
embeddings it samples the exact softmax."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from clikit import TINY_SYNTHETIC, invoke
from negbench import Batch, UserError, get_sampler
from negbench.distribution import exact_negative_distribution, frozen_step, iid_tv_floor, negative_distribution, negative_distribution_counts, total_variation
from negbench.sampler import SamplerContext
from samplerkit import frozen_views


def bound(n: int, beta: float, num_views: int | None = 2, dim: int = 4, seed: int = 0, **params):
    sampler = get_sampler("neg_cache", **params)
    return sampler.bind(SamplerContext(n, num_views, beta, dim, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("mode", ["view", "item"])
def test_draws_follow_the_cache_softmax_and_never_the_own_item(mode, chunked, monkeypatch):
    if chunked:  # one anchor per chunk: the memory-bounded path of large caches
        monkeypatch.setattr("negbench.samplers.neg_cache.MAX_SCORES", 1)
    n, m, beta, draws = 12, 2, 2.0, 6000
    sampler = bound(n, beta, num_views=m if mode == "view" else None, k=draws, cache=mode)
    rows = n * m if mode == "view" else n
    cache = frozen_views(n=rows, m=1, d=4, seed=7)[:, 0]
    sampler.cache_emb.copy_(cache)
    anchor_items = torch.tensor([3, 3, 8, 8])
    emb = frozen_views(n=4, m=1, d=4, seed=8)[:, 0]
    extras = sampler.propose(Batch.from_anchors(anchor_items, torch.tensor([0, 1, 1, 0]), emb))
    drawn = extras.items * m + extras.views if mode == "view" else extras.items
    for anchor in range(4):
        own = int(anchor_items[anchor])
        mine = extras.owner == anchor
        assert int(mine.sum()) == draws
        assert not bool((extras.items[mine] == own).any()), "drew the anchor's own item"
        counts = np.bincount(drawn[mine].numpy(), minlength=rows)
        row_item = np.arange(rows) // (m if mode == "view" else 1)
        logits = beta * (cache.double() @ emb[anchor].double()).numpy()
        expected = np.exp(logits - logits.max()) * (row_item != own)
        expected *= draws / expected.sum()
        keep = row_item != own
        assert stats.chisquare(counts[keep], expected[keep]).pvalue > 1e-3


def test_weights_are_one_over_k_on_the_anchors_own_draws():
    views = frozen_views(n=20, m=2, d=4, seed=1)
    sampler = bound(20, 5.0, k=3)
    gen = torch.Generator().manual_seed(0)
    items = torch.tensor([2, 5, 11, 17])
    batch, weights = frozen_step(sampler, views, items, torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]]), gen)
    a = batch.num_anchors
    assert (weights[:, :a] == 0).all(), "no weight on in-batch candidates"
    owner = torch.arange(a).repeat_interleave(3)
    expected = (owner[None, :] == torch.arange(a)[:, None]).float() / 3
    torch.testing.assert_close(weights[:, a:], expected)
    # the extras are the drawn views (cache=view on a finite-view task), never the own item
    assert (batch.candidate_views[a:] >= 0).all()
    assert not (batch.candidate_items[a:] == batch.anchor_items[owner]).any()


def test_cache_is_filled_once_then_overwritten_by_batches_and_refreshed_stalest_first():
    n, m, d = 10, 2, 4
    views = frozen_views(n=n, m=m, d=d, seed=2)
    sampler = bound(n, 5.0, k=1, refresh_frac=0.25)  # ⌈0.25 · 20⌉ = 5 rows per refresh
    requested: list[torch.Tensor] = []

    def encode(items, item_views):
        requested.append(items * m + item_views)
        return views[items, item_views]

    items, item_views = torch.tensor([1, 4]), torch.tensor([[0, 1], [1, 0]])
    anchor_items, anchor_views = items.repeat_interleave(2), item_views.reshape(-1)
    emb = views[anchor_items, anchor_views] * 0.5  # distinguishable from a refresh
    batch = Batch.from_anchors(anchor_items, anchor_views, emb)
    batch = batch.with_extras(sampler.propose(batch))
    sampler.weigh(torch.zeros(4, batch.candidate_items.numel()), batch)
    written = anchor_items * m + anchor_views
    torch.testing.assert_close(sampler.cache_emb[written], emb)
    assert (sampler.cache_step[written] == 0).all() and sampler.steps_done == 1

    sampler.refresh(encode)  # first refresh: a full pass over all N·m rows
    assert sorted(requested[-1].tolist()) == list(range(n * m))
    torch.testing.assert_close(sampler.cache_emb, views.reshape(n * m, d))
    assert (sampler.cache_step == 1).all()

    sampler.cache_step.copy_(torch.arange(n * m, dtype=torch.int32).flip(0))  # row 19 is the stalest
    sampler.refresh(encode)
    assert sorted(requested[-1].tolist()) == [15, 16, 17, 18, 19]
    assert (sampler.cache_step[15:] == sampler.steps_done).all()


def test_frozen_embeddings_with_a_view_cache_sample_the_exact_softmax():
    """Once filled, the cache equals the frozen embeddings, so the draws are exact: the TV to
    p must sit at the i.i.d. floor of as many draws."""
    views = frozen_views(n=100, m=2, d=8, seed=0)
    k, anchors = 16, [0, 1, 2, 3]
    sampler = bound(100, 5.0, dim=8, k=k)
    sampler.refresh(lambda items, item_views: views[items, item_views])  # the first refresh fills it
    q, appearances = negative_distribution_counts(sampler, views, 5.0, batch_size=8, steps=60,
                                                  anchors=anchors, seed=0)
    p = exact_negative_distribution(views, 5.0, anchors)
    tv = float(total_variation(q, p).mean())
    floors = [iid_tv_floor(p, appearances * k, torch.Generator().manual_seed(s)) for s in range(5)]
    assert tv < 1.1 * max(floors), (tv, floors)


def test_state_bytes():
    assert bound(10, 5.0, dim=4).state_bytes() == 10 * 2 * (4 * 4 + 4)
    assert bound(10, 5.0, num_views=None, dim=4).state_bytes() == 10 * (4 * 4 + 4)
    with pytest.raises(UserError, match="finite-view"):
        bound(10, 5.0, num_views=None, cache="view")


def test_runs_through_the_cli(tmp_path, capsys):
    code, _, err = invoke(capsys, "run", *TINY_SYNTHETIC, "--sampler", "neg_cache", "--set", "k=2", "--batch-size", "4",
                          "--steps", "6", "--eval-every", "3", "--seed", "0", "--tv-steps", "3", "--grad-error",
                          "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    (run_dir,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final"]["state_bytes"] == 24 * 2 * (8 * 4 + 4)
    assert summary["final"]["cache_age"] >= 0
    assert math.isfinite(summary["final"]["grad_error_sq"]) and math.isfinite(summary["final"]["sampling_tv"])


def test_resume_reproduces_the_next_weights_while_embeddings_move():
    """The conformance round trip runs at frozen embeddings, where a filled cache never
    changes; here the embeddings move every step, so the next draws depend on every part of
    the state (rows, their ages, the step counter, whether the first full pass happened).
    W alone is 1/K on the owned extras whatever was drawn: compare the draws too."""

    def steps(sampler, first: int, count: int):
        out = []
        for t in range(first, first + count):
            gen = torch.Generator().manual_seed(100 + t)
            views = frozen_views(n=20, m=2, d=4, seed=t)
            items = torch.randperm(20, generator=gen)[:4]
            batch, weights = frozen_step(sampler, views, items, torch.tensor([[0, 1]] * 4), gen)
            out.append((batch.candidate_items, batch.candidate_views, weights))
        return out

    reference = bound(20, 5.0, k=2, refresh_frac=0.1)
    steps(reference, 0, 3)
    state, generator_state = reference.state_dict(), reference.generator.get_state()
    expected = steps(reference, 3, 4)
    resumed = bound(20, 5.0, seed=9, k=2, refresh_frac=0.1)
    resumed.load_state_dict(state)
    resumed.generator.set_state(generator_state)
    got = steps(resumed, 3, 4)
    for step_expected, step_got in zip(expected, got):  # the same draws, the same weights
        for x1, x2 in zip(step_expected, step_got):
            assert torch.equal(x1, x2)
