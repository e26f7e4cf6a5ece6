"""A few steps of a user's own DDP training loop with ``negbench.ContrastiveLoss`` for every
sampler variant, recording each step's parameter gradient (after DDP's averaging), the loss
and the loss module's state.

Run in-process (one process, the whole global batch) it gives the reference; run as a script by
each of several processes (torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
it wraps the model in ``DistributedDataParallel`` over gloo, feeds each rank its shard of the
same global batches and saves ``rank<r>.pt`` in the folder it is given.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from negbench import ContrastiveLoss, list_samplers
from negbench.registry import SAMPLERS

NUM_ITEMS, NUM_VIEWS, BATCH, STEPS, IN_DIM, DIM = 16, 2, 8, 3, 5, 4


def variants() -> dict[str, tuple[str, dict[str, Any], int | None]]:
    """name -> (sampler, parameters, num_views): every registered sampler on a finite view set,
    plus random-augmentation and stale=refresh variants."""
    out = {name: (name, dict(SAMPLERS.get_class(name).test_params), NUM_VIEWS) for name in list_samplers()}
    out["emc2-augmented"] = ("emc2", {}, None)
    out["emc2-stale-refresh"] = ("emc2", {"stale": "refresh"}, NUM_VIEWS)
    out["neg_cache-augmented"] = ("neg_cache", {"k": 2, "refresh_frac": 0.2}, None)
    return out


def run_variant(name: str) -> dict[str, Any]:
    """``STEPS`` SGD steps; with several processes each rank takes its slice of every global batch."""
    sampler, params, num_views = variants()[name]
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    torch.manual_seed(0)
    data = torch.randn(NUM_ITEMS, NUM_VIEWS, IN_DIM)
    model: nn.Module = nn.Sequential(nn.Linear(IN_DIM, 8), nn.Tanh(), nn.Linear(8, DIM))
    plain = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion = ContrastiveLoss(sampler, num_items=NUM_ITEMS, beta=5.0, num_views=num_views, **params)

    def encode(items: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return plain(data[items, views.clamp_min(0)])  # view -1 ("any"): view 0, the same on every rank

    gen = torch.Generator().manual_seed(1)
    record: dict[str, Any] = {"grads": [], "losses": []}
    per_rank = BATCH // world
    for _ in range(STEPS):
        index = torch.randperm(NUM_ITEMS, generator=gen)[:BATCH]
        views = torch.rand(BATCH, NUM_VIEWS, generator=gen).argsort(dim=1)[:, :2]
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        index, views = index[mine], views[mine]
        z = model(data[index[:, None], views].reshape(-1, IN_DIM)).reshape(-1, 2, DIM)
        loss = criterion(z[:, 0], z[:, 1], index, views=views if num_views else None, encode=encode)
        optimizer.zero_grad()
        loss.backward()
        record["grads"].append([p.grad.clone() for p in plain.parameters()])
        record["losses"].append(float(loss.detach()))
        optimizer.step()
    record["state"] = criterion.state_dict()
    record["diagnostics"] = criterion.diagnostics()
    return record


def main(folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {name: run_variant(name) for name in variants()}
        torch.save(results, Path(folder) / f"rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
