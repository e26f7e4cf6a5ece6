"""The fused EMC² sweep as one Triton kernel (CUDA). Imported only when a CUDA tensor is swept
(importing it imports Triton); the contract is :func:`negbench.kernels.emc2.fused_sweep`.

One program sweeps ``BLOCK`` chains, one per lane. The proposal loop is sequential per chain:
it runs in chunks of ``CHUNK`` statically unrolled steps, so the loads of a chunk (which do not
depend on the chain's state) can be issued together instead of one memory latency per step.
log U of proposals 2j and 2j+1 comes from Triton's own Philox-4x32-10 (``tl.philox``, words 2
and 3 of the counter (j, row, step, 0)) and :func:`_log_uniform`, inside the kernel; the proposal
order (the sort keys, words 0 and 1 of the same counters) comes from
:func:`negbench.kernels.emc2.random_streams` and a ``torch.argsort`` before the launch, and the
histogram is divided by the number of used records after it. Nothing here synchronises with
the host. Launched with ``enable_fp_fusion=False`` and IEEE division (``div_rn``), so the log
rounds as in C and PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from negbench.kernels import emc2 as kernels

NOT_RECORDED = tl.constexpr(-2)
OUT_OF_BATCH = tl.constexpr(-1)
BLOCK = 32
CHUNK = 16  # even: one Philox call gives log U of two consecutive proposals


@triton.jit
def _log_uniform(bits):
    """log U, U = ((x >> 8) + 1)·2⁻²⁴, exactly as ``negbench.kernels.philox.log_uniform``."""
    u = ((bits >> 8) + 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    ix = u.to(tl.int32, bitcast=True)
    mant = ix & 0x007FFFFF
    i = (mant + 0x4AFB20) & 0x00800000
    x = (mant | (i ^ 0x3F800000)).to(tl.float32, bitcast=True)
    k = ((ix >> 23) - 127) + (i >> 23)
    f = x - 1.0
    s = tl.math.div_rn(f, f + 2.0)
    dk = k.to(tl.float32)
    z = s * s
    w = z * z
    t1 = w * (0.40000972151756287 + w * 0.24279078841209412)
    t2 = z * (0.6666666269302368 + w * 0.2849878668785095)
    r = t2 + t1
    hfsq = 0.5 * f * f
    return dk * 0.6931381225585938 - ((hfsq - (s * (hfsq + r) + dk * 9.05800061445916e-06)) - f)


@triton.jit
def _emc2_sweep_kernel(
    logits_ptr, order_ptr, num_proposals_ptr, burn_in_ptr, column_ptr, score_ptr,
    out_column_ptr, out_score_ptr, out_accepted_ptr, tallies_ptr, records_ptr, counts_ptr,
    num_chains, k, count_columns, seed, step,
    PER_CHAIN: tl.constexpr, WRITE_RECORDS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    chain = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = chain < num_chains
    first = chain * PER_CHAIN
    state = tl.load(column_ptr + first, mask=live, other=0)
    current = tl.load(score_ptr + first, mask=live, other=0.0)
    moved = tl.zeros([BLOCK], dtype=tl.int1)
    for p in tl.static_range(PER_CHAIN):
        row = first + p
        if p > 0:  # chain=item: the second view continues the first view's chain
            state = tl.where(moved, state, tl.load(column_ptr + row, mask=live, other=0))
        n = tl.load(num_proposals_ptr + row, mask=live, other=0)
        burn = tl.load(burn_in_ptr + row, mask=live, other=0)
        base = row.to(tl.int64) * k
        count_base = row.to(tl.int64) * count_columns
        accepted = tl.zeros([BLOCK], dtype=tl.int1)
        late_accepted = tl.zeros([BLOCK], dtype=tl.int64)
        used = tl.zeros([BLOCK], dtype=tl.int64)
        out_of_batch = tl.zeros([BLOCK], dtype=tl.int64)
        extra = tl.zeros([BLOCK], dtype=tl.int64)
        for t0 in range(0, k, CHUNK):
            for j in tl.static_range(CHUNK):
                t = t0 + j
                if j % 2 == 0:
                    zero = row * 0
                    _, _, w2, w3 = tl.philox(seed, (t // 2 + zero).to(tl.uint32), row.to(tl.uint32),
                                             (zero + step).to(tl.uint32), zero.to(tl.uint32))
                    log_u_next = _log_uniform(w3.to(tl.int64) & 0xFFFFFFFF)
                    log_u = _log_uniform(w2.to(tl.int64) & 0xFFFFFFFF)
                else:
                    log_u = log_u_next
                active = live & (t < n) & (t < k)
                proposal = tl.load(order_ptr + base + t, mask=active, other=0)
                s = tl.load(logits_ptr + base + proposal, mask=active, other=0.0)
                accept = active & (log_u < s - current)
                state = tl.where(accept, proposal, state)
                current = tl.where(accept, s, current)
                accepted = accepted | accept
                late = active & (t >= burn)
                late_accepted += (accept & late).to(tl.int64)
                on_column = late & (state >= 0)
                used += on_column.to(tl.int64)
                extra += (on_column & (state >= k)).to(tl.int64)
                out_of_batch += (late & (state == OUT_OF_BATCH)).to(tl.int64)
                if WRITE_RECORDS:
                    tl.store(records_ptr + base + t, tl.where(late, state, NOT_RECORDED), mask=live & (t < k))
                tl.atomic_add(counts_ptr + count_base + state, 1.0, mask=on_column & (state < count_columns))
        tally = row.to(tl.int64) * 5
        tl.store(out_column_ptr + row, state, mask=live)
        tl.store(out_score_ptr + row, current, mask=live)
        tl.store(out_accepted_ptr + row, accepted, mask=live)
        tl.store(tallies_ptr + tally, late_accepted, mask=live)
        tl.store(tallies_ptr + tally + 1, tl.maximum(n - burn, 0), mask=live)
        tl.store(tallies_ptr + tally + 2, used, mask=live)
        tl.store(tallies_ptr + tally + 3, out_of_batch, mask=live)
        tl.store(tallies_ptr + tally + 4, extra, mask=live)
        moved = accepted


def triton_sweep(inputs: kernels.SweepInputs, records: bool) -> kernels.Sweep:
    """:func:`negbench.kernels.emc2.fused_sweep` on CUDA (inputs already checked)."""
    rows, k = inputs.shape
    device = inputs.sims.device
    per_chain = 2 if inputs.pairs else 1
    chains = rows // per_chain
    proposable = inputs.valid[:, :k]
    keys, _ = kernels.random_streams(inputs, log_u=False)
    order = keys.masked_fill_(~proposable, 2**32).argsort(dim=1, stable=True).contiguous()
    num_proposals = proposable.sum(dim=1)
    burn = torch.floor(inputs.burn_in * num_proposals.double()).long()
    logits = kernels.logits_of(inputs).contiguous()
    column, score = inputs.column.to(torch.long).contiguous(), inputs.score.contiguous()
    out_column, out_score = column.clone(), score.clone()
    out_accepted = torch.zeros(rows, dtype=torch.bool, device=device)
    tallies = torch.zeros(rows, len(kernels.TALLIES), dtype=torch.long, device=device)
    counts = torch.zeros(inputs.sims.shape, dtype=inputs.sims.dtype, device=device)
    out_records = torch.full((rows, k), kernels.NOT_RECORDED, dtype=torch.long, device=device) if records else None
    if chains and k:
        _emc2_sweep_kernel[(triton.cdiv(chains, BLOCK),)](
            logits, order, num_proposals, burn, column, score, out_column, out_score, out_accepted, tallies,
            out_records if out_records is not None else out_column, counts, chains, k, counts.shape[1],
            inputs.key, inputs.step, PER_CHAIN=per_chain, WRITE_RECORDS=out_records is not None,
            BLOCK=BLOCK, CHUNK=CHUNK, num_warps=1, enable_fp_fusion=False,
        )
    elif chains and inputs.pairs:  # no proposals: row 2k+1 carries the chain's score on
        out_score[1::2] = score[0::2]
    sweep = kernels._sweep_of(out_column, out_score, out_accepted, tallies, counts, out_records)
    return sweep._replace(weights=counts / sweep.used.clamp_min(1).to(counts.dtype)[:, None])
