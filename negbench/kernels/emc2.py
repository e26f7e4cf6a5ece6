"""The fused EMC² sweep (DESIGN §2.1): the whole proposal loop of one sampler step in one kernel.

Contract of :func:`fused_sweep`. Row r is one anchor's sweep of its chain. Its proposals are
the columns of ``keys[r]`` in the order of a *stable* ascending argsort (ties by column, as
``torch.argsort(stable=True)``); proposal t < ``num_proposals[r]`` is column c_t with log score
``logits[r, c_t]``, and with ℓ the chain's stored log score (start: ``score[r]``)

    accept  ⇔  log_u[r, t] < logits[r, c_t] − ℓ,      then  x ← c_t,  ℓ ← logits[r, c_t]

in float32 (log space throughout). The state after each step t ≥ ``burn_in[r]`` is recorded:
``records[r, t]`` = x's column (the start column ``column[r]``, possibly -1, until something
is accepted), other entries ``NOT_RECORDED``. With ``pairs=True``, rows 2k and 2k+1 are the two
views of one item sharing a chain: row 2k+1 starts from the score and state row 2k ended on (or
from its own ``column[2k+1]`` when row 2k accepted nothing — the same stored state can sit in a
different column for the other view).

This is exactly ``negbench.samplers.emc2.reference_sweep`` (argsort + gather + ``mh_sweep``)
for the same inputs — same states, scores, records and counts, bit for bit — and is tested
against it. The random numbers (``keys``, ``log_u``) are drawn by the caller with torch's
generator, so both paths consume the same stream.

Backends: on the CPU a small C library (``emc2_sweep.c``: a per-row counting sort of the keys,
expected O(K), then the sweep; rows in parallel with OpenMP when the compiler has it), built
with the system C compiler at first use and cached in ``$NEGBENCH_CACHE_DIR`` (default
``~/.cache/negbench``; plain C without torch headers, so building takes well under a second);
on CUDA a Triton kernel (``_emc2_triton.py``, after a ``torch.argsort``), no host
synchronisation. When a backend cannot be used :func:`unavailable_reason` says why and
:func:`fused_sweep` raises :class:`KernelUnavailable`; the sampler then falls back to the
reference.
"""

from __future__ import annotations

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
from typing import Any, NamedTuple

import torch
from torch import Tensor

NOT_RECORDED = -2
SOURCE = Path(__file__).with_name("emc2_sweep.c")
#: IEEE float semantics are part of the contract: no -ffast-math, no contraction into FMAs.
CFLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off")
BUILD_TIMEOUT_S = 120


class KernelUnavailable(RuntimeError):
    """The fused sweep cannot run here (no C compiler, no Triton, a failed build...)."""


class FusedSweep(NamedTuple):
    column: Tensor  # (R,) int64: the final state's column
    score: Tensor  # (R,) float32: the final stored log score
    accepted: Tensor  # (R,) bool: some proposal of this row was accepted
    accepted_after_burn_in: Tensor  # (R,) int64
    used: Tensor  # (R,) int64: records on an in-batch column (>= 0)
    out_of_batch: Tensor  # (R,) int64: records equal to OUT_OF_BATCH (-1)
    recorded: Tensor  # (R,) int64: records of any kind (steps burn_in <= t < num_proposals)
    records: Tensor | None  # (R, K) int64, when asked for
    counts: Tensor | None  # (R, count_columns): counts[r, x] = #records of row r equal to x >= 0


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


def _build(compiler: list[str], target: Path) -> dict[str, Any]:
    """Compile SOURCE into ``target`` (a temporary file, then an atomic rename): with OpenMP when
    the compiler supports it, else without."""
    errors = []
    for extra in (("-fopenmp",), ()):
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
            return {"openmp": bool(extra), "build_seconds": seconds, "command": " ".join(command[:-2])}
        Path(tmp).unlink(missing_ok=True)
        errors.append((proc.stderr.strip().splitlines() or ["(no output)"])[-1])
    raise KernelUnavailable(f"building the EMC2 sweep with {compiler[0]!r} failed: {errors[-1]}")


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
            tag = hashlib.sha256(
                b"\0".join([source, " ".join(compiler).encode(), " ".join(CFLAGS).encode(), platform.machine().encode()])
            ).hexdigest()[:16]
            target = _writable_folder() / f"emc2_sweep-{tag}.so"
            info: dict[str, Any] = {"path": str(target), "compiler": " ".join(compiler), "cached": target.exists()}
            if not target.exists():
                info.update(_build(compiler, target))
            start = time.perf_counter()
            lib = ctypes.CDLL(str(target))
            info["load_seconds"] = time.perf_counter() - start
            fn = lib.negbench_emc2_sweep
            fn.restype = ctypes.c_int
            fn.argtypes = (
                [ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]
                + [ctypes.c_void_p] * 9 + [ctypes.c_int64, ctypes.c_int32, ctypes.c_int32]
            )
        except KernelUnavailable as exc:
            _cpu_error = str(exc)
            raise
        except OSError as exc:  # the library could not be written or loaded
            _cpu_error = f"the EMC2 sweep library could not be built or loaded: {exc}"
            raise KernelUnavailable(_cpu_error) from None
        _cpu_info.update(info)
        _cpu_lib = fn
        return fn


def cpu_build_info() -> dict[str, Any]:
    """How the CPU library was obtained in this process: path, compiler, whether it came from
    the cache, ``build_seconds`` and ``openmp`` when it was built here (empty before first use)."""
    return dict(_cpu_info)


def _outputs(rows: int, k: int, device: torch.device, records: bool,
             count_columns: int | None, count_dtype: torch.dtype) -> FusedSweep:
    def vector(dtype: torch.dtype) -> Tensor:
        return torch.empty(rows, dtype=dtype, device=device)

    return FusedSweep(
        vector(torch.long), vector(torch.float32), vector(torch.bool), vector(torch.long), vector(torch.long),
        vector(torch.long), vector(torch.long),
        torch.empty(rows, k, dtype=torch.long, device=device) if records else None,
        None if count_columns is None else torch.zeros(rows, count_columns, dtype=count_dtype, device=device),
    )


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _cpu_sweep(inputs: list[Tensor], pairs: bool, out: FusedSweep) -> FusedSweep:
    fn = _load_cpu_library()
    rows, k = inputs[0].shape
    count_columns = 0 if out.counts is None else out.counts.shape[1]
    status = fn(
        *[t.data_ptr() for t in inputs], rows, k, int(pairs),
        *[t.data_ptr() for t in out[:7]], _pointer(out.records), _pointer(out.counts),
        count_columns, int(out.counts is not None and out.counts.dtype == torch.float64), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the EMC2 sweep could not allocate its scratch memory")
    return out


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


def _cuda_sweep(inputs: list[Tensor], pairs: bool, out: FusedSweep) -> FusedSweep:
    global _triton_error
    module = _triton_module()
    try:
        module.triton_sweep(*inputs, pairs, out)
    except Exception as exc:  # a compile or launch failure of the JIT (unsupported GPU, no ptxas...)
        _triton_error = f"the Triton EMC2 sweep failed ({type(exc).__name__}: {exc})"
        raise KernelUnavailable(_triton_error) from exc
    return out


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


def fused_sweep(
    logits: Tensor,
    keys: Tensor,
    log_u: Tensor,
    num_proposals: Tensor,
    burn_in: Tensor,
    column: Tensor,
    score: Tensor,
    *,
    pairs: bool = False,
    records: bool = True,
    count_columns: int | None = None,
    count_dtype: torch.dtype = torch.float32,
) -> FusedSweep:
    """One fused sweep of every row (see the module docstring for the exact contract).

    ``logits``, ``keys``, ``log_u``: (R, K) float32; ``num_proposals``, ``burn_in``, ``column``:
    (R,) integers; ``score``: (R,) float32; with ``pairs`` R must be even. All on one device.
    ``records=False`` skips writing the (R, K) records; ``count_columns`` (more than any
    column that can be recorded) asks for the histogram of the used records, in
    ``count_dtype`` (float32 or float64). Raises :class:`KernelUnavailable` when no backend
    runs on the inputs' device."""
    rows, k = logits.shape
    if keys.shape != (rows, k) or log_u.shape != (rows, k):
        raise ValueError(f"logits, keys and log_u must have one shape, got {tuple(logits.shape)}, "
                         f"{tuple(keys.shape)}, {tuple(log_u.shape)}")
    for name, t in (("logits", logits), ("keys", keys), ("log_u", log_u), ("score", score)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 (the reference compares in float32), got {t.dtype}")
    for name, t in (("num_proposals", num_proposals), ("burn_in", burn_in), ("column", column), ("score", score)):
        if t.shape != (rows,):
            raise ValueError(f"{name} must have shape ({rows},), got {tuple(t.shape)}")
    if pairs and rows % 2:
        raise ValueError("pairs=True needs an even number of rows (two views per item)")
    if count_columns is not None and (count_columns < k or count_dtype not in (torch.float32, torch.float64)):
        raise ValueError("count_columns must be at least K and count_dtype float32 or float64")
    device = logits.device
    inputs = [t.contiguous() for t in (logits, keys, log_u)]
    inputs += [t.to(torch.long).contiguous() for t in (num_proposals, burn_in, column)]
    inputs.append(score.contiguous())
    if any(t.device != device for t in inputs):
        raise ValueError("all inputs of fused_sweep must be on one device")
    if device.type not in ("cpu", "cuda"):
        raise KernelUnavailable(f"no fused EMC2 sweep for device type {device.type!r}")
    out = _outputs(rows, k, device, records, count_columns, count_dtype)
    return (_cpu_sweep if device.type == "cpu" else _cuda_sweep)(inputs, pairs, out)
