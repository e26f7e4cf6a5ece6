"""A few training steps of every sampler variant on a tiny synthetic task, recording each step's
parameter gradient, the loss, the final parameters and the sampler state.

Run in-process it gives the single-process reference; run as a script by each of several
processes (with torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
it trains through ``negbench.distributed`` and saves ``rank<r>.pt`` in the folder it is given.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

from negbench import list_samplers, training
from negbench.resolution import prepare
from negbench.config import RunConfig
from negbench.encoders import Encoder, mlp_encoder
from negbench.registry import SAMPLERS, TASKS
from negbench.task import Task

NUM_ITEMS, BATCH, STEPS = 16, 8, 4  # N/B = 2: items are revisited, so chain states go stale
SYNTHETIC = {"num_items": NUM_ITEMS, "input_dim": 8, "hidden": 16, "dim": 8, "views": 3}
AUGMENTED_TASK = "dist_test_augmented_points"


class AugmentedPoints(Task):
    """A random-augmentation task: every view is a fresh noisy copy of a fixed point, drawn from
    the runner's data generator (so the ranks must draw the same augmentations)."""

    finite_views = False
    labelled = False

    def load(self, *, seed: int, data_root: Path | None = None) -> None:
        self.points = torch.randn(NUM_ITEMS, 8, generator=torch.Generator().manual_seed(seed))
        self.num_items, self.num_views = NUM_ITEMS, None

    def inputs(self, items: torch.Tensor, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.points[items] + 0.3 * torch.randn(items.numel(), 8, generator=generator)

    def make_encoder(self) -> Encoder:
        return mlp_encoder(8, 16, 8)


@contextlib.contextmanager
def augmented_task_registered() -> Iterator[None]:
    """The test task exists only while a variant uses it (other tests see the real registry)."""
    TASKS.register(AUGMENTED_TASK)(AugmentedPoints)
    try:
        yield
    finally:
        TASKS._classes.pop(AUGMENTED_TASK, None)


class Variant(NamedTuple):
    sampler: str
    params: dict[str, Any]
    task: str = "synthetic"
    extra_chunk: int | None = None  # a small training.EXTRA_CHUNK forces the two-pass extras path


#: variants beyond every registered sampler's test_params on the synthetic task
EXTRA_VARIANTS = {
    "emc2-stale-refresh": Variant("emc2", {"stale": "refresh"}),
    "emc2-chain-item": Variant("emc2", {"chain": "item", "stale": "refresh"}),
    "full_softmax-two-pass": Variant("full_softmax", {}, extra_chunk=10),  # 48 extras in chunks of 10
    "in_batch-augmented": Variant("in_batch", {}, task=AUGMENTED_TASK),
    "emc2-augmented-stale-refresh": Variant("emc2", {"stale": "refresh"}, task=AUGMENTED_TASK),
    "queue-augmented": Variant("queue", {}, task=AUGMENTED_TASK),
}


def variants() -> dict[str, Variant]:
    """Every registered sampler with its ``test_params``, plus :data:`EXTRA_VARIANTS`."""
    return {**{name: Variant(name, {}) for name in list_samplers()}, **EXTRA_VARIANTS}


def run_variant(name: str, out: Path) -> dict[str, Any]:
    variant = variants()[name]
    config = RunConfig(
        sampler=variant.sampler, task=variant.task, batch_size=BATCH, steps=STEPS, optimizer="sgd", lr=0.5,
        momentum=0.5, beta=5.0, seed=11, device="cpu", out=out, tv_steps=0,
        sampler_params={**SAMPLERS.get_class(variant.sampler).test_params, **variant.params},
        task_params=dict(SYNTHETIC) if variant.task == "synthetic" else {},
    )
    default_chunk = training.EXTRA_CHUNK
    if variant.extra_chunk is not None:
        training.EXTRA_CHUNK = variant.extra_chunk
    with augmented_task_registered():
        try:
            return _train(config)
        finally:
            training.EXTRA_CHUNK = default_chunk


def _train(config: RunConfig) -> dict[str, Any]:
    trainer = training.Trainer.from_prepared(prepare(config))
    record: dict[str, Any] = {"grads": [], "losses": [], "extras": []}
    propose = trainer.sampler.propose

    def counting_propose(batch):  # type: ignore[no-untyped-def]
        extras = propose(batch)
        record["extras"].append(0 if extras is None else int(extras.items.numel()))
        return extras

    trainer.sampler.propose = counting_propose  # type: ignore[method-assign]
    for _ in range(STEPS):
        record["losses"].append(trainer.train_step())
        record["grads"].append([p.grad.detach().clone() for p in trainer.params])
    record["params"] = [p.detach().clone() for p in trainer.params]
    record["state"] = trainer.sampler.state_dict()
    return record


def agreement_checks() -> dict[str, Any]:
    """The rank-agreement helpers, each on inputs that agree or differ across ranks."""
    from negbench import distributed

    def replicas_differ(values: Any) -> bool:
        try:
            distributed.check_replicas(values)
        except RuntimeError:
            return True
        return False

    other = distributed.rank() == 1
    score = torch.tensor([float("-inf"), 0.5, float("-inf"), 2.0])
    return {
        "from_main": distributed.from_main(distributed.rank),
        "any_rank_one": distributed.any_rank(other),
        "any_rank_none": distributed.any_rank(False),
        "same": replicas_differ({"w": torch.arange(6.0), "steps": 3, "score": score}),
        "value": replicas_differ({"w": torch.arange(6.0) + (1e-6 if other else 0.0)}),
        "order": replicas_differ([torch.tensor([1, 2, 3]) if other else torch.tensor([2, 1, 3])]),
        "beside_inf": replicas_differ([torch.where(torch.arange(4) == 1, 0.25 if other else 0.5, score)]),
        "number": replicas_differ({"steps": 4 if other else 3}),
    }


def main(folder: str) -> None:
    from negbench import distributed

    torch.set_num_threads(1)
    results = {name: run_variant(name, Path(folder) / "runs") for name in variants()}
    results["agreement"] = agreement_checks()
    torch.save(results, Path(folder) / f"rank{distributed.rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
