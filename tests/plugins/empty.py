"""A plugin that declares empty rows and never gives an anchor a negative (test fixture,
issue 17): W = 0 everywhere."""
from negbench.registry import register_sampler
from negbench.sampler import Sampler


@register_sampler("test_empty")
class Empty(Sampler):
    description = "W = 0 (declares empty_rows)"
    empty_rows = True

    def weigh(self, sims, batch):
        return sims.new_zeros(sims.shape)
