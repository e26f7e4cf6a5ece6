"""Run resolution (DESIGN §5): a :class:`~negbench.config.RunConfig` → a typed, frozen
:class:`ResolvedRun`, validating every option and writing nothing.

This is the one place the run's defaults and the compatibility rules live:

- ``steps`` (``--steps``, or ``⌈epochs·N/B⌉``, else 1,000), the learning rate (per optimiser);
- the evaluation schedule: a metric row every ``eval_every = min(steps, max(10, steps // 10))``
  steps (one every steps/10 from 100 steps on, so a 1,000-step run has 11 rows; a shorter run
  evaluates at least 10 steps apart), see :func:`default_eval_every`;
- the TV probe: ``tv_steps = min(100, max(1, steps // 10))`` probe batches per evaluation (100
  from 1,000 steps on), see :func:`default_tv_steps`; 0 on random-augmentation tasks;
- the seeds of every purpose, derived from ``--seed`` (:class:`Seeds`);
- the finite-view rule (:func:`finite_view_conflict`): a sampler that needs a finite view set
  cannot run on a task drawing random augmentations.
"""

from __future__ import annotations

import contextlib
import math
import platform
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from negbench import __version__, distributed
from negbench.config import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    RunConfig,
    as_dict,
    check_writable,
    choose_seed,
    derive_seed,
    resolve_device,
    validate_numbers,
)
from negbench.errors import UserError
from negbench.metrics import PROBE_PROTOCOL
from negbench.registry import SAMPLERS, TASKS
from negbench.results import run_id
from negbench.sampler import Sampler
from negbench.task import Task

#: TV probe batches per evaluation in a run of ``DEFAULT_STEPS`` steps or more
TV_STEPS_CAP = 100
#: the fewest steps between two metric rows when the schedule is derived
MIN_EVAL_EVERY = 10


@dataclass(frozen=True)
class Seeds:
    """The independent seed of every random purpose, each ``derive_seed(seed, purpose)``:
    ``data`` (the task's data, views and augmentations), ``init`` (the encoder's
    initialisation), ``order`` (the item order), ``sampler`` (the sampler's generator),
    ``probe`` (the TV probe anchors and batches, the evaluation views).

    Example:
        >>> Seeds.derive(0).probe == derive_seed(0, "probe")
        True
    """

    data: int
    init: int
    order: int
    sampler: int
    probe: int

    @classmethod
    def derive(cls, seed: int) -> "Seeds":
        """The seeds of every purpose from the run's seed."""
        return cls(**{f.name: derive_seed(seed, f.name) for f in fields(cls)})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def default_eval_every(steps: int) -> int:
    """Steps between metric rows when ``--eval-every`` is not given:
    ``min(steps, max(10, steps // 10))`` — steps/10 from 100 steps on (11 rows), at least 10
    apart below, never past the end (a run of ≤ 10 steps has rows at 0 and at its end)."""
    return min(steps, max(MIN_EVAL_EVERY, steps // 10))


def default_tv_steps(steps: int) -> int:
    """TV probe batches per evaluation when ``--tv-steps`` is not given:
    ``min(100, max(1, steps // 10))`` — 100 from 1,000 steps on."""
    return min(TV_STEPS_CAP, max(1, steps // 10))


def finite_view_tasks() -> list[str]:
    """The names of the registered (listed) tasks with a finite view set."""
    return [name for name in TASKS.names()
            if TASKS.get_class(name).finite_views and not getattr(TASKS.get_class(name), "hidden", False)]


def finite_view_conflict(sampler: type[Sampler] | Sampler, task_finite_views: bool, task_name: str | None = None) -> str | None:
    """The finite-view rule: why ``sampler`` cannot run on a task, or None when it can.

    Args:
        sampler: a sampler class or instance (its ``requires_finite_views`` flag is read).
        task_finite_views: whether the task has a finite view set (``Task.finite_views``).
        task_name: named in the reason when given.

    Returns:
        ``"sampler 'x' needs a finite view set but task 'y' draws random augmentations"``, or
        None. :func:`check_finite_views` raises it with the fix.

    Example:
        >>> finite_view_conflict(SAMPLERS.get_class("full_softmax"), False, "stl10") is not None
        True
    """
    if not sampler.requires_finite_views or task_finite_views:
        return None
    task = f"task {task_name!r}" if task_name else "the task"
    return f"sampler {sampler.name!r} needs a finite view set but {task} draws random augmentations"


def check_finite_views(sampler: type[Sampler] | Sampler, task_finite_views: bool, task_name: str | None = None) -> None:
    """Raise :class:`UserError` (naming the finite-view tasks to use) on a
    :func:`finite_view_conflict`."""
    reason = finite_view_conflict(sampler, task_finite_views, task_name)
    if reason is not None:
        raise UserError(f"{reason}; use a finite-view task ({', '.join(finite_view_tasks())})")


def provenance(device: torch.device) -> dict[str, Any]:
    """negbench, torch, torchvision, Python and CUDA versions, the device name, and the git
    commit when run from a checkout (recorded in config.json and by ``negbench bench``)."""
    import torchvision

    info: dict[str, Any] = {
        "negbench": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
    }
    with contextlib.suppress(Exception):
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    return info


def rate_options(config: RunConfig, task: Task) -> dict[str, Any]:
    """The warm start (``--init stationary``) and ``--grad-split`` settings for the run id,
    only when they are on (so the ids of other runs stay as they were); refused where they
    cannot work: both need the exact gradient, and run in one process."""
    from negbench.warmstart import DescentSettings

    extra: dict[str, Any] = {}
    needs_exact = [flag for flag, on in (("--init stationary", config.init == "stationary"),
                                         ("--grad-split", config.grad_split > 0)) if on]
    if needs_exact and not task.finite_views:
        raise UserError(f"{needs_exact[0]} needs the exact gradient, which task {task.name!r} (random augmentations) "
                        f"does not have; use a finite-view task ({', '.join(finite_view_tasks())})")
    if needs_exact and distributed.world_size() > 1:
        raise UserError(f"{needs_exact[0]} runs in one process; leave out --nproc")
    if config.init == "stationary":
        extra["init"] = DescentSettings(config.init_lr, config.init_tol, config.init_steps).describe()
    if config.grad_split:
        extra["grad_split"] = config.grad_split
    return extra


@dataclass(frozen=True)
class ResolvedRun:
    """A run with every default resolved: what the trainer, the evaluator and the session
    read. ``record`` is the ``config.json`` it is written as (the experiment — whose hash is
    the run id — plus seeds, task facts, versions and the options as given)."""

    config: RunConfig
    run_id: str
    seed: int
    seeds: Seeds
    device: torch.device
    steps: int
    eval_every: int
    lr: float
    tv_steps: int
    num_items: int
    finite_views: bool
    record: dict[str, Any]

    @property
    def beta(self) -> float:
        return self.config.beta

    @property
    def batch_size(self) -> int:
        return self.config.batch_size


def resolve(config: RunConfig, task: Task, sampler: Sampler, device: torch.device, seed: int,
            *, versions: bool = True) -> ResolvedRun:
    """Resolve ``config`` for a loaded ``task`` and an unbound ``sampler`` (checked against
    each other here), writing nothing. ``versions=False`` leaves the provenance out of the
    record (for callers that never write it, like ``negbench bench``)."""
    check_finite_views(sampler, task.finite_views, task.name)
    n = task.num_items
    if config.batch_size > n:
        raise UserError(f"--batch-size {config.batch_size} is larger than the data set ({n} items); use at most {n}")
    sampler.check_task(n, task.num_views)  # e.g. emc2 chain=view on random augmentations
    sampler.check_batch_size(config.batch_size)  # B = 1 leaves in-batch samplers no negative at all
    if config.epochs is not None:
        steps = max(1, math.ceil(config.epochs * n / config.batch_size))
    else:
        steps = config.steps or DEFAULT_STEPS
    eval_every = min(config.eval_every or default_eval_every(steps), steps)
    tv_steps = (default_tv_steps(steps) if config.tv_steps is None else config.tv_steps) if task.finite_views else 0
    lr = DEFAULT_LR[config.optimizer] if config.lr is None else config.lr
    seeds = Seeds.derive(seed)
    experiment = {
        "sampler": sampler.name, "sampler_params": sampler.config, "task": task.name, "task_params": task.config,
        "batch_size": config.batch_size, "steps": steps, "optimizer": config.optimizer, "lr": lr,
        "momentum": config.momentum, "weight_decay": config.weight_decay, "beta": config.beta, "seed": seed,
        "device": device.type, "eval_every": eval_every, "grad_error": config.grad_error, "tv_steps": tv_steps,
        "tv_anchors": config.tv_anchors,
    }
    if config.max_items:  # only when set, so run ids without it stay as they were
        experiment["max_items"] = config.max_items
    experiment.update(rate_options(config, task))
    rid = run_id(experiment)
    record = {
        **experiment,
        "run_id": rid,
        "data_root": None if config.data_root is None else str(config.data_root),
        "seeds": seeds.as_dict(),
        "task_info": task.describe(),
        "finite_views": task.finite_views,
        "num_items": n,
        "items_per_batch_ratio": n / config.batch_size,
        "eval_protocol": PROBE_PROTOCOL if task.labelled else None,
        "versions": provenance(device) if versions else None,
        "distributed": distributed.describe(),
        "options": as_dict(config),
    }
    return ResolvedRun(config, rid, seed, seeds, device, steps, eval_every, lr, tv_steps, n, task.finite_views, record)


@dataclass
class Prepared:
    """A validated, resolved run with its task (data loaded) and its sampler (not bound yet):
    nothing has been written."""

    run: ResolvedRun
    run_dir: Path
    task: Task
    sampler: Sampler

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @property
    def resolved(self) -> dict[str, Any]:
        """The ``config.json`` record (see :attr:`ResolvedRun.record`)."""
        return self.run.record

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def steps(self) -> int:
        return self.run.steps

    @property
    def eval_every(self) -> int:
        return self.run.eval_every

    @property
    def lr(self) -> float:
        return self.run.lr

    @property
    def seed(self) -> int:
        return self.run.seed


def prepare(config: RunConfig) -> Prepared:
    """Validate every option and resolve every default, loading the task's data (which may
    fail with a clear error), but writing nothing."""
    validate_numbers(config)
    distributed.init_from_env(config.device)
    distributed.check_batch_size(config.batch_size)
    sampler = SAMPLERS.get_class(config.sampler)(**config.sampler_params)
    task = TASKS.get_class(config.task)(**config.task_params)
    check_finite_views(sampler, task.finite_views, task.name)  # before loading any data
    device = distributed.rank_device(resolve_device(config.device))
    check_writable(config.out)
    seed = distributed.from_main(choose_seed) if config.seed is None else config.seed
    task.download = config.download
    task.load(seed=derive_seed(seed, "data"), data_root=config.data_root)
    if config.max_items:
        task.subsample(config.max_items)
    resolved = resolve(config, task, sampler, device, seed)
    return Prepared(resolved, config.out / resolved.run_id, task, sampler)
