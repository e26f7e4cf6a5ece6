"""A plugin whose ``weigh`` returns NaN weights from its second call on (test fixture, issue 17)."""
from negbench.registry import register_sampler
from negbench.sampler import Sampler


@register_sampler("test_nan_weights")
class NaNWeights(Sampler):
    description = "uniform weights, NaN from the second call"

    def reset_state(self):
        self.calls = 0

    def weigh(self, sims, batch):
        self.calls += 1
        valid = batch.valid.to(sims.dtype)
        weights = valid / valid.sum(1, keepdim=True).clamp_min(1)
        return weights * float("nan") if self.calls >= 2 else weights
