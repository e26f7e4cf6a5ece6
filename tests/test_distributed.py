"""Multi-process training (DESIGN §5): on 2 gloo processes every sampler's parameter gradient
equals the single-process gradient on the same global batch, the sampler states are identical
on both ranks, and ``negbench run --nproc 2`` writes one run folder (rank 0 only) whose metrics
match the single-process run's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distworker
from clikit import TINY_SYNTHETIC, invoke
from negbench.distributed import shard_bounds

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 240
WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """The environment of a child that may only talk over the loopback interface."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def run_group(commands: list[tuple[list[str], dict[str, str]]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start every command in its own session, wait for all of them at most TIMEOUT_S, and kill
    every process they started when one hangs or fails."""
    procs = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for cmd, env in commands]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
            if proc.returncode != 0:
                break
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed processes did not finish within {TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


# ---- gradient and state equality for every sampler ---------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """One 2-process job that runs every variant (amortising process start-up)."""
    folder = tmp_path_factory.mktemp("dist")
    port = str(free_port())
    commands = []
    for rank in range(WORLD):
        env = {**loopback_env(), "MASTER_PORT": port, "WORLD_SIZE": str(WORLD), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD)}
        commands.append(([sys.executable, str(TESTS / "distworker.py"), str(folder)], env))
    for result in run_group(commands, TESTS):
        assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def assert_same(a: Any, b: Any, exact: bool) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key], exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, exact)
    elif isinstance(a, torch.Tensor) and (exact or not a.is_floating_point()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    elif isinstance(a, float) and not exact:
        assert a == pytest.approx(b, abs=1e-5, rel=1e-5)
    else:
        assert a == b


@pytest.mark.parametrize("variant", list(distworker.variants()))
def test_two_processes_match_one(variant, two_ranks, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        single = distworker.run_variant(variant, tmp_path)
    finally:
        torch.set_num_threads(threads)
    rank0, rank1 = (ranks[variant] for ranks in two_ranks)
    # lockstep: both ranks hold bit-identical gradients, parameters and sampler state
    assert_same(rank0, rank1, exact=True)
    # and they are the single-process ones on the same global batch
    for step, (grads, reference) in enumerate(zip(rank0["grads"], single["grads"])):
        assert any(float(g.abs().max()) > 1e-3 for g in reference), "a zero gradient would prove nothing"
        for got, want in zip(grads, reference):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
    assert_same(rank0["state"], single["state"], exact=False)
    assert_same(rank0["params"], single["params"], exact=False)
    assert rank0["losses"] == pytest.approx(single["losses"], abs=1e-5, rel=1e-5)
    assert rank0["extras"] == single["extras"]
    if "refresh" in variant:
        assert sum(single["extras"]) > 0, "the owner-restricted extras path was not exercised"


def test_ranks_agree_and_a_difference_between_replicas_is_caught(two_ranks):
    for ranks in two_ranks:
        checks = ranks["agreement"]
        assert checks["from_main"] == 0  # rank 0's value on every rank
        assert checks["any_rank_one"] is True and checks["any_rank_none"] is False
        assert checks["same"] is False
        assert checks["value"] and checks["order"] and checks["beside_inf"] and checks["number"]


def test_shards_cover_every_row_once_in_order():
    for n in range(0, 12):
        for world in range(1, 5):
            bounds = [shard_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


# ---- the command line ---------------------------------------------------------------------------
RUN_ARGS = [*TINY_SYNTHETIC, "--sampler", "emc2", "--set", "stale=refresh", "--batch-size", "8", "--steps", "4",
            "--eval-every", "2", "--seed", "5", "--tv-steps", "3", "--grad-error", "--quiet"]


def test_run_nproc_2_writes_one_folder_matching_one_process(tmp_path, capsys):
    out = tmp_path / "dist"
    [result] = run_group([([sys.executable, "-m", "negbench", "run", *RUN_ARGS, "--out", str(out), "--nproc", "2"],
                           loopback_env())], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = [d for d in out.iterdir()]
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
        "config.json", "metrics.jsonl", "summary.json"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "backend": "gloo"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]  # one row each: rank 1 wrote nothing
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert result.stdout.count("grad_norm_sq_avg") == 1  # one summary table, printed by rank 0

    code, _, err = invoke(capsys, "run", *RUN_ARGS, "--out", str(tmp_path / "single"))
    assert code == 0, err
    single_dir = tmp_path / "single" / run_dir.name  # the run id does not depend on the process count
    single = [json.loads(line) for line in (single_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "gcl", "grad_norm_sq", "grad_error_sq", "sampling_tv", "accept_rate", "stale_frac"):
        for got, want in zip(rows, single):
            assert (got[key] is None) == (want[key] is None), key
            if want[key] is not None:
                assert got[key] == pytest.approx(want[key], abs=1e-5, rel=1e-4), key


# Bad --nproc values (every command's bad input, one table): tests/test_bad_input.py
