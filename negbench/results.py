"""The run folder (DESIGN §6): ``config.json``, ``metrics.jsonl``, ``summary.json`` and a
checkpoint, every file a reader may see written atomically (temporary file, then rename)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from negbench.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
STATUSES = ("completed", "diverged", "interrupted", "failed")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def clean_number(value: Any) -> Any:
    """NaN and ±inf become None, so every file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(data: Any) -> str:
    def scrub(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: scrub(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [scrub(v) for v in x]
        return clean_number(x)

    return json.dumps(scrub(data), indent=2, sort_keys=True, default=_json_default, allow_nan=False)


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(handle)`` so that a reader of ``path`` sees the old file or the new one,
    never a part: a temporary file in the same folder, fsync, then ``os.replace`` (the
    temporary file is removed if anything fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (to_json(data) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` with the guarantees of :func:`atomic_write`: a kill leaves the previous
    checkpoint or the new one."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of the resolved config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run_id(config: dict[str, Any]) -> str:
    """A readable prefix plus the config hash: ``digits-emc2-b32-s0-1a2b3c4d5e``."""
    prefix = f"{config['task']}-{config['sampler']}-b{config['batch_size']}-s{config['seed']}"
    return f"{prefix}-{config_hash(config)}"


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a line is complete or absent)."""
    line = json.dumps({k: clean_number(v) for k, v in row.items()}, default=_json_default, allow_nan=False)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_rows(path: Path, *, strict: bool = False) -> list[dict[str, Any]]:
    """The metric rows of ``metrics.jsonl``. A truncated last line (a killed writer) is
    dropped; any other unreadable line raises :class:`UserError` when ``strict``."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            rows.append(row)
        except ValueError:
            if number == len(lines) and not strict:
                break
            raise UserError(f"{path} line {number} is not valid JSON; delete the run folder to rerun it") from None
    return rows


def rewrite_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` atomically (used when resuming from a checkpoint)."""
    text = "".join(json.dumps(r, default=_json_default) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode())


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line :class:`UserError` if it is corrupt."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc.__class__.__name__}; delete it or the run folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; delete it or the run folder")
    return data
