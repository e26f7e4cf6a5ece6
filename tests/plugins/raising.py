"""A plugin whose ``weigh`` raises on its second call (test fixture, issue 17)."""
from negbench.registry import register_sampler
from negbench.sampler import Sampler


@register_sampler("test_raising")
class Raising(Sampler):
    description = "uniform weights, then a ZeroDivisionError"

    def reset_state(self):
        self.calls = 0

    def weigh(self, sims, batch):
        self.calls += 1
        if self.calls >= 2:
            return 1 / 0
        valid = batch.valid.to(sims.dtype)
        return valid / valid.sum(1, keepdim=True).clamp_min(1)
