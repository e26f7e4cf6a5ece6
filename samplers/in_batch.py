"""``in_batch`` (alias ``simclr``): the softmax over the batch, as in SimCLR's NT-Xent.

    W_ac = exp(β s_ac) / Σ_{c' ∈ V_a} exp(β s_ac')   for c ∈ V_a, 0 elsewhere,

where V_a is the set of valid in-batch candidates of anchor a, plus its positive a⁺ when
``include_positive`` (the default: exactly NT-Xent, whose denominator holds the positive, so
the positive column gets weight p⁺ too). With that, the surrogate gradient equals the
gradient of the mean NT-Xent loss ``-β s_aa⁺ + log Σ_{c∈V_a} exp(β s_ac)``. No state, no extra
passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from negbench import Batch, Param, register_sampler, Sampler


@register_sampler("in_batch", aliases=("simclr",))
class InBatchSampler(Sampler):
    description = "Softmax over the in-batch negatives (SimCLR / NT-Xent)."
    min_batch_size = 2  # in-batch negatives only
    params = {
        "include_positive": Param(True, "put the positive in the denominator, as NT-Xent does"),
    }
    test_params = {"include_positive": True}

    def weigh(self, sims: Tensor, batch: Batch) -> Tensor:
        a = batch.num_anchors
        support = batch.in_batch_valid.clone()
        if self.include_positive:
            support[torch.arange(a, device=sims.device), batch.positive] = True
        weights = sims.new_zeros(sims.shape)
        weights[:, :a] = self.masked_softmax(sims[:, :a], support)
        return weights
