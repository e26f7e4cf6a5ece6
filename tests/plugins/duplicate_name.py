"""A plugin that registers a name a built-in already has (test fixture, issue 17)."""
from negbench.registry import register_sampler
from negbench.sampler import Sampler
from negbench.samplers.uniform import UniformSampler


@register_sampler("emc2")
class MyEMC2(UniformSampler):
    description = "not EMC2 at all"
