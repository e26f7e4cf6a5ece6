"""A plugin that raises while it is imported (test fixture, issue 17)."""
from negbench.registry import register_sampler
from negbench.sampler import Sampler

SETTINGS = {"scale": 1.0}


scale = SETTINGS["sacle"]


@register_sampler("test_raising_import")
class Never(Sampler):
    description = "never registered"
