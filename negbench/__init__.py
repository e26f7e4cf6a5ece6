"""negbench: a benchmarking suite for negative sampling in contrastive learning.

Python API::

    import negbench
    sampler = negbench.get_sampler("emc2", burn_in=0.5)
    negbench.list_samplers(), negbench.list_tasks()
    F = negbench.gcl_loss(views, beta=5.0)          # exact global contrastive loss
    q = negbench.negative_distribution(sampler, views, 5.0, batch_size=8, steps=100, anchors=[0, 1], seed=0)
    outcome = negbench.run(negbench.RunConfig(sampler="emc2", task="digits", steps=200))
"""

__version__ = "0.1.0"

from negbench.config import RunConfig  # noqa: E402
from negbench.distribution import negative_distribution, sampling_tv  # noqa: E402
from negbench.errors import UserError  # noqa: E402
from negbench.objective import exact_gradient, gcl_loss, surrogate_loss  # noqa: E402
from negbench.registry import (  # noqa: E402
    get_sampler,
    get_task,
    list_samplers,
    list_tasks,
    load_plugin,
    register_sampler,
    register_task,
)
from negbench.sampler import Batch, Extras, Sampler, SamplerContext  # noqa: E402
from negbench.task import EvalData, FiniteViewTask, Task  # noqa: E402


def run(config: "RunConfig", **kwargs):  # type: ignore[no-untyped-def]
    """Run one configuration (see :func:`negbench.runner.run`)."""
    from negbench.runner import run as _run

    return _run(config, **kwargs)


__all__ = [
    "Batch", "EvalData", "Extras", "FiniteViewTask", "RunConfig", "Sampler", "SamplerContext", "Task",
    "UserError", "exact_gradient", "gcl_loss", "get_sampler", "get_task", "list_samplers", "list_tasks",
    "load_plugin", "negative_distribution", "register_sampler", "register_task", "run", "sampling_tv",
    "surrogate_loss",
]
