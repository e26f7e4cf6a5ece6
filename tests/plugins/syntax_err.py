"""A plugin with a syntax error (test fixture, issue 17)."""
from negbench.registry import register_sampler
from negbench.sampler import Sampler


@register_sampler("test_syntax")
class Broken(Sampler):
    description = "never imports"
    def weigh(self, sims, batch) return sims
