"""A few training steps of every sampler variant on a tiny synthetic task, recording each step's
parameter gradient, the loss, the final parameters and the sampler state.

Run in-process it gives the single-process reference; run as a script by each of several
processes (with torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
it trains through ``negbench.distributed`` and saves ``rank<r>.pt`` in the folder it is given.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from negbench import list_samplers, runner
from negbench.config import RunConfig
from negbench.registry import SAMPLERS

NUM_ITEMS, BATCH, STEPS = 16, 8, 4  # N/B = 2: items are revisited, so chain states go stale
TASK_PARAMS = {"num_items": NUM_ITEMS, "input_dim": 8, "hidden": 16, "dim": 8, "views": 3}
#: variants beyond every registered sampler's test_params: name -> (sampler, params, extra chunk)
EXTRA_VARIANTS: dict[str, tuple[str, dict[str, Any], int | None]] = {
    "emc2-stale-refresh": ("emc2", {"stale": "refresh"}, None),
    "emc2-chain-item": ("emc2", {"chain": "item", "stale": "refresh"}, None),
    "full_softmax-two-pass": ("full_softmax", {}, 10),  # 48 extras in chunks of 10
}


def variants() -> dict[str, tuple[str, dict[str, Any], int | None]]:
    """Every registered sampler with its ``test_params``, plus :data:`EXTRA_VARIANTS`."""
    out: dict[str, tuple[str, dict[str, Any], int | None]] = {
        name: (name, {}, None) for name in list_samplers()
    }
    out.update(EXTRA_VARIANTS)
    return out


def run_variant(name: str, out: Path) -> dict[str, Any]:
    sampler, params, chunk = variants()[name]
    config = RunConfig(
        sampler=sampler, task="synthetic", batch_size=BATCH, steps=STEPS, optimizer="sgd", lr=0.5,
        momentum=0.5, beta=5.0, seed=11, device="cpu", out=out, tv_steps=0,
        sampler_params={**SAMPLERS.get_class(sampler).test_params, **params}, task_params=dict(TASK_PARAMS),
    )
    default_chunk = runner.EXTRA_CHUNK
    if chunk is not None:
        runner.EXTRA_CHUNK = chunk
    try:
        trainer = runner.Trainer(runner.prepare(config), Console(quiet=True), show_progress=False)
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
    finally:
        runner.EXTRA_CHUNK = default_chunk


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
