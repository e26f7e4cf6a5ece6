"""The run folder (docs/design.md §6): ``config.json``, ``metrics.jsonl``, ``summary.json`` and a
checkpoint, every file a reader may see written atomically (temporary file, then rename); and
reading run folders back (:class:`RunRecord`, :func:`read_run`, :func:`collect_dirs`) for
``negbench compare``: a folder that cannot be read is skipped with one warning line. All files get the mode the umask gives a new file (a temporary file is created
0600: it is widened).

Verification (issue 17). ``summary.json`` records how many metric rows the run wrote
(``rows``), the step of the last one (``last_step``) and :func:`rows_digest`, a SHA-256 of the
rows; :func:`verify_rows` compares a folder's ``metrics.jsonl`` with them, so a damaged run is
never skipped as finished nor read into a comparison. A checkpoint records the digest of the
rows it covers, so a resume never continues from rows that changed."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from negbench.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
ERROR_LOG = "error.log"
STATUSES = ("completed", "diverged", "interrupted", "failed")
#: row keys that count progress, not metrics
_NOT_METRICS = frozenset({"step", "epoch", "samples_seen"})

Warn = Callable[[str], None]


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) made one space."""
    return " ".join(str(text).split())


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
        os.fchmod(fd, _file_mode())
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


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """SHA-256 of metric rows as JSON (keys sorted, non-finite numbers as null): the same for
    the rows a run holds in memory and the rows read back from its ``metrics.jsonl``."""
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps({k: clean_number(v) for k, v in row.items()}, sort_keys=True, default=_json_default)
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def row_record(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a summary records of its rows: count, last step, digest."""
    return {"rows": len(rows), "last_step": rows[-1].get("step") if rows else None, "rows_digest": rows_digest(rows)}


def verify_rows(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str | None:
    """Why the rows read from ``metrics.jsonl`` do not match ``summary``'s record of them, or
    None when they do. Summaries written before the record existed are checked on the last
    step only."""
    last = rows[-1].get("step") if rows else None
    if "rows" not in summary:
        done = summary.get("steps_done")
        return None if last == done else f"{METRICS} ends at step {last} but {SUMMARY} reports step {done}"
    if len(rows) != summary["rows"]:
        return f"{METRICS} has {len(rows)} rows but {SUMMARY} records {summary['rows']}"
    if last != summary.get("last_step"):
        return f"{METRICS} ends at step {last} but {SUMMARY} records step {summary.get('last_step')}"
    if rows_digest(rows) != summary.get("rows_digest"):
        return f"{METRICS} does not match the rows_digest in {SUMMARY} (a row was changed)"
    return None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line :class:`UserError` if it is corrupt."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc.__class__.__name__}; delete it or the run folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; delete it or the run folder")
    return data


# ---- reading run folders back ---------------------------------------------------------

@dataclass
class RunRecord:
    """One seed of one grid cell, as read back from its run folder (or why it has none)."""

    task: str
    label: str
    batch_size: int
    seed: int | None
    status: str  # completed | diverged | interrupted | failed | unreadable | missing
    reason: str | None = None
    n_over_b: float | None = None
    final: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


def read_run(run_dir: Path, warn: Warn) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None:
    """(config, summary, rows) of a finished-or-stopped run folder, or None — after one warning
    line naming the folder — when it is unreadable or partial: config.json or summary.json
    missing or corrupt, or metrics.jsonl missing, with a bad line, or ending before the step
    the summary reports."""
    def skip(why: str) -> None:
        warn(f"skipped {run_dir}: {why}")

    for name in (CONFIG, SUMMARY, METRICS):
        if not (run_dir / name).is_file():
            extra = " (still running, or killed before it ended)" if name == SUMMARY else ""
            skip(f"no {name}{extra}")
            return None
    try:
        config = read_json(run_dir / CONFIG)
        summary = read_json(run_dir / SUMMARY)
        rows = read_rows(run_dir / METRICS, strict=True)
    except UserError as exc:
        skip(one_line(str(exc).split(";")[0]))
        return None
    for key in ("task", "sampler", "batch_size", "seed"):
        if key not in config:
            skip(f"{CONFIG} has no {key!r}")
            return None
    if not isinstance(summary.get("final"), dict) or "status" not in summary:
        skip(f"{SUMMARY} has no status or final values")
        return None
    # the rows must be the ones the summary recorded: count, last step, digest (issue 17)
    why = verify_rows(rows, summary) if "rows" in summary or summary["status"] in ("completed", "diverged") else None
    if why is not None:
        skip(why)
        return None
    return config, summary, rows


def _numbers(summary: dict[str, Any]) -> dict[str, float]:
    """The final value of every numeric metric, plus the summary's gap statistics."""
    values = {k: float(v) for k, v in summary["final"].items()
              if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in ("grad_norm_sq_avg", "grad_norm_sq_min", "grad_norm_sq_run_avg"):
        if isinstance(summary.get(key), (int, float)):
            values[key] = float(summary[key])
    return {k: v for k, v in values.items() if math.isfinite(v)}


def read_record(task: str, label: str, batch_size: int, seed: int | None, run_dir: Path, n_over_b: float | None,
            warn: Warn) -> RunRecord:
    """The record of one grid cell's run folder (``unreadable`` when :func:`read_run` skips it)."""
    read = read_run(run_dir, warn)
    if read is None:
        return RunRecord(task, label, batch_size, seed, "unreadable", f"unreadable run folder {run_dir.name}",
                         n_over_b, run_dir=run_dir)
    config, summary, rows = read
    n_over_b = config.get("items_per_batch_ratio", n_over_b)
    return RunRecord(task, label, batch_size, config.get("seed", seed), summary["status"], summary.get("reason"),
                     n_over_b, _numbers(summary), rows, config, run_dir)




def _is_run_folder(path: Path) -> bool:
    return any((path / name).exists() for name in (CONFIG, SUMMARY, METRICS, CHECKPOINT))


def expand_run_paths(paths: Sequence[str]) -> list[Path]:
    """Run folders from arguments: folders, globs (expanded here when the shell did not), or a
    folder of run folders (its subfolders). A path that matches nothing is a :class:`UserError`."""
    found: list[Path] = []
    for text in paths:
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else ([text] if Path(text).exists() else [])
        if not matches:
            raise UserError(f"no run folder matches {text!r}; pass run folders (results/runs/<run-id>) or a glob")
        for match in map(Path, matches):
            if not match.is_dir():
                raise UserError(f"{str(match)!r} is not a folder; pass run folders (results/runs/<run-id>)")
            if _is_run_folder(match):
                found.append(match)
            else:
                found += sorted(p for p in match.iterdir() if p.is_dir() and not p.name.startswith("."))
    return list(dict.fromkeys(found))


#: resolved options that, when they differ between the given runs, are appended to their label
_SETTING_KEYS = ("task_params", "steps", "optimizer", "lr", "momentum", "weight_decay", "beta", "eval_every",
                 "grad_error", "tv_steps", "tv_anchors", "device")


def sampler_label(config: dict[str, Any]) -> str:
    """``name[:key=value...]`` with the parameters that differ from the sampler's defaults (all
    of them when the sampler is not registered here)."""
    name = config["sampler"]
    params = config.get("sampler_params") or {}
    from negbench.registry import SAMPLERS

    try:
        defaults = {k: p.default for k, p in SAMPLERS.get_class(name).params.items()}
    except UserError:
        defaults = {}
    return ":".join([name, *(f"{k}={v}" for k, v in sorted(params.items()) if defaults.get(k, object()) != v)])


def collect_dirs(run_dirs: Sequence[Path], warn: Warn) -> list[RunRecord]:
    """Records of the given run folders, grouped by task, sampler label and batch size; runs
    whose other settings (steps, lr, ...) differ get those settings in their label."""
    loaded = []
    for run_dir in run_dirs:
        read = read_run(run_dir, warn)
        if read is not None:
            loaded.append((run_dir, *read))
    varying = {task: [k for k in _SETTING_KEYS
                      if len({repr(c.get(k)) for _, c, _, _ in loaded if c["task"] == task}) > 1]
               for task in {c["task"] for _, c, _, _ in loaded}}
    records = []
    for run_dir, config, summary, rows in loaded:
        label = sampler_label(config)
        if varying[config["task"]]:
            varying_keys = varying[config["task"]]
            label += " [" + ", ".join(f"{k}={config.get(k)}" for k in varying_keys) + "]"
        n_over_b = config.get("items_per_batch_ratio")
        records.append(RunRecord(config["task"], label, int(config["batch_size"]), config["seed"], summary["status"],
                                 summary.get("reason"), n_over_b, _numbers(summary), rows, config, run_dir))
    return records
