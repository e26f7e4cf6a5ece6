"""The fused EMC² sweep (C on the CPU, Triton on CUDA) against the tensor-code reference
``reference_sweep``: the same Philox-4x32-10 random numbers (checked against the Random123
known-answer vectors), and identical states, scores, records and weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from negbench.errors import UserError
from negbench.kernels import emc2 as kernels
from negbench.kernels import philox as philox_module
from negbench.kernels.emc2 import SweepInputs
from negbench.kernels.philox import log_uniform, philox4x32
from negbench.samplers import emc2 as emc2_module
from negbench.samplers.emc2 import NOT_RECORDED, OUT_OF_BATCH, mh_sweep, proposal_order, reference_sweep
from samplerkit import bound_sampler, frozen_views, run_steps

pytestmark = pytest.mark.skipif(kernels.unavailable_reason("cpu") is not None,
                                reason=f"no fused CPU sweep here: {kernels.unavailable_reason('cpu')}")

#: Random123's kat_vectors (github.com/DEShawResearch/random123, tests/kat_vectors): name,
#: rounds, counter (4 words), key (2 words), expected output (4 words)
KAT = """
philox4x32 7 00000000 00000000 00000000 00000000 00000000 00000000 5f6fb709 0d893f64 4f121f81 4f730a48
philox4x32 7 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 5207ddc2 45165e59 4d8ee751 8c52f662
philox4x32 7 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 4dfccaba 190a87f0 c47362ba b6b5242a
philox4x32 10 00000000 00000000 00000000 00000000 00000000 00000000 6627e8d5 e169c58d bc57ac4c 9b00dbd8
philox4x32 10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 408f276d 41c83b0e a20bc7c6 6d5451fd
philox4x32 10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 d16cfe09 94fdcceb 5001e420 24126ea1
"""
KAT_ROWS = [(int(r), tuple(int(w, 16) for w in ws[:4]), tuple(int(w, 16) for w in ws[4:6]),
             tuple(int(w, 16) for w in ws[6:])) for _, r, *ws in (line.split() for line in KAT.strip().splitlines())]
RESULT_FIELDS = kernels.Sweep._fields


def torch_philox4x32(counter, key, rounds=10):
    """philox4x32's torch rounds (what CUDA runs) on CPU tensors; philox4x32 itself uses NumPy's there."""
    return philox_module._rounds(philox_module._buffers(counter), key, rounds, torch.mul, torch.bitwise_right_shift)


@pytest.mark.parametrize(("rounds", "counter", "key", "expected"), KAT_ROWS)
def test_philox_matches_the_random123_known_answers(rounds, counter, key, expected):
    words = philox4x32(tuple(torch.tensor([c]) for c in counter), key, rounds=rounds)
    assert tuple(int(w) for w in words) == expected
    words = torch_philox4x32(tuple(torch.tensor([c]) for c in counter), key, rounds=rounds)
    assert tuple(int(w) for w in words) == expected
    if rounds == 10:
        assert kernels.cpu_philox(counter, key) == expected


def test_philox_is_vectorised_per_element():
    """A batch of counters gives, element by element, the single-counter outputs."""
    gen = torch.Generator().manual_seed(0)
    counter = tuple(torch.randint(0, 2**32, (50,), generator=gen) for _ in range(4))
    batch = philox4x32(counter, (0xA4093822, 0x299F31D0))
    for i in range(0, 50, 7):
        one = kernels.cpu_philox(tuple(int(c[i]) for c in counter), (0xA4093822, 0x299F31D0))
        assert one == tuple(int(w[i]) for w in batch)


def test_philox_numpy_and_torch_rounds_agree_on_broadcast_counters():
    """The CPU (NumPy) and CUDA (torch) rounds give the same words on a broadcast (rows, columns)
    counter like random_streams', every value in [0, 2^32)."""
    counter = (torch.arange(300)[None, :], torch.arange(7)[:, None], torch.tensor(2**32 - 1), torch.tensor(0))
    ours, theirs = philox4x32(counter, (2**32 - 1, 12345)), torch_philox4x32(counter, (2**32 - 1, 12345))
    for a, b in zip(ours, theirs):
        assert a.shape == (7, 300) and torch.equal(a, b)
        assert int(a.min()) >= 0 and int(a.max()) < 2**32


def test_log_uniform_on_all_2_24_inputs():
    """log U against numpy's float64 log: below one float32 ulp everywhere, and C = PyTorch bit
    for bit."""
    bits = torch.arange(2**24, dtype=torch.int64) << 8
    got = log_uniform(bits)
    exact = np.log((np.arange(2**24, dtype=np.float64) + 1) * 2.0**-24)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    ulp[exact == 0] = np.spacing(np.float32(1))
    assert (np.abs(got.double().numpy() - exact) / ulp).max() < 1.0
    assert got[-1] == 0 and bool((got[:-1] < 0).all())
    assert torch.equal(kernels.cpu_log_uniform(bits | 0xAB), got)  # the low 8 bits are unused


def test_random_streams_are_uniform():
    """Sort keys give uniformly random proposal orders (chi-square over the 24 orders of 4
    columns) and U is uniform (Kolmogorov-Smirnov)."""
    rows = 24_000
    inputs = sweep_inputs(torch.zeros(rows, 4), torch.ones(rows, 4, dtype=torch.bool), key=99, step=5)
    keys, log_u = kernels.random_streams(inputs)
    order = keys.argsort(dim=1)
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    _, counts = torch.unique(codes, return_counts=True)
    assert counts.numel() == 24 and stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert stats.kstest(log_u.exp().flatten().double().numpy(), "uniform").pvalue > 1e-3
    other_step = kernels.random_streams(sweep_inputs(torch.zeros(rows, 4), inputs.valid, key=99, step=6))[0]
    assert (other_step != keys).float().mean() > 0.99  # another step draws other numbers


def sweep_inputs(sims, valid, column=None, score=None, *, beta=5.0, burn_in=0.5, key=12345, step=0, k=None,
                 pairs=False) -> SweepInputs:
    rows = sims.shape[0]
    column = torch.full((rows,), OUT_OF_BATCH) if column is None else column
    score = torch.full((rows,), float("-inf")) if score is None else score
    return SweepInputs(sims, valid, column, score, beta, burn_in, key, step, sims.shape[1] if k is None else k, pairs)


def random_inputs(seed: int, rows: int, k: int, beta: float, *, dtype=torch.float32, pairs=False, extra_columns=3,
                  device: str = "cpu") -> SweepInputs:
    """Inputs like a step's: valid masks with different numbers of proposals per row (some
    none), burn-in lengths from 0 to all, unstarted (-inf), all-rejecting (+inf, or a score no
    proposal beats) and out-of-batch (-1) chains, start columns on extras (columns >= K)."""
    g = torch.Generator().manual_seed(seed)
    columns = k + extra_columns
    valid = torch.rand(rows, columns, generator=g) < torch.rand(rows, 1, generator=g)
    valid[0] = False  # a row without proposals
    sims = (torch.rand(rows, columns, generator=g) * 2 - 1).to(dtype)
    column = torch.randint(-1, columns, (rows,), generator=g)
    score = (beta * (torch.rand(rows, generator=g) * 2 - 1)).float()
    kind = torch.randint(0, 4, (rows,), generator=g)
    score[kind == 0] = float("-inf")  # not started: the first proposal is always accepted
    score[kind == 1] = float("inf")  # rejects everything
    score[kind == 2] = 1e30  # rejects everything too (a finite score no proposal beats)
    column[kind == 0] = OUT_OF_BATCH
    column[(kind == 1) & (torch.arange(rows) % 2 == 0)] = OUT_OF_BATCH  # stuck on an out-of-batch state
    valid[1], column[1], score[:2] = True, k, 1e30  # row 1 stays on an extra column (row 0 has no proposals)
    burn_in = float(torch.rand((), generator=g))
    inputs = sweep_inputs(sims, valid, column, score, beta=beta, burn_in=burn_in, key=seed * 7919 + 2**40, step=seed,
                          k=k, pairs=pairs)
    return replace(inputs, sims=sims.to(device), valid=valid.to(device), column=column.to(device),
                   score=score.to(device))


def assert_same(got: kernels.Sweep, expected: kernels.Sweep, fields=RESULT_FIELDS) -> None:
    for name in fields:
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{name} differs:\n{a}\n{b}"


def scalar_sweep(inputs: SweepInputs) -> list[tuple[int, float, list[int]]]:
    """The contract in plain Python from the materialised random numbers: per row, the final
    column and score and the records (pairs: row 2k+1 continues row 2k's chain)."""
    keys, log_u = kernels.random_streams(inputs)
    logits = kernels.logits_of(inputs)
    k, out = inputs.num_proposal_columns, []
    for r in range(inputs.sims.shape[0]):
        cols = sorted((int(keys[r, c]), c) for c in range(k) if inputs.valid[r, c])
        if inputs.pairs and r % 2:
            column = column if moved else int(inputs.column[r])  # noqa: F821 (the previous row's)
        else:
            column, score = int(inputs.column[r]), float(inputs.score[r])
        burn, records, moved = int(np.floor(inputs.burn_in * len(cols))), [], False
        for t, (_, c) in enumerate(cols):
            if float(log_u[r, t]) < np.float32(float(logits[r, c]) - score):
                column, score, moved = c, float(logits[r, c]), True
            records.append(column if t >= burn else NOT_RECORDED)
        out.append((column, score, records + [NOT_RECORDED] * (k - len(cols))))
    return out


@pytest.mark.parametrize("pairs", [False, True])
def test_both_sweeps_follow_the_contract_in_plain_python(pairs):
    inputs = random_inputs(4, rows=10, k=9, beta=5.0, pairs=pairs)
    expected = scalar_sweep(inputs)
    for result in (reference_sweep(inputs, records=True), kernels.fused_sweep(inputs, records=True)):
        assert [int(c) for c in result.column] == [e[0] for e in expected]
        assert [float(s) for s in result.score] == [np.float32(e[1]) for e in expected]
        assert result.records.tolist() == [e[2] for e in expected]
        rec = result.records
        for r in range(rec.shape[0]):
            used = [x for x in rec[r].tolist() if x >= 0]
            want = np.bincount(used, minlength=inputs.sims.shape[1]) / max(len(used), 1)
            np.testing.assert_allclose(result.weights[r].numpy(), want, rtol=1e-6)


def test_acceptance_is_strict_at_equality():
    """A proposal whose log score minus the stored one equals log U exactly is rejected; a
    stored score one float below it is accepted."""
    sims, valid, start = torch.zeros(2, 5), torch.ones(2, 5, dtype=torch.bool), torch.tensor([3, 4])  # 3, 4: extras
    log_u0 = kernels.random_streams(sweep_inputs(sims, valid, key=5, k=3))[1][:, 0]
    score = -log_u0  # 0 - score == log U exactly
    nudged = torch.nextafter(score, torch.full_like(score, -1e9))
    at_equality, below = (sweep_inputs(sims, valid, start, s, key=5, burn_in=0.0, k=3) for s in (score, nudged))
    assert reference_sweep(at_equality, records=True).records[:, 0].tolist() == [3, 4]
    first = reference_sweep(below, records=True).records[:, 0]
    assert ((first >= 0) & (first < 3)).all()
    for inputs in (at_equality, below):
        assert_same(kernels.fused_sweep(inputs, records=True), reference_sweep(inputs, records=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [5.0, 100.0])
@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_fused_sweep_equals_the_reference(seed, pairs, beta, dtype):
    inputs = random_inputs(seed, rows=24, k=37, beta=beta, dtype=dtype, pairs=pairs)
    expected = reference_sweep(inputs, records=True)
    assert_same(kernels.fused_sweep(inputs, records=True), expected)
    assert_same(kernels.fused_sweep(inputs), expected._replace(records=None))
    # the ingredients of the test are all there
    rec = expected.records
    assert (rec == OUT_OF_BATCH).any() and (rec == NOT_RECORDED).any() and (rec >= inputs.num_proposal_columns).any()
    assert not expected.accepted.all() and expected.accepted.any()


@pytest.mark.parametrize("pairs", [False, True])
def test_chains_swept_in_lockstep_equal_the_reference(pairs):
    """Rows with the same number of proposals, float32, without records: the C sweep runs four
    chains in lockstep (and the 11th chain alone); the ingredients of random_inputs (unstarted,
    stuck, out-of-batch and extra-column chains) are kept, the masks made equal."""
    rows = 22 if pairs else 11
    inputs = random_inputs(7, rows=rows, k=40, beta=5.0, pairs=pairs)
    valid = inputs.valid.clone()
    valid[:, :40] = True
    inputs = replace(inputs, valid=valid)
    expected = reference_sweep(inputs, records=True)
    assert_same(kernels.fused_sweep(inputs), expected._replace(records=None))
    assert (expected.out_of_batch > 0).any() and (expected.extra > 0).any() and not expected.accepted.all()


@pytest.mark.parametrize("k", [1, 2, 37, 600])
def test_proposal_order_is_the_stable_argsort_of_the_keys(k):
    """Many ties (keys in 0..2) and invalid columns (2^32): the packed plain sort keeps the
    column order among equal keys, as a stable sort does."""
    keys = torch.randint(0, 4, (20, k), generator=torch.Generator().manual_seed(k), dtype=torch.int64)
    keys[keys == 3] = 2**32
    assert torch.equal(proposal_order(keys), keys.argsort(dim=1, stable=True))


def test_reference_sweep_is_mh_sweep_in_proposal_order():
    """reference_sweep = mh_sweep over the columns sorted by their keys (invalid ones last)."""
    inputs = random_inputs(5, rows=16, k=20, beta=5.0)
    keys, log_u = kernels.random_streams(inputs)
    proposable = inputs.valid[:, :20]
    order = keys.masked_fill(~proposable, 2**32).argsort(dim=1, stable=True)
    num = proposable.sum(1)
    expected = mh_sweep(kernels.logits_of(inputs).gather(1, order), order, num,
                        torch.floor(inputs.burn_in * num.double()).long(), inputs.column, inputs.score, log_u)
    got = reference_sweep(inputs, records=True)
    assert torch.equal(got.records, expected.records) and torch.equal(got.column, expected.column)


def test_large_batches_use_the_counting_sort_correctly():
    """K = 600 (the bucket sort's expected-linear path with many buckets)."""
    inputs = random_inputs(11, rows=16, k=600, beta=100.0, pairs=True)
    assert_same(kernels.fused_sweep(inputs, records=True), reference_sweep(inputs, records=True))


def test_weights_are_normalised_and_zero_without_records():
    inputs = random_inputs(2, rows=30, k=25, beta=5.0)
    sweep = kernels.fused_sweep(inputs)
    sums = sweep.weights.sum(1)
    torch.testing.assert_close(sums[sweep.used > 0], torch.ones_like(sums[sweep.used > 0]))
    assert (sums[sweep.used == 0] == 0).all() and (sweep.used == 0).any()
    assert (sweep.weights >= 0).all()


def test_fused_sweep_rejects_bad_inputs():
    inputs = random_inputs(0, rows=4, k=5, beta=5.0)
    with pytest.raises(ValueError, match="float32"):
        kernels.fused_sweep(replace(inputs, score=inputs.score.double()))
    with pytest.raises(ValueError, match="even"):
        kernels.fused_sweep(replace(inputs, sims=inputs.sims[:3], valid=inputs.valid[:3], column=inputs.column[:3],
                                    score=inputs.score[:3], pairs=True))
    with pytest.raises(ValueError, match="float32 or float64"):
        kernels.fused_sweep(replace(inputs, sims=inputs.sims.half()))
    with pytest.raises(ValueError, match="step"):
        kernels.fused_sweep(replace(inputs, step=2**32))


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
    inputs = random_inputs(3, rows=6, k=9, beta=5.0)
    assert_same(kernels.fused_sweep(inputs), reference_sweep(inputs))


TRITON_CHECK = textwrap.dedent("""
    import torch
    import triton
    import triton.language as tl
    from dataclasses import replace
    from negbench.kernels import _emc2_triton
    from negbench.kernels.philox import philox4x32
    from negbench.samplers.emc2 import reference_sweep
    from test_emc2_kernels import assert_same, random_inputs, KAT_ROWS

    @triton.jit
    def philox_kernel(c_ptr, out_ptr, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        c = [tl.load(c_ptr + w * N + i).to(tl.uint32) for w in range(4)]
        x = tl.philox(seed, c[0], c[1], c[2], c[3])
        for w in tl.static_range(4):
            tl.store(out_ptr + w * N + i, x[w].to(tl.int64) & 0xFFFFFFFF)

    # Triton's own Philox-4x32-10 = negbench's (and the known answers)
    counters = torch.randint(0, 2**32, (4, 16), generator=torch.Generator().manual_seed(1))
    for _, counter, key, expected in [r for r in KAT_ROWS if r[0] == 10]:
        counters[:, 0] = torch.tensor(counter)
        out = torch.empty(4, 16, dtype=torch.int64)
        philox_kernel[(1,)](counters, out, key[0] + (key[1] << 32), N=16)
        assert tuple(out[:, 0].tolist()) == expected
        assert all(torch.equal(out[w], x) for w, x in enumerate(philox4x32(tuple(counters), key)))
    cases = [random_inputs(0, rows=10, k=13, beta=100.0), random_inputs(1, rows=10, k=13, beta=100.0, pairs=True),
             random_inputs(2, rows=8, k=20, beta=5.0, dtype=torch.float64, pairs=True)]
    cases.append(replace(cases[0], step=2**32 - 1, key=2**63 - 1))
    for inputs in cases:
        assert_same(_emc2_triton.triton_sweep(inputs, True), reference_sweep(inputs, records=True))
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
    inputs = random_inputs(5, rows=64, k=300, beta=100.0, device="cuda", pairs=pairs)
    assert_same(kernels.fused_sweep(inputs, records=True), reference_sweep(inputs, records=True))


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
