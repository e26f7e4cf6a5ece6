"""The fused EMC² sweep (C on the CPU, Triton on CUDA) against the pure-PyTorch reference
``mh_sweep``: identical states, scores, records and counts for identical random numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from negbench.errors import UserError
from negbench.kernels import emc2 as kernels
from negbench.samplers import emc2 as emc2_module
from negbench.samplers.emc2 import NOT_RECORDED, OUT_OF_BATCH, fused_sweep, mh_sweep, reference_sweep, tally
from samplerkit import bound_sampler, frozen_views, run_steps

FIELDS = ("column", "score", "accepted", "records", "accepted_after_burn_in", "proposals_after_burn_in")
TALLIES = ("counts", "used", "out_of_batch", "recorded")

pytestmark = pytest.mark.skipif(kernels.unavailable_reason("cpu") is not None,
                                reason=f"no fused CPU sweep here: {kernels.unavailable_reason('cpu')}")


def random_sweep_inputs(seed: int, rows: int, k: int, beta: float, device: str = "cpu", extra_columns: int = 3):
    """Inputs like a step's: valid masks with different numbers of proposals per row (some
    none), burn-in lengths from 0 to all, keys with ties, unstarted (-inf), all-rejecting
    (+inf, or a score no proposal beats) and out-of-batch (-1) chains."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(rows, k, generator=g) < torch.rand(rows, 1, generator=g)
    valid[0] = False  # a row without proposals
    keys = torch.rand(rows, k, generator=g)
    keys[rows // 2 :] = (keys[rows // 2 :] * 4).floor() / 4  # many ties: the order must be stable
    keys = keys.masked_fill(~valid, 2.0)
    num_proposals = valid.sum(1)
    burn_in = (torch.rand(rows, generator=g) * (num_proposals + 1)).floor().long().clamp(max=num_proposals)
    sims = torch.rand(rows, k, generator=g) * 2 - 1
    logits = (beta * sims).float()
    log_u = torch.rand(rows, k, generator=g).log()
    column = torch.randint(-1, k + extra_columns, (rows,), generator=g)  # start columns may be extras
    score = (beta * (torch.rand(rows, generator=g) * 2 - 1)).float()
    kind = torch.randint(0, 4, (rows,), generator=g)
    score[kind == 0] = float("-inf")  # not started: the first proposal is always accepted
    score[kind == 1] = float("inf")  # rejects everything
    score[kind == 2] = 1e30  # rejects everything too (a finite score no proposal beats)
    column[kind == 0] = OUT_OF_BATCH
    column[(kind == 1) & (torch.arange(rows) % 2 == 0)] = OUT_OF_BATCH  # stuck on an out-of-batch state
    args = (logits, keys, log_u, num_proposals, burn_in, column, score)
    return tuple(t.to(device) for t in args)


def assert_same(got, expected, fields=FIELDS):
    for name in fields:
        a, b = getattr(got, name), getattr(expected, name)
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs:\n{a}\n{b}"


def test_a_hand_computed_sweep():
    """One row, proposals visited in key order 1, 0, 2 (the tie between columns 0 and 2 is
    broken by column); log U decides each step."""
    logits = torch.tensor([[1.0, 5.0, 3.0, 9.0]])
    keys = torch.tensor([[0.5, 0.1, 0.5, 2.0]])  # column 3 is invalid
    log_u = torch.tensor([[-1.0, 0.0, -2.5, 0.0]])
    num_proposals, burn_in = torch.tensor([3]), torch.tensor([1])
    column, score = torch.tensor([-1]), torch.tensor([4.0])
    # t=0: c=1, 5-4=1 > -1: accept (ℓ=5, burn-in); t=1: c=0, 1-5=-4 < 0: reject;
    # t=2: c=2, 3-5=-2 > -2.5: accept (ℓ=3)
    for result in (reference_sweep(logits, keys, log_u, num_proposals, burn_in, column, score),
                   fused_sweep(logits, keys, log_u, num_proposals, burn_in, column, score)):
        assert result.records.tolist() == [[NOT_RECORDED, 1, 2, NOT_RECORDED]]
        assert result.column.tolist() == [2] and result.score.tolist() == [3.0]
        assert result.accepted.tolist() == [True] and result.accepted_after_burn_in.tolist() == [1]
        assert result.proposals_after_burn_in.tolist() == [2]


def threshold_inputs():
    """Two rows whose first log U equals the threshold β s − ℓ exactly (reject: strict <)."""
    logits = torch.tensor([[0.7, 0.2], [0.7, 0.2]])
    keys = torch.tensor([[0.1, 0.9], [0.1, 0.9]])
    score = torch.tensor([0.3, 0.3])
    log_u = torch.stack([logits[:, 0] - score, torch.full((2,), -50.0)], dim=1)
    return logits, keys, log_u, torch.tensor([2, 2]), torch.tensor([0, 0]), torch.tensor([5, 6]), score


def test_acceptance_is_strict_at_equality():
    for result in (reference_sweep(*threshold_inputs()), fused_sweep(*threshold_inputs())):
        assert result.records.tolist() == [[5, 1], [6, 1]]


@pytest.mark.parametrize("beta", [5.0, 100.0])
@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_fused_sweep_equals_mh_sweep(seed, pairs, beta):
    args = random_sweep_inputs(seed, rows=24, k=37, beta=beta)
    logits, keys = args[:2]
    expected = reference_sweep(*args, pairs=pairs)
    if not pairs:  # reference_sweep is argsort + gather + mh_sweep; say it with mh_sweep itself
        order = keys.argsort(dim=1, stable=True)
        assert_same(mh_sweep(logits.gather(1, order), order, *args[3:5], args[5], args[6], args[2]), expected)
    got = fused_sweep(*args, pairs=pairs)
    assert_same(got, expected)
    # the ingredients of the test are all there
    assert (expected.records == OUT_OF_BATCH).any() and (expected.records == NOT_RECORDED).any()
    assert not expected.accepted.all() and expected.accepted.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pairs", [False, True])
def test_fused_counts_and_tallies_equal_the_reference(pairs, dtype):
    args = random_sweep_inputs(7, rows=30, k=21, beta=100.0)
    columns = 21 + 3
    expected = tally(reference_sweep(*args, pairs=pairs), columns, dtype)
    got = kernels.fused_sweep(*args, pairs=pairs, records=False, count_columns=columns, count_dtype=dtype)
    assert got.records is None
    assert_same(got, expected, ("column", "score", "accepted", "accepted_after_burn_in", *TALLIES))


def test_large_batches_use_the_counting_sort_correctly():
    """K = 600 (the bucket sort's expected-linear path with many buckets) and 2-way ties."""
    args = random_sweep_inputs(11, rows=16, k=600, beta=100.0)
    assert_same(fused_sweep(*args, pairs=True), reference_sweep(*args, pairs=True))


def test_fused_sweep_rejects_bad_inputs():
    args = list(random_sweep_inputs(0, rows=4, k=5, beta=5.0))
    with pytest.raises(ValueError, match="float32"):
        kernels.fused_sweep(args[0].double(), *args[1:])
    with pytest.raises(ValueError, match="even"):
        kernels.fused_sweep(*[a[:3] for a in args], pairs=True)


@pytest.mark.parametrize("chains", [2, None])  # chain=view (m = 2), chain=item (random augmentations)
@pytest.mark.parametrize("stale", ["drop", "refresh"])
@pytest.mark.parametrize("beta", [5.0, 100.0])
def test_sampler_with_the_fused_kernel_equals_the_reference(chains, stale, beta):
    views = frozen_views(n=30, m=2, d=5, seed=4).double()  # float64 sims: counts in float64
    results = {}
    for kernel in ("reference", "fused"):
        sampler = bound_sampler("emc2", seed=2, n=30, m=chains, beta=beta, stale=stale, kernel=kernel)
        assert sampler.sweep_backend == ("c" if kernel == "fused" else "reference")
        steps = run_steps(sampler, views, steps=10, batch_size=4, seed=5)
        results[kernel] = (steps, sampler.state_dict(), sampler.diagnostics())
    (ref_steps, ref_state, ref_diag), (steps, state, diag) = results["reference"], results["fused"]
    for (b1, w1), (b2, w2) in zip(ref_steps, steps):
        assert torch.equal(b1.candidate_items, b2.candidate_items)
        assert torch.equal(w1, w2)
    assert ref_state.keys() == state.keys()
    for key, value in ref_state.items():
        assert torch.equal(value, state[key]) if isinstance(value, torch.Tensor) else value == state[key]
    assert ref_diag == diag and diag["accept_rate"] is not None
    assert (ref_state["chain_state"] >= 0).any()


def test_without_a_compiler_auto_falls_back_once_and_fused_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_cpu_lib", None)
    monkeypatch.setattr(kernels, "_cpu_error", None)
    monkeypatch.setattr(emc2_module, "_warned", set())
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("NEGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    assert "could not run" in kernels.unavailable_reason("cpu")
    with pytest.warns(RuntimeWarning, match="falling back"):
        sampler = bound_sampler("emc2", kernel="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        again = bound_sampler("emc2", kernel="auto")
    assert sampler.sweep_backend == again.sweep_backend == "reference"
    reference = bound_sampler("emc2", kernel="reference")
    views = frozen_views()
    for (_, w1), (_, w2) in zip(run_steps(sampler, views, 3, 5), run_steps(reference, views, 3, 5)):
        assert torch.equal(w1, w2)
    with pytest.raises(UserError, match="kernel=fused cannot run"):
        bound_sampler("emc2", kernel="fused")


def test_the_library_is_built_into_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_cpu_lib", None)
    monkeypatch.setattr(kernels, "_cpu_error", None)
    monkeypatch.setattr(kernels, "_cpu_info", {})
    monkeypatch.setenv("NEGBENCH_CACHE_DIR", str(tmp_path))
    assert kernels.unavailable_reason("cpu") is None
    info = kernels.cpu_build_info()
    assert not info["cached"] and info["build_seconds"] > 0 and Path(info["path"]).parent == tmp_path / "kernels"
    assert Path(info["path"]).exists() and not list((tmp_path / "kernels").glob(".*.tmp"))
    args = random_sweep_inputs(3, rows=6, k=9, beta=5.0)
    assert_same(fused_sweep(*args), reference_sweep(*args))


TRITON_CHECK = textwrap.dedent("""
    import torch
    from negbench.kernels import _emc2_triton, emc2 as kernels
    from negbench.samplers.emc2 import reference_sweep, tally
    from test_emc2_kernels import random_sweep_inputs, threshold_inputs
    cases = [(random_sweep_inputs(0, rows=10, k=13, beta=100.0), False),
             (random_sweep_inputs(1, rows=10, k=13, beta=100.0), True), (threshold_inputs(), False)]
    for args, pairs in cases:
        rows, k = args[0].shape
        out = kernels._outputs(rows, k, torch.device("cpu"), True, 16, torch.float32)
        _emc2_triton.triton_sweep(*args, pairs, out)
        ref = reference_sweep(*args, pairs=pairs)
        tallied = tally(ref, 16, torch.float32)
        for name in ("column", "score", "accepted", "records", "accepted_after_burn_in"):
            assert torch.equal(getattr(out, name), getattr(ref, name)), name
        for name in ("counts", "used", "out_of_batch", "recorded"):
            assert torch.equal(getattr(out, name), getattr(tallied, name)), name
    print("triton ok")
""")


def test_the_triton_kernel_in_triton_s_interpreter():
    """The CUDA kernel's logic, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "triton ok" in result.stdout, result.stderr[-3000:]


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("pairs", [False, True])
def test_triton_sweep_equals_the_reference_on_cuda(pairs):
    args = random_sweep_inputs(5, rows=64, k=300, beta=100.0, device="cuda")
    assert_same(fused_sweep(*args, pairs=pairs), reference_sweep(*args, pairs=pairs))
    expected = tally(reference_sweep(*args, pairs=pairs), 303, torch.float32)
    got = kernels.fused_sweep(*args, pairs=pairs, records=False, count_columns=303)
    assert_same(got, expected, ("column", "score", "accepted", "accepted_after_burn_in", *TALLIES))


@cuda
@pytest.mark.parametrize("kernel", ["fused", "reference"])
@pytest.mark.parametrize("chains", [2, None])
def test_an_emc2_step_does_not_synchronise_with_the_host(kernel, chains):
    from negbench.sampler import Batch, SamplerContext
    from negbench.registry import get_sampler

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    sampler = get_sampler("emc2", kernel=kernel).bind(SamplerContext(1000, chains, 5.0, 16, device, gen))
    views = torch.nn.functional.normalize(torch.randn(1000, 2, 16, device=device), dim=2)
    batches = []
    for step in range(3):
        items = torch.randperm(1000, device=device)[:64].repeat_interleave(2)
        anchor_views = torch.tensor([0, 1], device=device).repeat(64)
        batches.append(Batch.from_anchors(items, anchor_views, views[items, anchor_views]))
    first = batches[0]
    sampler.weigh(first.anchor_emb @ first.anchor_emb.T, first)  # JIT compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            assert sampler.propose(batch) is None
            weights = sampler.weigh(batch.anchor_emb @ batch.anchor_emb.T, batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sampler.sweep_backend == ("triton" if kernel == "fused" else "reference")
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(1)[weights.sum(1) > 0], torch.ones_like(weights.sum(1)[weights.sum(1) > 0]))
