"""A plugin that declares signed weights (test fixture, issue 17): uniform in-batch weights
and -0.1 on the positive, as a debiased estimator (dcl) would put there."""
import torch

from negbench.registry import register_sampler
from negbench.sampler import Sampler


@register_sampler("test_signed")
class Signed(Sampler):
    description = "uniform weights, -0.1 on the positive (declares signed_weights)"
    signed_weights = True
    normalised_weights = False

    def weigh(self, sims, batch):
        valid = batch.valid.to(sims.dtype)
        weights = valid / valid.sum(1, keepdim=True).clamp_min(1)
        weights[torch.arange(batch.num_anchors), batch.positive] = -0.1
        return weights
