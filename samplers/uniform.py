"""``uniform``: no hardness at all.

    W_ac = 1/K_a  for each of the K_a valid in-batch candidates of anchor a, 0 elsewhere.

Biased against the softmax p_a by design (it targets the uniform distribution over the
negatives): the floor every hardness-aware sampler should beat. No per-item state, no extra
encoder passes.
"""

from __future__ import annotations

from torch import Tensor

from negbench import Batch, register_sampler, Sampler


@register_sampler("uniform")
class UniformSampler(Sampler):
    description = "Equal weight on every valid in-batch negative: no hardness (the floor)."
    min_batch_size = 2  # in-batch negatives only

    def weigh(self, sims: Tensor, batch: Batch) -> Tensor:
        weights = sims.new_zeros(sims.shape)
        valid = batch.in_batch_valid.to(sims.dtype)
        weights[:, : batch.num_anchors] = valid / valid.sum(dim=1, keepdim=True).clamp_min(1.0)
        return weights
