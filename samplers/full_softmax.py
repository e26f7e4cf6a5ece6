"""``full_softmax``: the exact negative distribution, the zero-bias reference.

    W_a(j,c) = p_a(j,c) = exp(β <e_a, e_jc>) / Σ_{(j',c') ∈ D⁻(i)} exp(β <e_a, e_j'c'>)

over every view of every other item (DESIGN §1.1). It asks for all N·m views as extra
candidates every step (the runner encodes them in chunks), so with the batch covering every
item its surrogate gradient is exactly ∇F. Finite-view tasks only. No per-item state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from negbench import Batch, Extras, register_sampler, Sampler


@register_sampler("full_softmax")
class FullSoftmaxSampler(Sampler):
    description = "Exact softmax over every view of every other item (zero bias)."
    requires_finite_views = True

    def propose(self, batch: Batch) -> Extras:
        ctx = self.context
        assert ctx is not None and ctx.num_views is not None
        device = batch.anchor_items.device
        items = torch.arange(ctx.num_items, device=device).repeat_interleave(ctx.num_views)
        views = torch.arange(ctx.num_views, device=device).repeat(ctx.num_items)
        return Extras(items, views)

    def negatives_per_anchor(self, batch_size: int) -> int | None:
        """None: W is the exact softmax, so there is no sampling noise (TV floor 0)."""
        return None

    def weigh(self, sims: Tensor, batch: Batch) -> Tensor:
        a = batch.num_anchors
        weights = sims.new_zeros(sims.shape)
        weights[:, a:] = self.masked_softmax(sims[:, a:], batch.valid[:, a:])
        return weights
