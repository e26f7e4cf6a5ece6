"""Multi-process training (DESIGN §5, "Distributed"): ``torchrun --nproc-per-node=N -m negbench
run ...`` or ``negbench run --nproc N``; gloo on CPU, nccl on CUDA (one GPU per process).

Every rank stays an exact replica of a single-process run on the same global batch:

* every rank draws the same global batch (same order and data generators) and builds the inputs
  of all of it, then encodes only its **shard** (:func:`shard`: contiguous, sizes differing by at
  most one; the anchors of rank r are the two views of its B/W items);
* the shards' embeddings are **all-gathered with gradients** (:func:`gather_rows`), so every rank
  holds the embeddings of the whole global batch and of every extra candidate;
* every rank runs the sampler on the whole global batch with an identically seeded generator, so
  W and every per-item state update are the same everywhere and no state is exchanged;
* rank r's loss is its anchors' share of ℓ (:func:`rank_loss`),

      ℓ_r = β/A · Σ_{a ∈ rows(r)} [ Σ_c W_ac <e_a, e_c> − <e_a, e_a⁺> ],     Σ_r ℓ_r = ℓ,

  whose backward reaches every other rank's embeddings through the gather's backward
  (∂ℓ/∂e = Σ_r ∂ℓ_r/∂e, an all-reduce), and the parameter gradients are summed over ranks
  (:func:`sum_gradients`): every rank then holds ∇_θ ℓ — the single-process gradient — and takes
  the same optimiser step;
* evaluations run on every rank (they are deterministic, so every stop decision agrees) and
  first check that the replicas are still identical (:func:`check_replicas`); only rank 0 writes
  files and prints (:func:`from_main` hands its reads to the others); a signal stops all ranks at
  the same step (:func:`any_rank`).

Without torchrun (``WORLD_SIZE`` unset or 1) every helper is the identity, so the single-process
path is unchanged.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import warnings
from typing import Any, Callable, Sequence, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from negbench.config import resolve_device
from negbench.errors import UserError
from negbench.objective import surrogate_loss

T = TypeVar("T")

__all__ = [
    "any_rank", "check_batch_size", "check_replicas", "describe", "from_main", "gather_rows", "init_from_env",
    "is_main", "launch", "launched_by_torchrun", "rank", "rank_device", "rank_loss", "replicate_model", "shard",
    "shard_bounds", "sum_gradients", "world_size",
]


# ---- the process group --------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True in a process that torchrun started as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_option: str) -> None:
    """Join the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): nccl with one GPU per local rank when the
    run's device is CUDA, gloo otherwise. A no-op without torchrun or when already joined."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    device = resolve_device(device_option)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU, or use --device cpu"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    atexit.register(_shutdown)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the only process that writes results and prints."""
    return rank() == 0


def describe() -> dict[str, Any]:
    """What config.json records of the process group."""
    return {"world_size": world_size(), "backend": dist.get_backend() if dist.is_initialized() else None}


def rank_device(device: torch.device) -> torch.device:
    """This rank's own GPU (``cuda:LOCAL_RANK``) when the run is on CUDA."""
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_batch_size(batch_size: int, processes: int | None = None) -> None:
    """The global batch is split evenly: B must be a multiple of the number of processes."""
    processes = world_size() if processes is None else processes
    if batch_size % processes:
        raise UserError(
            f"--batch-size {batch_size} is not divisible by the {processes} processes; use a multiple of "
            f"{processes} (it is the global batch, split evenly across processes)"
        )


# ---- agreement between ranks ----------------------------------------------------------------
def from_main(compute: Callable[[], T]) -> T:
    """``compute()`` run on rank 0 only and its (picklable) result handed to every rank."""
    if world_size() == 1:
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on some rank (e.g. a signal arrived)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _flat_values(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value.detach()]
    if isinstance(value, (int, float, bool)):
        return [torch.tensor(float(value))]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _flat_values(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flat_values(item)]
    return []


def check_replicas(*values: Any) -> None:
    """Raise on every rank when the ranks' copies of ``values`` (tensors, numbers, nested in
    dicts and lists: the parameters, the sampler state) are not identical — the lockstep every
    rank's exact replica of the run depends on (it needs bitwise-deterministic computations on
    identical hardware). Compares float64 checksums of each tensor: Σx, Σx², Σ(k/n)·x_k over the
    finite entries and the number of non-finite ones."""
    if world_size() == 1:
        return
    device = _collective_device()
    sums = [torch.zeros(0, dtype=torch.float64, device=device)]
    for tensor in (t for v in values for t in _flat_values(v)):
        x = tensor.reshape(-1).to(device, torch.float64)
        finite = torch.isfinite(x)
        x = torch.where(finite, x, 0.0)
        position = torch.arange(x.numel(), dtype=torch.float64, device=device) / max(1, x.numel())
        sums.append(torch.stack([x.sum(), x.pow(2).sum(), (position * x).sum(), (~finite).sum().double()]))
    local = torch.cat(sums)
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise RuntimeError(
            "the processes' copies of the parameters or the sampler state differ: the sampler or the encoder "
            "is not deterministic across processes (different hardware or libraries on the nodes?)"
        )


def replicate_model(model: nn.Module) -> nn.Module:
    """Make every rank's copy of the model rank 0's (parameters and buffers are broadcast). On
    CUDA, BatchNorm becomes SyncBatchNorm so batch statistics are those of the global batch."""
    if world_size() == 1:
        return model
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_batch_norm:
        if dist.get_backend() == "nccl":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            warnings.warn(
                "BatchNorm statistics are per process on CPU (SyncBatchNorm needs CUDA): the gradient is "
                "not exactly the single-process one", stacklevel=2,
            )
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)
    return model


# ---- sharding and the gather with gradients ---------------------------------------------------
def shard_bounds(n: int, processes: int | None = None, which: int | None = None) -> tuple[int, int]:
    """Rows [start, stop) of ``n`` that rank ``which`` handles: contiguous shards whose sizes
    differ by at most one (``torch.tensor_split``'s rule)."""
    processes = world_size() if processes is None else processes
    which = rank() if which is None else which
    base, extra = divmod(n, processes)
    start = which * base + min(which, extra)
    return start, start + base + (1 if which < extra else 0)


def shard(n: int) -> slice:
    """This rank's rows of ``n`` (all of them in a single process)."""
    return slice(*shard_bounds(n))


class _GatherRows(torch.autograd.Function):
    """y = cat_r x_r over ranks, identical on every rank. Each rank's loss ℓ_r depends on all of
    y, so ∂(Σ_r ℓ_r)/∂x_r is rank r's slice of Σ_r' ∂ℓ_r'/∂y: an all-reduce, then a slice."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, total: int) -> Tensor:  # type: ignore[override]
        processes = world_size()
        sizes = [shard_bounds(total, processes, r) for r in range(processes)]
        rows = max(stop - start for start, stop in sizes)
        padded = local.new_zeros((rows, *local.shape[1:]))
        padded[: local.shape[0]] = local
        pieces = [torch.empty_like(padded) for _ in range(processes)]
        dist.all_gather(pieces, padded.contiguous())
        ctx.own = shard_bounds(total, processes)
        return torch.cat([piece[: stop - start] for piece, (start, stop) in zip(pieces, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start, stop = ctx.own
        return grad[start:stop], None


def gather_rows(local: Tensor, total: int) -> Tensor:
    """The rows of every rank's shard (``local`` holds this rank's :func:`shard` of ``total``
    rows), concatenated in order and identical on every rank, differentiable: gradients reach
    each shard's owner. The identity in a single process."""
    if world_size() == 1:
        return local
    return _GatherRows.apply(local, total)


# ---- the loss and the gradient ----------------------------------------------------------------
def rank_loss(anchor_emb: Tensor, candidate_emb: Tensor, weights: Tensor, positive: Tensor, beta: float) -> Tensor:
    """This rank's share of the surrogate ℓ (objective.surrogate_loss): the rows of its own
    anchors, scaled by A_r/A so that the shares of all ranks sum to ℓ. All of ℓ in one process."""
    num_anchors = anchor_emb.shape[0]
    if world_size() == 1:
        return surrogate_loss(anchor_emb, candidate_emb, weights, positive, beta)
    rows = shard(num_anchors)
    share = surrogate_loss(anchor_emb[rows], candidate_emb, weights[rows], positive[rows], beta)
    return share * ((rows.stop - rows.start) / num_anchors)


def sum_gradients(params: Sequence[nn.Parameter], loss: Tensor) -> float:
    """Sum the parameter gradients and the loss shares over ranks (one all-reduce), so every
    rank holds ∇_θ ℓ = Σ_r ∇_θ ℓ_r; returns ℓ = Σ_r ℓ_r. A parameter keeps ``grad = None`` only
    when it has none on every rank (optimisers skip those)."""
    if world_size() == 1:
        return float(loss.detach())
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    device = loss.device
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=device)
    flat = torch.cat([*parts, present, loss.detach().reshape(1).to(dtype)])
    dist.all_reduce(flat)
    offset = 0
    for p, has_grad in zip(params, flat[-len(params) - 1 : -1].tolist()):
        size = p.numel()
        if has_grad:
            total = flat[offset : offset + size].view_as(p)
            if p.grad is None:
                p.grad = total.to(p.dtype).clone()
            else:
                p.grad.copy_(total)
        offset += size
    return float(flat[-1])


# ---- the launcher ----------------------------------------------------------------------------
def launch(processes: int, args: list[str]) -> int:
    """Run ``python -m negbench <args>`` as ``processes`` processes on this machine under
    torchrun (``torch.distributed.run --standalone``: a local rendezvous on a free port); waits
    and returns its exit code (130 after a Ctrl-C, which reaches torchrun too: it passes the signal
    to its workers, which stop at the same step and save the run for a resume)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "negbench", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    child = subprocess.Popen(command, env=env)
    interrupted = False
    while True:
        try:
            code = child.wait()
            return 130 if interrupted else code
        except KeyboardInterrupt:
            interrupted = True
