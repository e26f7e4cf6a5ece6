"""A plugin whose ``weigh`` returns negative weights (test fixture, issue 17): uniform
in-batch weights, minus 2 on every entry."""
from negbench.registry import register_sampler
from negbench.sampler import Sampler


@register_sampler("test_negative")
class Negative(Sampler):
    description = "uniform weights shifted by -2 (breaks W >= 0)"

    def weigh(self, sims, batch):
        valid = batch.valid.to(sims.dtype)
        return valid / valid.sum(1, keepdim=True).clamp_min(1) - 2.0
