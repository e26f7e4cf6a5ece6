"""Helpers shared by the sampler tests: frozen random embeddings and bound samplers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from negbench import get_sampler
from negbench.distribution import draw_views, frozen_step
from negbench.registry import SAMPLERS
from negbench.sampler import Sampler, SamplerContext

N_ITEMS, N_VIEWS, DIM, BETA = 40, 2, 6, 5.0


def frozen_views(n: int = N_ITEMS, m: int = N_VIEWS, d: int = DIM, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, m, d, generator=gen), dim=2)


def bound_sampler(name: str, seed: int = 0, n: int = N_ITEMS, m: int | None = N_VIEWS, beta: float = BETA, **params) -> Sampler:
    cls = SAMPLERS.get_class(name)
    sampler = get_sampler(name, **{**cls.test_params, **params})
    gen = torch.Generator().manual_seed(seed)
    return sampler.bind(SamplerContext(num_items=n, num_views=m, beta=beta, dim=DIM, generator=gen))


def run_steps(sampler: Sampler, views: torch.Tensor, steps: int, batch_size: int, seed: int = 0):
    """``steps`` frozen-embedding steps; returns the list of (batch, weights)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        items = torch.randperm(views.shape[0], generator=gen)[:batch_size]
        item_views = draw_views(batch_size, views.shape[1], gen)
        out.append(frozen_step(sampler, views, items, item_views, gen))
    return out


