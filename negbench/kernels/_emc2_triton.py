"""The fused EMC² sweep as one Triton kernel (CUDA). Imported only when a CUDA tensor is swept
(importing it imports Triton); the contract is :func:`negbench.kernels.emc2.fused_sweep`.

One program sweeps ``BLOCK`` chains, one per lane. The proposal loop is sequential per chain:
it runs in chunks of ``CHUNK`` statically unrolled steps, so the loads of a chunk (which do not
depend on the chain's state) can be issued together instead of one memory latency per step.
The proposal order (a stable argsort of the keys) comes from ``torch.argsort`` before the
launch. Nothing here synchronises with the host.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

NOT_RECORDED = tl.constexpr(-2)
OUT_OF_BATCH = tl.constexpr(-1)
BLOCK = 32
CHUNK = 16


@triton.jit
def _emc2_sweep_kernel(
    logits_ptr, order_ptr, log_u_ptr, num_proposals_ptr, burn_in_ptr, column_ptr, score_ptr,
    out_column_ptr, out_score_ptr, out_accepted_ptr, out_late_ptr, out_used_ptr, out_out_of_batch_ptr,
    out_recorded_ptr, records_ptr, counts_ptr, num_chains, k, count_columns,
    PER_CHAIN: tl.constexpr, WRITE_RECORDS: tl.constexpr, COUNT: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr,
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
        recorded = tl.zeros([BLOCK], dtype=tl.int64)
        for t0 in range(0, k, CHUNK):
            for j in tl.static_range(CHUNK):
                t = t0 + j
                active = live & (t < n) & (t < k)
                proposal = tl.load(order_ptr + base + t, mask=active, other=0)
                s = tl.load(logits_ptr + base + proposal, mask=active, other=0.0)
                log_u = tl.load(log_u_ptr + base + t, mask=active, other=0.0)
                accept = active & (log_u < s - current)
                state = tl.where(accept, proposal, state)
                current = tl.where(accept, s, current)
                accepted = accepted | accept
                late = active & (t >= burn)
                late_accepted += (accept & late).to(tl.int64)
                recorded += late.to(tl.int64)
                on_column = late & (state >= 0)
                used += on_column.to(tl.int64)
                out_of_batch += (late & (state == OUT_OF_BATCH)).to(tl.int64)
                if WRITE_RECORDS:
                    tl.store(records_ptr + base + t, tl.where(late, state, NOT_RECORDED), mask=live & (t < k))
                if COUNT:
                    tl.atomic_add(counts_ptr + count_base + state, 1.0, mask=on_column & (state < count_columns))
        tl.store(out_column_ptr + row, state, mask=live)
        tl.store(out_score_ptr + row, current, mask=live)
        tl.store(out_accepted_ptr + row, accepted, mask=live)
        tl.store(out_late_ptr + row, late_accepted, mask=live)
        tl.store(out_used_ptr + row, used, mask=live)
        tl.store(out_out_of_batch_ptr + row, out_of_batch, mask=live)
        tl.store(out_recorded_ptr + row, recorded, mask=live)
        moved = accepted


def triton_sweep(
    logits: Tensor, keys: Tensor, log_u: Tensor, num_proposals: Tensor, burn_in: Tensor,
    column: Tensor, score: Tensor, pairs: bool, out: Any,
) -> None:
    """Fill ``out`` (a ``negbench.kernels.emc2.FusedSweep`` of allocated outputs, ``counts``
    zeroed); the inputs are already checked and contiguous."""
    rows, k = logits.shape
    per_chain = 2 if pairs else 1
    chains = rows // per_chain
    if chains == 0:
        return
    if k == 0:
        out.column.copy_(column)
        out.score.copy_(score)
        for t in (out.accepted, out.accepted_after_burn_in, out.used, out.out_of_batch, out.recorded):
            t.zero_()
        return
    order = keys.argsort(dim=1, stable=True)
    records = out.records if out.records is not None else out.column  # a placeholder when not written
    counts = out.counts if out.counts is not None else out.score
    _emc2_sweep_kernel[(triton.cdiv(chains, BLOCK),)](
        logits, order, log_u, num_proposals, burn_in, column, score,
        out.column, out.score, out.accepted, out.accepted_after_burn_in, out.used, out.out_of_batch,
        out.recorded, records, counts, chains, k, 0 if out.counts is None else out.counts.shape[1],
        PER_CHAIN=per_chain, WRITE_RECORDS=out.records is not None, COUNT=out.counts is not None,
        BLOCK=BLOCK, CHUNK=CHUNK, num_warps=1,
    )
