"""``dcl``: debiased contrastive learning (Chuang et al., "Debiased Contrastive Learning",
NeurIPS 2020), as the weight matrix W of negbench's common loss.

In-batch, anchor a has the positive logit ℓ⁺ = β s_aa⁺ and the logits ℓ_c = β s_ac of its
N = |V_a| valid negatives (2B − 2 in a full batch). A uniformly drawn "negative" has the
anchor's class with prior τ⁺ (``tau_plus``), so the plain sum over negatives over-counts
same-class pairs; Chuang et al. correct it with the positive and clamp the estimate at its
theoretical minimum (their eq. (6) with M = 1 positive, t = 1/β):

    N_g = max{ (R − τ⁺ N e^{ℓ⁺}) / (1 − τ⁺),  N e^{−β} },     R = Σ_{c ∈ V_a} e^{ℓ_c},
    L_a = −log [ e^{ℓ⁺} / (e^{ℓ⁺} + N_g) ] = −ℓ⁺ + log D_a,     D_a = e^{ℓ⁺} + N_g.

negbench trains with ℓ = β/A Σ_a [Σ_c W_ac s_ac − s_aa⁺] (W detached), whose gradient is
β/A Σ_a [Σ_c W_ac ∇s_ac − ∇s_aa⁺]. It equals ∇(1/A Σ_a L_a) when β W_ac = ∂L_a/∂s_ac for every
c ≠ a⁺ and β (W_aa⁺ − 1) = ∂L_a/∂s_aa⁺, i.e., writing G_c = ∂R/∂ℓ_c (= e^{ℓ_c} here):

    not clamped:  W_ac = G_c / ((1 − τ⁺) D_a),      W_aa⁺ = e^{ℓ⁺} (1 − τ⁺ N / (1 − τ⁺)) / D_a,
    clamped:      W_ac = 0,                         W_aa⁺ = e^{ℓ⁺} / D_a,

0 on extras and invalid pairs. **The positive column is negative** as soon as τ⁺ N > 1 − τ⁺
(N > 9 at τ⁺ = 0.1): the debiasing pushes the positive away in proportion to the same-class
mass it removes from N_g. So ``signed_weights`` is set (the conformance suite's W ≥ 0 rule is
relaxed for this sampler), and the rows do not sum to 1. τ⁺ = 0 is NT-Xent (``in_batch``).

Everything is computed in float64 after subtracting M_a = max(ℓ⁺, max_c ℓ_c) from every logit
(the weights are ratios, so the shift cancels): β = 100 works. An anchor without negatives
(N = 0) has L_a = 0 and gets W_aa⁺ = 1 (no gradient). ``hcl`` reuses this class with a
different estimate R of the negative sum. No state, no extra encoder passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from negbench import Batch, Param, register_sampler, Sampler


@register_sampler("dcl")
class DebiasedSampler(Sampler):
    description = "Debiased in-batch negatives with class prior τ⁺ (Chuang et al., NeurIPS 2020)."
    params = {
        "tau_plus": Param(0.1, "τ⁺: class prior, the probability that a drawn negative shares the anchor's class",
                          low=0.0, high=1.0, high_open=True),
    }
    test_params = {"tau_plus": 0.1}
    signed_weights = True
    min_batch_size = 2  # in-batch negatives only (hcl inherits it)
    normalised_weights = False

    def negative_sum(self, shifted: Tensor, valid: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """``(R̃, G̃)``: the estimate R of Σ_c e^{ℓ_c} and its gradient G_c = ∂R/∂ℓ_c, both
        times e^{−M} (``shifted`` = ℓ − M, float64, rows = anchors; ``count`` = N per row).
        Here R = Σ_c e^{ℓ_c}, G_c = e^{ℓ_c}."""
        terms = torch.where(valid, shifted.exp(), torch.zeros_like(shifted))
        return terms.sum(dim=1), terms

    def weigh(self, sims: Tensor, batch: Batch) -> Tensor:
        a = batch.num_anchors
        rows = torch.arange(a, device=sims.device)
        valid = batch.in_batch_valid
        logits = self.beta * sims[:, :a].double()
        positive = logits[rows, batch.positive]
        count = valid.sum(dim=1).double()
        top = torch.maximum(positive, logits.masked_fill(~valid, float("-inf")).amax(dim=1))
        shifted = logits - top[:, None]
        r, g = self.negative_sum(shifted, valid, count)
        x_pos = (positive - top).exp()
        tau = self.tau_plus
        floor = torch.where(count > 0, (count.clamp_min(1).log() - self.beta - top).exp(), torch.zeros_like(count))
        estimate = (r - tau * count * x_pos) / (1.0 - tau)
        clamped = estimate < floor  # torch.clamp's convention: the gradient passes at equality
        denominator = x_pos + torch.where(clamped, floor, estimate)
        neg = g / ((1.0 - tau) * denominator[:, None])
        neg = torch.where(clamped[:, None] | ~valid, torch.zeros_like(neg), neg)
        pos = x_pos * torch.where(clamped, torch.ones_like(count), 1.0 - tau * count / (1.0 - tau)) / denominator
        weights = sims.new_zeros(sims.shape)
        block = neg.to(sims.dtype)
        block[rows, batch.positive] = pos.to(sims.dtype)
        weights[:, :a] = block
        return weights
