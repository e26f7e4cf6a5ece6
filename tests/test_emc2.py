"""EMC² (DESIGN §2.1) against its definition: the MH sweep against a scalar reference,
log-space acceptance, burn-in, chain sharing across views, stale records, diagnostics."""

from __future__ import annotations

import pytest
import torch

from samplerkit import bound_sampler, frozen_views, run_steps

import negbench.samplers.emc2 as emc2_module
from negbench.errors import UserError
from negbench.samplers.emc2 import NOT_RECORDED, mh_sweep


def scalar_sweep(scores, columns, num, burn, column, score, log_u):
    """One chain, plain Python floats: accept when log u < s_t - stored score."""
    records = []
    accepted_late = 0
    for t in range(len(scores)):
        if t >= num:
            records.append(NOT_RECORDED)
            continue
        accept = log_u[t] < scores[t] - score
        if accept:
            column, score = columns[t], scores[t]
        if t >= burn:
            records.append(column)
            accepted_late += accept
        else:
            records.append(NOT_RECORDED)
    return column, score, records, accepted_late


@pytest.mark.parametrize(("beta", "chains", "steps"), [(1.0, 12, 9), (20.0, 12, 9), (100.0, 12, 9), (20.0, 1, 9),
                                                     (20.0, 12, 1)])
def test_sweep_matches_scalar_reference(beta, chains, steps):
    """Also on one chain and on one step, where a transpose is already contiguous: the
    inputs are left as they were."""
    gen = torch.Generator().manual_seed(int(beta))
    scores = beta * (2 * torch.rand(chains, steps, generator=gen) - 1)
    columns = torch.stack([torch.randperm(steps, generator=gen) for _ in range(chains)])
    num = torch.randint(0, steps + 1, (chains,), generator=gen)
    burn = (0.5 * num).floor().long()
    start_score = beta * (2 * torch.rand(chains, generator=gen) - 1)
    start_score[0] = float("-inf")  # unstarted chain: first proposal always accepted
    start_score[1:2] = 1e30  # a chain that rejects everything
    start_column = torch.randint(-1, steps, (chains,), generator=gen)
    log_u = torch.rand(chains, steps, generator=gen).log()
    inputs = [t.clone() for t in (scores, columns, num, burn, start_column, start_score, log_u)]
    result = mh_sweep(scores, columns, num, burn, start_column, start_score, log_u)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (scores, columns, num, burn, start_column, start_score, log_u)))
    for a in range(chains):
        col, sc, recs, late = scalar_sweep(scores[a].tolist(), columns[a].tolist(), int(num[a]), int(burn[a]),
                                           int(start_column[a]), float(start_score[a]), log_u[a].tolist())
        assert int(result.column[a]) == col and float(result.score[a]) == pytest.approx(sc)
        assert result.records[a].tolist() == recs
        assert int(result.accepted_after_burn_in[a]) == late
        assert int(result.proposals_after_burn_in[a]) == max(int(num[a]) - int(burn[a]), 0)
    if chains > 2:
        assert bool(torch.isfinite(result.score[2:]).all())
        assert int(result.column[1]) == int(start_column[1])  # all rejected: state unchanged


def test_first_proposal_is_always_accepted_and_beta_100_is_finite():
    views = frozen_views()
    sampler = bound_sampler("emc2", beta=100.0)
    (batch, weights), = run_steps(sampler, views, steps=1, batch_size=6)
    assert torch.isfinite(weights).all()
    chains = batch.anchor_items * 2 + batch.anchor_views
    assert (sampler.chain_state[chains] >= 0).all()
    assert torch.isfinite(sampler.chain_score[chains]).all()
    assert sampler.chain_score[chains].abs().max() <= 100.0 + 1e-3


def test_records_follow_burn_in():
    views = frozen_views()
    for burn_in, expected_records in [(0.0, 10), (0.5, 5), (0.75, 3)]:
        sampler = bound_sampler("emc2", burn_in=burn_in)
        (batch, weights), = run_steps(sampler, views, steps=1, batch_size=6)  # 10 valid proposals each
        # first step: all chains start unstarted, so every record is in the batch
        counts = (weights * expected_records).round()
        assert torch.allclose(weights * expected_records, counts, atol=1e-5)
        assert torch.allclose(weights.sum(1), torch.ones(12))


def test_state_is_twelve_bytes_per_chain():
    assert bound_sampler("emc2", n=40, m=2).state_bytes() == 40 * 2 * 12
    assert bound_sampler("emc2", n=40, m=None).state_bytes() == 40 * 12  # chain=item
    assert bound_sampler("emc2", n=40, m=2, chain="item").state_bytes() == 40 * 12


def test_chain_view_needs_finite_views():
    with pytest.raises(UserError, match="finite-view task; use --set chain=item"):
        bound_sampler("emc2", m=None, chain="view")


def test_chain_item_second_view_continues_first_views_chain(monkeypatch):
    """mh_sweep_pairs (one walk of 2K steps per item) is mh_sweep of row 2k, then of row 2k+1
    from the score and state row 2k ended on (its own start column if row 2k accepted nothing);
    and chain=item sweeps go through it."""
    gen = torch.Generator().manual_seed(3)
    rows, k = 12, 7
    scores = 5 * (2 * torch.rand(rows, k, generator=gen) - 1)
    columns = torch.stack([torch.randperm(k, generator=gen) for _ in range(rows)])
    num = torch.randint(0, k + 1, (rows,), generator=gen)
    burn = (0.5 * num).floor().long()
    start_column = torch.randint(-1, k, (rows,), generator=gen)
    start_score = 5 * (2 * torch.rand(rows, generator=gen) - 1)
    start_score[0] = 1e30  # row 0 accepts nothing: row 1 starts from its own column
    log_u = torch.rand(rows, k, generator=gen).log()
    got = emc2_module.mh_sweep_pairs(scores, columns, num, burn, start_column, start_score, log_u)
    first, second = slice(0, None, 2), slice(1, None, 2)
    r1 = mh_sweep(scores[first], columns[first], num[first], burn[first], start_column[first], start_score[first],
                  log_u[first])
    r2 = mh_sweep(scores[second], columns[second], num[second], burn[second],
                  torch.where(r1.accepted, r1.column, start_column[second]), r1.score, log_u[second])
    for name in ("column", "score", "accepted", "records", "accepted_after_burn_in", "proposals_after_burn_in"):
        expected = torch.stack([getattr(r1, name), getattr(r2, name)], dim=1).flatten(0, 1)
        assert torch.equal(getattr(got, name), expected), name
    assert not r1.accepted[0] and r1.accepted.any()

    calls = []
    real = emc2_module.mh_sweep_pairs
    monkeypatch.setattr(emc2_module, "mh_sweep_pairs", lambda *a: calls.append(a) or real(*a))
    sampler = bound_sampler("emc2", chain="item", kernel="reference")
    run_steps(sampler, frozen_views(), steps=3, batch_size=5)
    assert len(calls) == 3


def test_stale_drop_and_refresh():
    views = frozen_views()
    drop = bound_sampler("emc2", stale="drop", beta=20.0)
    refresh = bound_sampler("emc2", stale="refresh", beta=20.0)
    out_drop = run_steps(drop, views, steps=30, batch_size=3, seed=4)
    out_refresh = run_steps(refresh, views, steps=30, batch_size=3, seed=4)
    diag_drop, diag_refresh = drop.diagnostics(), refresh.diagnostics()
    assert diag_drop["stale_frac"] > 0.05  # with batch 3 of 40 items, chains often sit out of batch
    assert diag_drop["empty_frac"] > 0
    assert diag_refresh["empty_frac"] == 0
    # refreshed records are still counted as records on out-of-batch states
    assert diag_refresh["stale_frac"] == pytest.approx(diag_drop["stale_frac"], rel=0.5)
    # refresh asked for the stale states as owned extras, and put weight on them
    extra_mass = sum(float(w[:, b.num_anchors:].sum()) for b, w in out_refresh)
    assert extra_mass > 0
    assert all(w.shape[1] == b.num_anchors for b, w in out_drop)
    for key in ("accept_rate", "chain_age"):
        assert 0 <= diag_drop[key] and diag_refresh[key] is not None
    assert 0 < diag_drop["accept_rate"] <= 1


def test_accept_rate_counts_only_post_burn_in_proposals():
    views = frozen_views()
    sampler = bound_sampler("emc2", burn_in=0.5)
    (batch, _), = run_steps(sampler, views, steps=1, batch_size=6)
    diag = sampler.diagnostics()
    # the first accepted proposal happens at t = 0 (unstarted chains), inside the burn-in
    assert diag["accept_rate"] < 1.0
    assert diag["chain_age"] is None  # no chain had a stored score before this step
    run_steps(sampler, views, steps=3, batch_size=6, seed=1)
    assert sampler.diagnostics()["chain_age"] >= 0


def test_walk_loop_numpy_equals_torch():
    """The CPU walk (NumPy ufuncs) and the torch walk (CUDA's) give the same accept bits and
    final scores, with -inf steps (inactive), an unstarted chain (-inf - -inf = NaN: never
    accepted) and exact ties (log u == step - current: not accepted)."""
    from negbench.samplers.emc2 import _recurse_numpy, _recurse_torch

    gen = torch.Generator().manual_seed(3)
    num_steps, chains = 40, 33
    steps = (10 * torch.rand(num_steps, chains, generator=gen) - 5).round()  # many exact ties
    steps[torch.rand(num_steps, chains, generator=gen) < 0.2] = float("-inf")
    steps[:, 0] = float("-inf")
    log_u = -(2 * torch.rand(num_steps, chains, generator=gen)).round()
    start = (6 * torch.rand(chains, generator=gen) - 3).round()
    start[:2] = float("-inf")
    start[2:4], steps[0, 2:4], log_u[0, 2:4] = 0.0, -1.0, torch.tensor([-1.0, -1.5])  # a tie; just below
    outs = []
    for recurse in (_recurse_torch, _recurse_numpy):
        current, gap = start.clone(), torch.empty_like(start)
        accept = torch.empty(num_steps, chains, dtype=torch.bool)
        if recurse is _recurse_numpy:
            recurse(steps.numpy(), log_u.numpy(), current.numpy(), gap.numpy(), accept.numpy())
        else:
            recurse(steps, log_u, current, gap, accept)
        outs.append((accept, current))
    (acc_t, cur_t), (acc_n, cur_n) = outs
    assert torch.equal(acc_t, acc_n)
    assert torch.equal(cur_t.nan_to_num(), cur_n.nan_to_num())
    assert not bool(acc_t[:, 0].any())  # an all-inactive chain never moves
    assert 0.05 < float(acc_t.float().mean()) < 0.95  # the walk really accepts and rejects
    assert not bool(acc_t[0, 2]) and bool(acc_t[0, 3])  # the tie is rejected, just below it accepted
