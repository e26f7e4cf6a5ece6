"""``sogclr``: in-batch negatives reweighted by a moving average of each item's partition
function (SogCLR, Yuan et al., ICML 2022).

Target: for anchor a of item i, p_a(c) = exp(β s_ac) / Z_a with Z_a = Σ_{c ∈ D⁻(i)} exp(β s_ac).
SogCLR estimates the normalised partition function Z_a / |D⁻(i)| by a per-item moving
average u_i and reweights the batch:

    W_ac = exp(β s_ac) / (K_a · u_i)    for the K_a valid in-batch candidates c of anchor a,

0 elsewhere (the positive gets no weight). E[W_ac] over the batch ≈ p_a(c), but the rows do
not sum to 1: this is a reweighting estimator, not a distribution.

Update, for each batch item i with anchors (views) a, a' — before the weights are computed:

    g_a = 1/K_a Σ_{c valid for a} exp(β s_ac),        g_i = (g_a + g_a') / 2,
    u_i ← (1 − γ_i) u_i + γ_i g_i,     γ_i = 1 on item i's first visit, γ otherwise.

The first-visit rule is per item (u_i = −∞ in log space marks an unvisited item), not per
batch. **W uses the updated u_i**, as in SogCLR's Algorithm 1 (the moving average is updated
with this batch, then the gradient estimator is formed with it). A bonus of that order:
u_i ≥ γ g_i ≥ γ g_a / 2, so every W_ac ≤ 2/γ — weights stay bounded however stale u_i was.
One u per item is used for both views, as in the paper; the authors' code (and LibAUC's
``GCLoss``) instead weigh view v with its own partial update (1 − γ) u_i + γ g_v while storing
the same averaged u_i, so the two agree exactly when g_a = g_a'.

u is kept in log space (logsumexp throughout: β = 100 works): ``log_u`` holds log u_i,
−∞ = never visited. Per-item state: 1 float32 = **4 bytes per item**. No extra encoder passes.

Gradient scale: through negbench's common loss ℓ = β/A Σ_a [Σ_c W_ac s_ac − s_aa⁺] the
gradient estimates ∇F like every other sampler's. The published SogCLR surrogate
(``(loss_a + loss_b).mean()`` without the factor β) has 2/β times this gradient, so under SGD
it would take β/2-times smaller steps than NT-Xent averaged over the 2B anchors; negbench does
not inherit that (tests/test_sogclr.py checks the factor against LibAUC).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from negbench import Batch, Param, register_sampler, Sampler


@register_sampler("sogclr")
class SogCLRSampler(Sampler):
    description = "In-batch negatives reweighted by a per-item moving average of the partition function (SogCLR)."
    normalised_weights = False
    min_batch_size = 2  # in-batch negatives only
    params = {
        "gamma": Param(0.9, "γ: moving-average rate of u (1 on an item's first visit)", low=0.0, high=1.0, low_open=True),
    }
    test_params = {"gamma": 0.9}
    state_attributes = ("log_u",)

    def reset_state(self) -> None:
        ctx = self.context
        assert ctx is not None
        self.log_u = torch.full((ctx.num_items,), float("-inf"), dtype=torch.float32, device=ctx.device)

    def weigh(self, sims: Tensor, batch: Batch) -> Tensor:
        a = batch.num_anchors
        valid = batch.in_batch_valid
        logits = (self.beta * sims[:, :a]).float().masked_fill(~valid, float("-inf"))
        log_k = valid.sum(dim=1).float().log()  # -inf for an anchor without candidates
        log_g = torch.logsumexp(logits, dim=1) - log_k  # log g_a; -inf or nan when K_a = 0
        log_g = torch.where(valid.any(dim=1), log_g, torch.full_like(log_g, float("-inf")))

        # Average over the item's two views; an anchor without candidates does not count.
        pair = log_g.view(-1, 2)
        seen = torch.isfinite(pair)
        log_g_item = torch.logsumexp(pair, dim=1) - seen.sum(dim=1).clamp_min(1).float().log()

        items = batch.anchor_items[0::2]
        old = self.log_u[items]
        first = torch.isneginf(old)
        keep = torch.where(first, torch.full_like(old, float("-inf")), old + math.log1p(-self.gamma))
        new = torch.logaddexp(keep, torch.where(first, log_g_item, log_g_item + math.log(self.gamma)))
        # An item none of whose views had a candidate keeps its u.
        new = torch.where(seen.any(dim=1), new, old)
        self.log_u[items] = new

        log_u = new.repeat_interleave(2)
        log_w = logits - log_k[:, None] - log_u[:, None]
        weights = sims.new_zeros(sims.shape)
        weights[:, :a] = torch.nan_to_num(log_w.exp(), nan=0.0).to(sims.dtype)
        return weights
