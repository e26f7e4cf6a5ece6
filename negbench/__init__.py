"""negbench: a benchmarking suite for negative sampling in contrastive learning.

Python API::

    import negbench
    sampler = negbench.get_sampler("emc2", burn_in=0.5)
    negbench.list_samplers(), negbench.list_tasks()
    F = negbench.gcl_loss(views, beta=5.0)          # exact global contrastive loss
    q = negbench.negative_distribution(sampler, views, 5.0, batch_size=8, steps=100, anchors=[0, 1], seed=0)
    outcome = negbench.run(negbench.RunConfig(sampler="emc2", task="digits", steps=200))
    criterion = negbench.ContrastiveLoss("emc2", num_items=N)   # loss = criterion(z1, z2, index)
    result = negbench.compare(task="digits", samplers="in_batch,emc2", seeds=3)   # .table, .runs
    rows = negbench.load_runs("results/runs")       # every metrics.jsonl row, config joined

Plugin authors (and the built-in samplers and tasks) import everything from here::

    from negbench import Batch, Extras, Param, Sampler, register_sampler
    from negbench import EvalData, FiniteViewTask, Task, make_encoder, register_task
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING  # noqa: E402

from negbench.api import CompareResult, compare, load_runs  # noqa: E402
from negbench.config import RunConfig  # noqa: E402
from negbench.distribution import negative_distribution, sampling_tv  # noqa: E402
from negbench.encoders import Encoder, make_encoder  # noqa: E402
from negbench.errors import UserError  # noqa: E402
from negbench.loss import ContrastiveLoss  # noqa: E402
from negbench.metric_registry import Metric  # noqa: E402
from negbench.objective import exact_gradient, gcl_loss, surrogate_loss  # noqa: E402
from negbench.params import Param  # noqa: E402
from negbench.registry import (  # noqa: E402
    get_sampler,
    get_task,
    list_samplers,
    list_tasks,
    load_plugin,
    register_sampler,
    register_task,
)
from negbench.sampler import Batch, EncodeFn, Extras, Sampler, SamplerContext  # noqa: E402
from negbench.task import EvalData, FiniteViewTask, Task  # noqa: E402

if TYPE_CHECKING:

    from rich.console import Console

    from negbench.session import RunOutcome


def run(config: RunConfig, *, console: "Console | None" = None, show_progress: bool = True) -> "RunOutcome":
    """Run (or resume, or skip when finished) one configuration; see :func:`negbench.session.run`.

    Args:
        config: the run's options (``None`` fields take their resolved defaults).
        console: where progress and messages go (default: stderr).
        show_progress: draw a progress bar.

    Returns:
        A ``RunOutcome``: ``run_dir`` (the run folder), ``summary`` (``status`` and the final
        value of every metric) and ``skipped`` (already finished).

    Raises:
        UserError: bad input, before anything is written.

    Example:
        >>> outcome = run(RunConfig(sampler="emc2", task="digits", steps=200, seed=0))
        >>> outcome.summary["status"]
        'completed'
    """
    from negbench.session import run as _run

    return _run(config, console=console, show_progress=show_progress)


__all__ = [
    "Batch", "CompareResult", "ContrastiveLoss", "EncodeFn", "Encoder", "EvalData", "Extras", "FiniteViewTask", "Metric", "Param",
    "RunConfig", "Sampler",
    "SamplerContext", "Task", "UserError", "exact_gradient", "gcl_loss", "get_sampler", "get_task",
    "list_samplers", "list_tasks", "load_plugin", "make_encoder", "negative_distribution", "register_sampler",
    "register_task", "run", "sampling_tv", "surrogate_loss", "compare", "load_runs",
]
