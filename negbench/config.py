"""Run configuration: the user's options, validated and resolved before any work starts."""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from negbench.errors import UserError, suggest
from negbench.registry import SAMPLERS, TASKS

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("sgd", "adam")
INITS = ("random", "stationary")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}
DEFAULT_STEPS = 1000


#: ``negbench compare``'s grid defaults (its run options' defaults are RunConfig's)
DEFAULT_BATCH_SIZES = "4,32"
DEFAULT_SEEDS = "3"


@dataclass
class RunConfig:
    """Everything that defines a run. ``None`` means "derive a default" (see :func:`resolve`)."""

    sampler: str = "emc2"
    task: str = "digits"
    batch_size: int = 32
    steps: int | None = None
    epochs: float | None = None
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta: float = 5.0
    seed: int | None = None
    device: str = "auto"
    eval_every: int | None = None
    out: Path = Path("results/runs")
    data_root: Path | None = None
    sampler_params: dict[str, Any] = field(default_factory=dict)
    task_params: dict[str, Any] = field(default_factory=dict)
    grad_error: bool = False
    #: TV probe batches per evaluation; None: min(100, max(1, steps // 10)) (negbench.resolution)
    tv_steps: int | None = None
    tv_anchors: int = 8
    max_items: int | None = None  # train on the first N items only (Task.subsample)
    download: bool = False  # let a task fetch missing data where a network exists
    preset: str | None = None  # recorded only: the CLI applies presets (negbench.presets)
    #: steps between checkpoints; None: one at each metric row. Not part of the run id (a
    #: checkpoint never changes the results), like every field outside prepare()'s ``experiment``
    checkpoint_every: int | None = None
    #: the parameters training starts from: ``random`` (the seed's initialisation) or
    #: ``stationary`` (exact gradient descent on F from it first; negbench.warmstart)
    init: str = "random"
    init_lr: float = 1.0  # step size of that gradient descent
    init_tol: float = 0.01  # it stops once ‖∇F‖² < init_tol ...
    init_steps: int = 2000  # ... or after this many steps
    #: R ≥ 2: at each evaluation, R independent sampler gradient estimates at the current θ
    #: give grad_bias_sq and grad_var (negbench.gradsplit); 0: off
    grad_split: int = 0


def derive_seed(base: int, purpose: str) -> int:
    """An independent 63-bit seed for one purpose (data, init, order, sampler, probe)."""
    digest = hashlib.sha256(f"{base}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split_set_options(pairs: list[str], sampler: str, task: str) -> tuple[dict[str, str], dict[str, str]]:
    """Route ``--set key=value`` pairs to the sampler or the task. A key both have must be
    written ``sampler.key`` or ``task.key``."""
    sampler_keys = SAMPLERS.get_class(sampler).params
    task_keys = TASKS.get_class(task).params
    sampler_params: dict[str, str] = {}
    task_params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {pair!r}; e.g. --set burn_in=0.5")
        scope, dot, bare = key.partition(".")
        if dot and scope in ("sampler", "task"):
            (sampler_params if scope == "sampler" else task_params)[bare] = value
        elif key in sampler_keys and key in task_keys:
            raise UserError(f"--set {key} is a parameter of both the sampler and the task; write sampler.{key}= or task.{key}=")
        elif key in sampler_keys:
            sampler_params[key] = value
        elif key in task_keys:
            task_params[key] = value
        else:
            known = sorted({*sampler_keys, *task_keys})
            raise UserError(
                f"unknown --set key {key!r}{suggest(key, known)}; sampler {sampler!r} and task {task!r} "
                f"take: {', '.join(known) or 'no parameters'}"
            )
    return sampler_params, task_params


def check_writable(folder: Path) -> None:
    """Fail early, before any work, if ``folder`` cannot be created or written."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"output path {str(probe)!r} is a file, not a folder; pass --out DIR")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder {str(folder)!r} is not writable; pass --out DIR with a writable folder")


def resolve_device(name: str) -> "torch.device":
    import torch  # here, not at the top: validation errors come before torch is loaded

    if name not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def validate_numbers(config: RunConfig) -> None:
    """Range checks that need no data."""
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {config.batch_size}")
    if config.steps is not None and config.epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    if config.steps is not None and config.steps < 1:
        raise UserError(f"--steps must be a positive integer, got {config.steps}")
    if config.epochs is not None and not (math.isfinite(config.epochs) and config.epochs > 0):
        raise UserError(f"--epochs must be a positive number, got {config.epochs}")
    if config.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}{suggest(config.optimizer, OPTIMIZERS)}")
    for name, value in (("--lr", config.lr), ("--momentum", config.momentum), ("--weight-decay", config.weight_decay)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"{name} must be a finite number >= 0, got {value}")
    if config.momentum >= 1:
        raise UserError(f"--momentum must be in [0, 1), got {config.momentum}")
    if not (math.isfinite(config.beta) and config.beta > 0):
        raise UserError(f"--beta must be a finite number > 0, got {config.beta}")
    if config.seed is not None and not 0 <= config.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2^32), got {config.seed}")
    if config.eval_every is not None and config.eval_every < 1:
        raise UserError(f"--eval-every must be a positive integer, got {config.eval_every}")
    if config.tv_steps is not None and config.tv_steps < 0:
        raise UserError(f"--tv-steps must be >= 0 (0 turns sampling_tv off), got {config.tv_steps}")
    if config.tv_anchors < 1:
        raise UserError(f"--tv-anchors must be a positive integer, got {config.tv_anchors}")
    if config.max_items is not None and config.max_items < 2:
        raise UserError(f"--max-items must be an integer >= 2, got {config.max_items}")
    if config.init not in INITS:
        raise UserError(f"--init must be one of {', '.join(INITS)}, got {config.init!r}{suggest(config.init, INITS)}")
    if not (math.isfinite(config.init_lr) and config.init_lr > 0):
        raise UserError(f"--init-lr must be a finite number > 0, got {config.init_lr}")
    if not (math.isfinite(config.init_tol) and config.init_tol > 0):
        raise UserError(f"--init-tol must be a finite number > 0, got {config.init_tol}")
    if config.init_steps < 1:
        raise UserError(f"--init-steps must be a positive integer, got {config.init_steps}")
    if config.grad_split == 1 or config.grad_split < 0:
        raise UserError(f"--grad-split must be 0 (off) or a number of estimates R >= 2 (the variance needs two), "
                        f"got {config.grad_split}; e.g. --grad-split 8")
    if config.checkpoint_every is not None and config.checkpoint_every < 1:
        raise UserError(f"--checkpoint-every must be a positive number of steps, got {config.checkpoint_every}")


def choose_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def as_dict(config: RunConfig) -> dict[str, Any]:
    data = asdict(config)
    data["out"] = str(config.out)
    data["data_root"] = None if config.data_root is None else str(config.data_root)
    return data
