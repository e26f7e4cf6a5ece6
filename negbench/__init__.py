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

from typing import TYPE_CHECKING, Any

#: public name → the module that defines it, imported on first use (PEP 562): the command line
#: then rejects a bad option before torch is loaded (issue 17)
_EXPORTS = {
    "CompareResult": "negbench.api", "compare": "negbench.api", "load_runs": "negbench.api",
    "RunConfig": "negbench.config",
    "negative_distribution": "negbench.distribution", "sampling_tv": "negbench.distribution",
    "Encoder": "negbench.encoders", "make_encoder": "negbench.encoders",
    "UserError": "negbench.errors",
    "ContrastiveLoss": "negbench.loss",
    "Metric": "negbench.metric_registry",
    "exact_gradient": "negbench.objective", "gcl_loss": "negbench.objective", "surrogate_loss": "negbench.objective",
    "Param": "negbench.params",
    "get_sampler": "negbench.registry", "get_task": "negbench.registry", "list_samplers": "negbench.registry",
    "list_tasks": "negbench.registry", "load_plugin": "negbench.registry", "register_sampler": "negbench.registry",
    "register_task": "negbench.registry",
    "Batch": "negbench.sampler", "EncodeFn": "negbench.sampler", "Extras": "negbench.sampler",
    "Sampler": "negbench.sampler", "SamplerContext": "negbench.sampler",
    "EvalData": "negbench.task", "FiniteViewTask": "negbench.task", "Task": "negbench.task",
}

if TYPE_CHECKING:
    from rich.console import Console

    from negbench.config import RunConfig
    from negbench.session import RunOutcome


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'negbench' has no attribute {name!r}")


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


__all__ = sorted([*_EXPORTS, "run"])
