"""The fused EMC² sweep (DESIGN §2.1): one sampler step's whole proposal loop in one kernel, with
its random numbers generated inside it.

Contract of :func:`fused_sweep` (:class:`SweepInputs` in, :class:`Sweep` out). Row r is one
anchor's sweep of its chain over its valid proposal columns V_r = {c < K : valid[r, c]},
n_r = |V_r|. Its random numbers come from Philox-4x32-10 (:mod:`negbench.kernels.philox`) under
the 64-bit ``key``: for j < ⌈K/2⌉ the counter (j, r, step, 0) gives four words x0..x3, where x0
and x1 are the sort keys of columns 2j and 2j+1 and x2, x3 give log U of proposals 2j and 2j+1
(:func:`~negbench.kernels.philox.log_uniform`). The proposals are V_r in ascending order of
(key, column) — a uniformly random order — and proposal t < n_r, column c_t, has log score
ℓ_t = float32(β·sims[r, c_t]) (β·s in the sims dtype, then rounded to float32). With ℓ the
chain's stored log score (start: ``score[r]``)

    accept  ⇔  log U_t < ℓ_t − ℓ,      then  x ← c_t,  ℓ ← ℓ_t

in float32 (log space throughout). The state after each step t with B_r ≤ t < n_r,
B_r = ⌊burn_in·n_r⌋, is recorded: x's column (the start column ``column[r]``, possibly -1 =
out of batch, until something is accepted). The weights are the normalised histogram of the
records on columns ≥ 0, W[r, c] = #records on c / #records on any column ≥ 0 (0 for a row
without any). With ``pairs``, rows 2k and 2k+1 are the two views of one item sharing a chain:
row 2k+1 starts from the score and state row 2k ended on (or from its own ``column[2k+1]`` when
row 2k accepted nothing — the same stored state can sit in a different column for the other
view).

``negbench.samplers.emc2.reference_sweep`` is the same function in PyTorch
(:func:`random_streams` materialises the random numbers, then argsort and ``mh_sweep``); both
give the same states, scores, records and weights, bit for bit (tested). Seeded runs are
deterministic and resume exactly: the key is part of the sampler's checkpoint and the counter
holds the checkpointed step.

Backends: on the CPU a small C library (``emc2_sweep.c``: Philox and the log-uniforms in
blocks the compiler vectorises, a per-row counting sort of the keys, expected O(K), then the
sweep, four chains in lockstep so that their MH dependency chains overlap, which writes the
normalised weights; rows in parallel with OpenMP when the compiler has
it), built with the system C compiler at first use and cached in ``$NEGBENCH_CACHE_DIR``
(default ``~/.cache/negbench``; plain C without torch headers, so building takes well under a
second); on CUDA a Triton kernel (``_emc2_triton.py``: log U from Triton's own ``tl.philox``
inside the kernel; the proposal order from :func:`random_streams` and a ``torch.argsort``
before the launch), no host synchronisation. When a backend cannot be used
:func:`unavailable_reason` says why and :func:`fused_sweep` raises :class:`KernelUnavailable`;
the sampler then falls back to the reference.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from negbench.kernels.philox import MASK32, log_uniform, philox4x32

NOT_RECORDED = -2
OUT_OF_BATCH = -1
SOURCE = Path(__file__).with_name("emc2_sweep.c")
#: IEEE float semantics are part of the contract: no -ffast-math, no contraction into FMAs.
CFLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off")
#: tried first, in this order; a compiler that refuses one is retried without it
OPTIONAL_CFLAGS = (("-march=native",), ("-fopenmp",))
BUILD_TIMEOUT_S = 120


class KernelUnavailable(RuntimeError):
    """The fused sweep cannot run here (no C compiler, no Triton, a failed build...)."""


@dataclass(frozen=True)
class SweepInputs:
    """Everything one step's sweep reads (the module docstring gives the contract)."""

    sims: Tensor  # (R, C) float32 or float64: the similarities of the step
    valid: Tensor  # (R, C) bool: proposals are the valid columns among the first K
    column: Tensor  # (R,) integer: the chain's start column (-1: its state is out of batch)
    score: Tensor  # (R,) float32: the chain's stored log score (-inf: not started)
    beta: float
    burn_in: float  # fraction of each row's proposals not recorded
    key: int  # the 64-bit Philox key (the run's sampler seed)
    step: int  # the step counter, below 2^32
    num_proposal_columns: int  # K: proposals come from columns [0, K) (the in-batch ones)
    pairs: bool = False  # chain=item: rows 2k and 2k+1 share one chain

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.sims.shape[0]), int(self.num_proposal_columns)


class Sweep(NamedTuple):
    """What a sweep returns, per row r (``records`` only when asked for)."""

    column: Tensor  # (R,) int64: the final state's column
    score: Tensor  # (R,) float32: the final stored log score
    accepted: Tensor  # (R,) bool: some proposal of this row was accepted
    accepted_after_burn_in: Tensor  # (R,) int64
    recorded: Tensor  # (R,) int64: records = proposals after burn-in, max(n_r - B_r, 0)
    used: Tensor  # (R,) int64: records on a column >= 0 (the weights' denominator)
    out_of_batch: Tensor  # (R,) int64: records on OUT_OF_BATCH (-1)
    extra: Tensor  # (R,) int64: records on a column >= K (a refreshed extra)
    weights: Tensor  # (R, C) in the sims dtype: W[r, c] = records on c / used
    records: Tensor | None = None  # (R, K) int64: the column after step t, or NOT_RECORDED


def check_inputs(inputs: SweepInputs) -> None:
    """Raise ValueError when ``inputs`` break the shapes and dtypes of the contract."""
    rows, k = inputs.shape
    sims, valid = inputs.sims, inputs.valid
    if sims.dim() != 2 or valid.shape != sims.shape or valid.dtype != torch.bool:
        raise ValueError(f"sims and valid must be (R, C) tensors, valid bool; got {tuple(sims.shape)}, "
                         f"{tuple(valid.shape)} {valid.dtype}")
    if not 0 <= k <= sims.shape[1]:
        raise ValueError(f"num_proposal_columns must be in [0, {sims.shape[1]}], got {k}")
    if inputs.score.dtype != torch.float32:
        raise ValueError(f"score must be float32 (the chains store float32), got {inputs.score.dtype}")
    for name in ("column", "score"):
        if getattr(inputs, name).shape != (rows,):
            raise ValueError(f"{name} must have shape ({rows},), got {tuple(getattr(inputs, name).shape)}")
    if inputs.pairs and rows % 2:
        raise ValueError("pairs=True needs an even number of rows (two views per item)")
    if not 0 <= inputs.step < 2**32:
        raise ValueError(f"step must be in [0, 2^32), got {inputs.step}")


def logits_of(inputs: SweepInputs) -> Tensor:
    """(R, K) float32: β·s of the proposal columns, in the sims dtype, then rounded to float32."""
    return (inputs.beta * inputs.sims[:, : inputs.num_proposal_columns]).float()


def random_streams(inputs: SweepInputs, *, log_u: bool = True) -> tuple[Tensor, Tensor | None]:
    """The random numbers of a sweep, materialised: (R, K) int64 sort keys of the columns and
    (R, K) float32 log U of the proposals (the counters of the module docstring; None without
    ``log_u``)."""
    rows, k = inputs.shape
    device = inputs.sims.device
    half = (k + 1) // 2
    j = torch.arange(half, dtype=torch.long, device=device)[None, :]
    r = torch.arange(rows, dtype=torch.long, device=device)[:, None]
    zero = torch.zeros((), dtype=torch.long, device=device)
    w0, w1, w2, w3 = philox4x32((j, r, zero + inputs.step, zero), (inputs.key & MASK32, (inputs.key >> 32) & MASK32))
    keys = torch.stack([w0, w1], dim=2).reshape(rows, 2 * half)[:, :k]
    del w0, w1  # each word is freed once read: the peak of live temporaries faults in every step
    if not log_u:
        return keys, None
    first = log_uniform(w2)
    del w2
    return keys, torch.stack([first, log_uniform(w3)], dim=2).reshape(rows, 2 * half)[:, :k]


# ---- the CPU library ---------------------------------------------------------------------------
_lock = threading.Lock()
_cpu_lib: Any = None
_cpu_error: str | None = None
_cpu_info: dict[str, Any] = {}


def cache_dir() -> Path:
    """Where the built library is kept: ``$NEGBENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/negbench``,
    else ``~/.cache/negbench``."""
    if os.environ.get("NEGBENCH_CACHE_DIR"):
        return Path(os.environ["NEGBENCH_CACHE_DIR"])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "negbench"


def _compiler() -> list[str]:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    raise KernelUnavailable("no C compiler found (set CC, or install gcc)")


def _writable_folder() -> Path:
    folder = cache_dir() / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"negbench-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "kernels"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _cpu_signature() -> bytes:
    """What a ``-march=native`` build depends on: the CPU model and its feature flags."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))})).encode()
    return platform.processor().encode()


def _build(compiler: list[str], target: Path) -> dict[str, Any]:
    """Compile SOURCE into ``target`` (a temporary file, then an atomic rename) with as many of
    ``OPTIONAL_CFLAGS`` as the compiler accepts (``-march=native``: vectorised Philox; OpenMP)."""
    errors = []
    native, openmp = OPTIONAL_CFLAGS
    for extra in ((*native, *openmp), openmp, native, ()):
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        command = [*compiler, *CFLAGS, *extra, str(SOURCE), "-o", tmp]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            Path(tmp).unlink(missing_ok=True)
            raise KernelUnavailable(f"C compiler {compiler[0]!r} could not run: {exc}") from None
        seconds = time.perf_counter() - start
        if proc.returncode == 0:
            os.replace(tmp, target)
            return {"openmp": openmp[0] in extra, "native": native[0] in extra, "build_seconds": seconds,
                    "command": " ".join(command[:-2])}
        Path(tmp).unlink(missing_ok=True)
        errors.append((proc.stderr.strip().splitlines() or ["(no output)"])[-1])
    raise KernelUnavailable(f"building the EMC2 sweep with {compiler[0]!r} failed: {errors[-1]}")


_P, _I64, _I32, _U32, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_double
#: negbench_emc2_sweep(sims, sims_double, valid, rows, k, ld, beta, burn_in, key0, key1, step,
#: column, score, pairs, out_column, out_score, out_accepted, out_tallies, weights, records, threads)
_ARGTYPES = [_P, _I32, _P, _I64, _I64, _I64, _F64, _F64, _U32, _U32, _U32, _P, _P, _I32, _P, _P, _P, _P, _P, _P, _I32]


def _load_cpu_library() -> Any:
    global _cpu_lib, _cpu_error
    with _lock:
        if _cpu_lib is not None:
            return _cpu_lib
        if _cpu_error is not None:
            raise KernelUnavailable(_cpu_error)
        try:
            compiler = _compiler()
            source = SOURCE.read_bytes()
            tag = hashlib.sha256(b"\0".join([
                source, " ".join(compiler).encode(), " ".join(CFLAGS + sum(OPTIONAL_CFLAGS, ())).encode(),
                platform.machine().encode(), _cpu_signature(),
            ])).hexdigest()[:16]
            target = _writable_folder() / f"emc2_sweep-{tag}.so"
            info: dict[str, Any] = {"path": str(target), "compiler": " ".join(compiler), "cached": target.exists()}
            if not target.exists():
                info.update(_build(compiler, target))
            start = time.perf_counter()
            lib = ctypes.CDLL(str(target))
            info["load_seconds"] = time.perf_counter() - start
            fn = lib.negbench_emc2_sweep
            fn.restype = ctypes.c_int
            fn.argtypes = _ARGTYPES
        except KernelUnavailable as exc:
            _cpu_error = str(exc)
            raise
        except OSError as exc:  # the library could not be written or loaded
            _cpu_error = f"the EMC2 sweep library could not be built or loaded: {exc}"
            raise KernelUnavailable(_cpu_error) from None
        _cpu_info.update(info)
        _cpu_lib = fn
        return fn


def cpu_philox(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox-4x32-10 of one counter, computed by the C library (its known-answer tests)."""
    _load_cpu_library()
    lib = ctypes.CDLL(_cpu_info["path"])
    out = (ctypes.c_uint32 * 4)()
    lib.negbench_emc2_philox((ctypes.c_uint32 * 4)(*counter), (ctypes.c_uint32 * 2)(*key), out)
    return tuple(out)


def cpu_log_uniform(bits: Tensor) -> Tensor:
    """The C library's log U of 32-bit words (an int64 tensor), as float32 (tests)."""
    _load_cpu_library()
    lib = ctypes.CDLL(_cpu_info["path"])
    words = bits.to(torch.int64).bitwise_and(MASK32).to(torch.int32).contiguous()  # the same 32 bits
    out = torch.empty(words.shape, dtype=torch.float32)
    lib.negbench_emc2_log_uniform.argtypes = [_P, _P, _I64]
    lib.negbench_emc2_log_uniform(words.data_ptr(), out.data_ptr(), words.numel())
    return out


def cpu_build_info() -> dict[str, Any]:
    """How the CPU library was obtained in this process: path, compiler, whether it came from
    the cache, ``build_seconds``, ``openmp`` and ``native`` when it was built here (empty before
    first use)."""
    return dict(_cpu_info)


#: columns of the kernels' (R, 5) int64 tallies, in order
TALLIES = ("accepted_after_burn_in", "recorded", "used", "out_of_batch", "extra")


def _sweep_of(column: Tensor, score: Tensor, accepted: Tensor, tallies: Tensor, weights: Tensor,
              records: Tensor | None) -> Sweep:
    return Sweep(column, score, accepted, *tallies.unbind(1), weights, records)


def _cpu_sweep(inputs: SweepInputs, records: bool) -> Sweep:
    fn = _load_cpu_library()
    rows, k = inputs.shape
    sims, valid = inputs.sims.contiguous(), inputs.valid.contiguous()
    column, score = inputs.column.to(torch.long).contiguous(), inputs.score.contiguous()
    out_column = torch.empty(rows, dtype=torch.long)
    out_score = torch.empty(rows, dtype=torch.float32)
    out_accepted = torch.empty(rows, dtype=torch.bool)
    tallies = torch.empty(rows, len(TALLIES), dtype=torch.long)
    weights = torch.empty(sims.shape, dtype=sims.dtype)  # every entry is written by the kernel
    out_records = torch.empty(rows, k, dtype=torch.long) if records else None
    status = fn(
        sims.data_ptr(), int(sims.dtype == torch.float64), valid.data_ptr(), rows, k, sims.shape[1],
        float(inputs.beta), float(inputs.burn_in), inputs.key & MASK32, (inputs.key >> 32) & MASK32, inputs.step,
        column.data_ptr(), score.data_ptr(), int(inputs.pairs), out_column.data_ptr(), out_score.data_ptr(),
        out_accepted.data_ptr(), tallies.data_ptr(), weights.data_ptr(),
        None if out_records is None else out_records.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the EMC2 sweep could not allocate its scratch memory")
    return _sweep_of(out_column, out_score, out_accepted, tallies, weights, out_records)


# ---- CUDA: Triton ------------------------------------------------------------------------------
_triton_error: str | None = None


def _triton_module() -> Any:
    global _triton_error
    if _triton_error is not None:
        raise KernelUnavailable(_triton_error)
    try:
        from negbench.kernels import _emc2_triton
    except Exception as exc:  # ImportError, or a Triton that fails at import
        _triton_error = f"Triton is not usable ({type(exc).__name__}: {exc})"
        raise KernelUnavailable(_triton_error) from None
    return _emc2_triton


def _cuda_sweep(inputs: SweepInputs, records: bool) -> Sweep:
    global _triton_error
    module = _triton_module()
    try:
        return module.triton_sweep(inputs, records)
    except Exception as exc:  # a compile or launch failure of the JIT (unsupported GPU, no ptxas...)
        _triton_error = f"the Triton EMC2 sweep failed ({type(exc).__name__}: {exc})"
        raise KernelUnavailable(_triton_error) from exc


# ---- public --------------------------------------------------------------------------------------
def unavailable_reason(device: torch.device | str) -> str | None:
    """None when :func:`fused_sweep` can run on ``device`` (building the CPU library or importing
    Triton if needed), else a one-line reason."""
    device = torch.device(device)
    try:
        if device.type == "cpu":
            _load_cpu_library()
        elif device.type == "cuda":
            _triton_module()
        else:
            return f"no fused EMC2 sweep for device type {device.type!r}"
    except KernelUnavailable as exc:
        return str(exc)
    return None


def fused_sweep(inputs: SweepInputs, *, records: bool = False) -> Sweep:
    """One fused sweep of every row (the module docstring gives the exact contract); ``records``
    also returns the (R, K) records (tests). ``sims`` float32 or float64, everything on one
    device. Raises :class:`KernelUnavailable` when no backend runs on that device."""
    check_inputs(inputs)
    if inputs.sims.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"sims must be float32 or float64, got {inputs.sims.dtype}")
    device = inputs.sims.device
    if any(t.device != device for t in (inputs.valid, inputs.column, inputs.score)):
        raise ValueError("all inputs of fused_sweep must be on one device")
    if device.type not in ("cpu", "cuda"):
        raise KernelUnavailable(f"no fused EMC2 sweep for device type {device.type!r}")
    return (_cpu_sweep if device.type == "cpu" else _cuda_sweep)(inputs, records)
