"""Helpers shared by the sampler tests: frozen random embeddings and bound samplers (the
conformance suite's own, :mod:`negbench.conformance`)."""

from __future__ import annotations

from negbench.conformance import BETA, DIM, N_ITEMS, N_VIEWS, bound_sampler, frozen_views, run_steps

__all__ = ["BETA", "DIM", "N_ITEMS", "N_VIEWS", "bound_sampler", "frozen_views", "run_steps"]
