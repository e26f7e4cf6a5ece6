"""A plugin whose ``weigh`` returns W with one column too many (test fixture, issue 17)."""
import torch

from negbench.registry import register_sampler
from negbench.sampler import Sampler


@register_sampler("test_wrong_shape")
class WrongShape(Sampler):
    description = "uniform weights and a column of zeros (W is A x (C+1))"

    def weigh(self, sims, batch):
        valid = batch.valid.to(sims.dtype)
        weights = valid / valid.sum(1, keepdim=True).clamp_min(1)
        return torch.cat([weights, weights.new_zeros(weights.shape[0], 1)], dim=1)
