"""``negbench.ContrastiveLoss`` under DDP (issue 12): on 2 gloo processes, each feeding its shard
of the global batch to a ``DistributedDataParallel`` model, every sampler's parameter gradient
equals the single-process gradient on the concatenated batch, and both ranks hold the same
loss state as the single process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lossworker
from test_distributed import assert_same, free_port, loopback_env, run_group

TESTS = Path(__file__).resolve().parent
WORLD = 2


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("lossdist")
    port = str(free_port())
    commands = []
    for rank in range(WORLD):
        env = {**loopback_env(), "MASTER_PORT": port, "WORLD_SIZE": str(WORLD), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD)}
        commands.append(([sys.executable, str(TESTS / "lossworker.py"), str(folder)], env))
    for result in run_group(commands, TESTS):
        assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _tensors(state: dict[str, Any]) -> dict[str, Any]:
    extra = state["_extra_state"]
    return {**{k: v for k, v in state.items() if k != "_extra_state"}, "other": extra["other_state"],
            "generator": extra["generator"], "diagnostics": extra["diagnostics"], "steps": extra["steps"]}


@pytest.mark.parametrize("variant", list(lossworker.variants()))
def test_ddp_gradient_equals_one_process_on_the_concatenated_batch(variant, two_ranks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = lossworker.run_variant(variant)
    finally:
        torch.set_num_threads(threads)
    rank0, rank1 = (ranks[variant] for ranks in two_ranks)
    assert_same(_tensors(rank0["state"]), _tensors(rank1["state"]), exact=True)  # lockstep
    assert rank0["losses"] == rank1["losses"] and rank0["diagnostics"] == rank1["diagnostics"]
    for step, (grads, reference) in enumerate(zip(rank0["grads"], single["grads"])):
        assert any(float(g.abs().max()) > 1e-3 for g in reference), "a zero gradient would prove nothing"
        for got, want in zip(grads, reference):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
    assert_same(_tensors(rank0["state"]), _tensors(single["state"]), exact=False)
    assert rank0["losses"] == pytest.approx(single["losses"], abs=1e-5, rel=1e-5)
