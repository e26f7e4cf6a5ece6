"""``queue`` against an independent numpy implementation of MoCo's InfoNCE with a queue of
constant keys (He et al., CVPR 2020), its FIFO state, its stale gradient-free extras through
the runner, and its checkpoint resume."""

from __future__ import annotations

import json
import signal

import faults
import numpy as np
import pytest
import torch

from clikit import TINY_SYNTHETIC, invoke
from negbench.distribution import sampling_tv
from negbench.objective import surrogate_loss
from negbench.results import CHECKPOINT, METRICS, SUMMARY, read_rows
from negbench.sampler import Batch, join_candidates
from negbench.session import after_each_step
from reference import numerical_gradient
from samplerkit import DIM, bound_sampler, frozen_views


def unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    z = rng.normal(size=(rows, dim))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def moco_loss(z: np.ndarray, items: np.ndarray, keys: np.ndarray, key_items: np.ndarray, beta: float,
              in_batch: bool) -> float:
    """Mean over anchors of −log(e^{q·k⁺/t} / (e^{q·k⁺/t} + Σ_neg e^{q·k/t})), t = 1/β: the
    positive k⁺ is the anchor's other view (rows 2k, 2k+1), the negatives the queued keys of
    other items (a key of the anchor's own item is a positive, left out), plus — ``in_batch``
    — the batch rows of other items. The keys are constants."""
    total = 0.0
    for a in range(len(z)):
        pos = np.exp(beta * z[a] @ z[a ^ 1])
        neg = sum(np.exp(beta * z[a] @ k) for k, i in zip(keys, key_items) if i != items[a])
        if in_batch:
            neg += sum(np.exp(beta * z[a] @ z[b]) for b in range(len(z)) if items[b] != items[a])
        total += -np.log(pos / (pos + neg))
    return total / len(z)


def fill(sampler, rng: np.random.Generator, items: list[int]) -> None:
    """One step of ``items`` (two views each) at random embeddings: enqueues their anchors."""
    emb = torch.tensor(unit_rows(rng, 2 * len(items), DIM))
    batch = Batch.from_anchors(torch.tensor(items).repeat_interleave(2), torch.tensor([0, 1]).repeat(len(items)), emb)
    sampler.weigh(emb @ emb.T, batch)


@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_surrogate_gradient_is_moco_infonce_with_constant_keys(in_batch, beta):
    rng = np.random.default_rng(int(beta) + in_batch)
    sampler = bound_sampler("queue", n=20, beta=beta, size=10, in_batch=in_batch)
    fill(sampler, rng, [0, 1, 2, 3])
    fill(sampler, rng, [4, 5, 6])  # 14 anchors into 10 slots: the first 4 are overwritten
    keys, key_items = sampler.queue_emb.double().numpy(), sampler.queue_items.numpy()
    assert sorted(key_items.tolist()) == [2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    items = np.array([2, 2, 7, 7, 8, 8])  # item 2 is queued: its keys must be masked
    z = unit_rows(rng, 6, DIM)
    reference = numerical_gradient(lambda x: moco_loss(x, items, keys, key_items, beta, in_batch), z)

    emb = torch.tensor(z, requires_grad=True)
    batch = Batch.from_anchors(torch.tensor(items), torch.tensor([0, 1]).repeat(3), emb.detach())
    extras = sampler.propose(batch)
    assert extras is not None and extras.stale and extras.items.numel() == 10

    def no_encoding(*args):
        raise AssertionError("stale extras are never encoded")

    queued = extras.embeddings.double().requires_grad_(True)  # a leaf: does any gradient reach it?
    extras.embeddings = queued
    batch, candidate_emb = join_candidates(batch, emb, extras, no_encoding, no_encoding)
    weights = sampler.weigh(emb.detach() @ candidate_emb.detach().T, batch)
    loss = surrogate_loss(emb, candidate_emb, weights, batch.positive, beta)
    grad, queued_grad = torch.autograd.grad(loss, [emb, queued], allow_unused=True)
    assert queued_grad is None  # stale constants
    np.testing.assert_allclose(grad.numpy(), reference, atol=1e-5, rtol=0)
    own = batch.candidate_items[None, :] == batch.anchor_items[:, None]
    own[torch.arange(6), batch.positive] = False
    assert (weights[own] == 0).all()  # queued views of the anchor's own item get no weight


def test_queue_holds_the_last_q_anchors_in_fifo_order():
    sampler = bound_sampler("queue", n=40, size=7)
    rng = np.random.default_rng(0)
    pushed = []
    for step in range(5):
        items = list(range(3 * step, 3 * step + 3))
        fill(sampler, rng, items)
        pushed += [(i, v) for i in items for v in (0, 1)]
    held = sorted(zip(sampler.queue_items.tolist(), sampler.queue_views.tolist()))
    assert held == sorted(pushed[-7:])
    assert int(sampler.count) == 30
    fill(sampler, rng, list(range(20, 30)))  # 20 anchors > Q: only the last 7 are kept
    assert sorted(zip(sampler.queue_items.tolist(), sampler.queue_views.tolist())) == sorted(
        (i, v) for i in range(20, 30) for v in (0, 1))[-7:]


def test_state_bytes_is_q_times_4d_plus_8_plus_the_count():
    sampler = bound_sampler("queue", size=12)
    assert sampler.state_bytes() == 12 * (4 * DIM + 8) + 8


def test_sampling_tv_runs_and_the_stale_queue_counts():
    views = frozen_views()
    sampler = bound_sampler("queue", size=16)
    tv, floor = sampling_tv(sampler, views, 5.0, batch_size=4, steps=6, anchors=[0, 1], seed=0)
    assert 0.0 < tv < 1.0 and 0.0 < floor < 1.0
    in_batch_tv, _ = sampling_tv(bound_sampler("in_batch"), views, 5.0, batch_size=4, steps=6, anchors=[0, 1], seed=0)
    assert tv != in_batch_tv  # the queued candidates carry weight


RUN = ["run", *TINY_SYNTHETIC, "--sampler", "queue", "--set", "size=20", "--batch-size", "4", "--steps", "12",
       "--eval-every", "4", "--tv-steps", "2", "--grad-error", "--seed", "3", "--quiet"]
MACHINE_KEYS = {"step_ms", "sampler_ms", "samples_per_s", "peak_mem_bytes"}


def rows(run_dir):
    return [{k: v for k, v in r.items() if k not in MACHINE_KEYS} for r in read_rows(run_dir / METRICS, strict=True)]


def test_a_run_stopped_mid_window_resumes_bit_identically(tmp_path, capsys):
    code, _, err = invoke(capsys, *RUN, "--out", str(tmp_path / "ref"))
    assert code == 0, err
    [expected] = list((tmp_path / "ref").iterdir())
    with after_each_step(faults.kill_at(6, signal.SIGTERM)):  # the queue has wrapped by then (8 anchors a step)
        code, _, err = invoke(capsys, *RUN, "--out", str(tmp_path / "cut"))
    assert code == 130, err
    [run_dir] = list((tmp_path / "cut").iterdir())
    state = torch.load(run_dir / CHECKPOINT, weights_only=False)["sampler"]
    assert int(state["count"]) == 48 and state["queue_emb"].shape == (20, 8)
    code, _, err = invoke(capsys, *RUN, "--out", str(tmp_path / "cut"))
    assert code == 0 and "from step 6" in err, err
    assert rows(run_dir) == rows(expected)
    final = json.loads((run_dir / SUMMARY).read_text())["final"]
    assert final["state_bytes"] == 20 * (4 * 8 + 8) + 8 and final["sampling_tv"] is not None
