"""``hcl``: hard negatives by importance reweighting (Robinson et al., "Contrastive Learning
with Hard Negative Samples", ICLR 2021), debiased as ``dcl``, as negbench's weight matrix W.

In-batch, anchor a has the positive logit ℓ⁺ = β s_aa⁺ and the logits ℓ_c = β s_ac of its
N = |V_a| valid negatives. Robinson et al. draw negatives from q(c) ∝ e^{β_h ℓ_c} p(c), the
uniform draw tilted towards hard (similar) negatives with concentration β_h (``beta_hard``),
and estimate the negative sum under q by self-normalised importance weights
w_c = e^{β_h ℓ_c} / ((1/N) Σ_{c'} e^{β_h ℓ_c'}) — the authors' ``imp = (beta * neg.log()).exp()``
with ``neg = exp(cos / t)``, so the tilt acts on the logit ℓ = β s (t = 1/β). With the
debiasing and clamp of Chuang et al. (τ⁺ = ``tau_plus``):

    R = Σ_c w_c e^{ℓ_c} = N Σ_c e^{(1+β_h) ℓ_c} / Σ_c e^{β_h ℓ_c},
    N_g = max{ (R − τ⁺ N e^{ℓ⁺}) / (1 − τ⁺),  N e^{−β} },
    L_a = −log [ e^{ℓ⁺} / (e^{ℓ⁺} + N_g) ].

The published loss differentiates through the importance weights (they are not detached), so

    G_c = ∂R/∂ℓ_c = N π_c [ (1 + β_h) e^{ℓ_c} − β_h R / N ],     π_c = e^{β_h ℓ_c} / Σ_{c'} e^{β_h ℓ_c'},

and W follows from G exactly as in ``dcl`` (W_ac = G_c / ((1 − τ⁺) D_a) unless clamped; the
positive column e^{ℓ⁺}(1 − τ⁺N/(1 − τ⁺))/D_a, or e^{ℓ⁺}/D_a when clamped). With β_h > 0, G_c
is **negative for easy negatives** (e^{ℓ_c} < β_h/(1 + β_h) · R/N): raising the score of an
easy negative lowers its share of the importance mass. So ``signed_weights`` is set, and the
rows do not sum to 1. β_h = 0 gives w_c = 1, R = Σ_c e^{ℓ_c}: exactly ``dcl``.

Computed in float64 on logits shifted by their row maximum (log-sum-exps throughout): β = 100
works. No state, no extra encoder passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from negbench import Param, register_sampler
from negbench.samplers.dcl import DebiasedSampler


@register_sampler("hcl")
class HardNegativeSampler(DebiasedSampler):
    description = "Hard negatives: in-batch negatives tilted by exp(β_h·β·s), debiased (Robinson et al., ICLR 2021)."
    params = {
        **DebiasedSampler.params,
        "beta_hard": Param(1.0, "β_h: concentration on hard negatives (0 = dcl)", low=0.0),
    }
    test_params = {"tau_plus": 0.1, "beta_hard": 1.0}

    def negative_sum(self, shifted: Tensor, valid: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """``(R̃, G̃)`` of the importance-weighted estimate R above, times e^{−M}."""
        b = self.beta_hard
        empty = torch.full_like(shifted, float("-inf"))
        tilted = torch.where(valid, b * shifted, empty)
        log_s0 = tilted.logsumexp(dim=1)
        log_s1 = torch.where(valid, (1.0 + b) * shifted, empty).logsumexp(dim=1)
        has = count > 0
        r = torch.where(has, count * (log_s1 - torch.where(has, log_s0, 0.0)).exp(), torch.zeros_like(count))
        pi = torch.where(valid, (tilted - torch.where(has, log_s0, 0.0)[:, None]).exp(), torch.zeros_like(shifted))
        g = count[:, None] * pi * ((1.0 + b) * shifted.exp() - b * r[:, None] / count.clamp_min(1)[:, None])
        return r, torch.where(valid, g, torch.zeros_like(g))
