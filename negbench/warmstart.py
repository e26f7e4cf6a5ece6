"""``--init stationary``: start training near a stationary point of the exact GCL.

A convergence rate measured from the near-collapsed random initialisation says little: every
affordable run is still leaving it (issue 11). So, before the first training step, the
encoder's parameters (the seed's initialisation) are moved by exact full-batch gradient
descent on F (DESIGN §1.1),

    θ_{k+1} = θ_k - η ∇F(θ_k),        η = ``init_lr``,

until ``‖∇F(θ_k)‖² < init_tol`` at an iterate that *counts* (``stopped_by = "threshold"``,
θ_k is kept) or for ``init_steps`` steps (``stopped_by = "budget"``: of the iterates that
count, the one with the smallest gap is kept — on this sharp, normalised objective a
fixed-step descent oscillates, and the smallest gap is the nearest-to-stationary point it
found; when none counts, the one with the smallest F). An iterate counts when F has fallen
by at least :data:`MIN_DROP` nats from F(θ_0). That condition matters: a random
initialisation lies near the collapsed stationary point (every embedding alike, F ≈ log of
the number of negatives, a tiny gap — the worst representation, not a warm start), and the
first iterates of the descent, still beside it, have the smallest gaps of all (measured on
digits' first 500 items: ‖∇F‖² 0.020 at F 6.82, against 0.15 at F 2.28 after 2,000 steps). Only the parameters change: the sampler's
state, the optimiser and every generator start as in a cold run.

The result depends only on the task's data and encoder, β, the initialisation seed and the
descent's settings, so it is cached per those — ``<out>/.init/<key>.pt`` with the parameters
and what happened (written atomically, under a blocking file lock so that two processes of
one grid compute it once) — and a grid over samplers, batch sizes and horizons computes it
once per seed. What happened is recorded in the run's ``config.json`` as ``init_result``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from negbench import distributed
from negbench.results import atomic_torch_save

if TYPE_CHECKING:
    from rich.console import Console

    from negbench.training import Trainer

#: ``() -> (F(θ), ∇F(θ))`` at the module's current parameters
ExactFn = Callable[[], tuple[float, list[Tensor]]]
CACHE_FOLDER = ".init"
#: nats by which F must have fallen from F(θ_0) before an iterate may be kept
MIN_DROP = 1.0


@dataclass(frozen=True)
class DescentSettings:
    """Step size, stopping threshold on ‖∇F‖² and step budget of the warm start."""

    lr: float = 1.0
    tol: float = 0.01
    max_steps: int = 2000

    def describe(self) -> dict[str, Any]:
        return {"init": "stationary", "init_lr": self.lr, "init_tol": self.tol, "init_steps": self.max_steps,
                "init_min_drop": MIN_DROP}


def _gap(grads: list[Tensor]) -> float:
    return float(sum(float(g.pow(2).sum()) for g in grads))


def gradient_descent(params: list[nn.Parameter], exact: ExactFn, settings: DescentSettings) -> dict[str, Any]:
    """Run the descent of the module docstring on ``params`` in place; returns what happened
    (``stopped_by``, ``steps``, the gap and F at the start and at the kept iterate)."""
    value, grads = exact()
    start = {"grad_norm_sq_start": _gap(grads), "gcl_start": value}
    best = (math.inf, value, 0, [p.detach().clone() for p in params])  # (gap, F, step, θ) kept so far
    lowest = (_gap(grads), value, 0, best[3])  # the smallest-F iterate: kept when none counts
    steps, stopped_by = 0, "budget"
    while True:
        gap = _gap(grads)
        counts = value <= start["gcl_start"] - MIN_DROP
        if counts and gap < best[0]:
            best = (gap, value, steps, [p.detach().clone() for p in params])
        elif not counts and math.isinf(best[0]) and value < lowest[1]:
            lowest = (gap, value, steps, [p.detach().clone() for p in params])
        if counts and gap < settings.tol:
            stopped_by = "threshold"
            break
        if steps == settings.max_steps:
            break
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(settings.lr * g)
        steps += 1
        value, grads = exact()
    gap, value, at_step, kept = best if math.isfinite(best[0]) else lowest
    with torch.no_grad():
        for p, saved in zip(params, kept):
            p.copy_(saved)
    return {**start, "stopped_by": stopped_by, "steps": steps, "kept_step": at_step, "grad_norm_sq": gap,
            "gcl": value, **settings.describe()}


def cache_key(identity: dict[str, Any]) -> str:
    """A short hash of what the warm start depends on (task and its parameters, item cap, β,
    the seeds of the data and of the initialisation, the descent settings)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _blocking_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits for a process computing the same warm start
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def warm_start(model: nn.Module, params: list[nn.Parameter], exact: ExactFn, settings: DescentSettings,
               cache_dir: Path, identity: dict[str, Any], *, write: bool = True,
               log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Move ``model`` to the cached warm start of ``identity``, computing (and, with ``write``,
    caching) it when missing. Returns what happened, plus ``cached`` and ``key``."""
    key = cache_key({**identity, **settings.describe()})
    path = cache_dir / f"{key}.pt"
    with _blocking_lock(cache_dir / f"{key}.lock") if write else contextlib.nullcontext():
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            model.load_state_dict(saved["model"])
            return {**saved["info"], "cached": True, "key": key}
        log(f"warm start: exact gradient descent on F (lr {settings.lr}, until ‖∇F‖² < {settings.tol} "
            f"or {settings.max_steps} steps), cached in {path}")
        info = gradient_descent(params, exact, settings)
        if write:
            atomic_torch_save(path, {"model": model.state_dict(), "info": info, "identity": identity})
    log(f"warm start: stopped by {info['stopped_by']} after {info['steps']} steps, ‖∇F‖² "
        f"{info['grad_norm_sq_start']:.4g} → {info['grad_norm_sq']:.4g}, F {info['gcl_start']:.4g} → {info['gcl']:.4g}")
    return {**info, "cached": False, "key": key}


def start_trainer(trainer: "Trainer", record: dict[str, Any], console: "Console") -> None:
    """``--init stationary`` for a :class:`~negbench.training.Trainer` built from ``record``
    (its ``config.json``): move its model to the cached warm start of its task and seeds, and
    record what happened as ``record["init_result"]``."""
    config = trainer.run.config
    identity = {key: record.get(key) for key in ("task", "task_params", "max_items", "beta")}
    identity["seeds"] = {key: record["seeds"][key] for key in ("data", "init")}
    record["init_result"] = warm_start(
        trainer.model, trainer.params, trainer.exact_gradient,
        DescentSettings(config.init_lr, config.init_tol, config.init_steps), config.out / CACHE_FOLDER, identity,
        write=distributed.is_main(), log=console.print,
    )
