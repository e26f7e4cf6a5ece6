"""``negbench bench``: what each sampler costs (DESIGN §4 and §6).

Part ``sampler``: the cost of one step inside the sampler, counted exactly as a run's
``sampler_ms`` — ``propose`` + the similarity matrix ``sims = E_anchor E_candidate^T`` +
``weigh`` + ``refresh`` — at frozen random unit embeddings (no encoder; the extras a sampler asks
for are looked up in a fixed table of random embeddings, and that look-up, the stand-in for the
encoder, is not counted). For every sampler at each batch size B (A = 2B anchors) and data-set
size N, with d = 128 by default, and the sampler's exact state bytes. Samplers run in the
random-augmentation setting (one chain per item for ``emc2``) unless they need a finite view
set (then m = 2 views; the ``views`` column says which). A sampler whose candidate matrix would
exceed ``MAX_SIMS`` entries (``full_softmax`` asks for all N·m views) is reported as n/a.

Part ``step``: the time of one whole training step (``Trainer.train_step``: data, encoder
forward and backward, sampler, optimiser) for each sampler and for ``in_batch`` measured in the
same process, on the MLP of ``digits`` and on torchvision's ResNet-18 (random initialisation,
standard stem, a linear head to 128-d) at 32 and 96 px on random image tensors.

In both parts the samplers are interleaved — every repetition runs one step of each sampler,
in a rotating order, on the same batch — so drifts of the machine hit all of them alike; the
first ``warmup`` repetitions are left out, CUDA is synchronised around every timed region, and
the reported figure is the median. ``ratio`` is the median divided by ``in_batch``'s median.
Results: a rich table, ``<out>/bench-<device>.csv`` and ``<out>/bench-<device>.json`` (the
machine, versions and options), written atomically.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor

from negbench.config import RunConfig, check_writable, derive_seed, resolve_device
from negbench.distribution import draw_views
from negbench.errors import UserError, suggest
from negbench.grid import SamplerSpec, parse_sampler_spec
from negbench.registry import SAMPLERS, TASKS
from negbench.results import atomic_write_bytes, atomic_write_json
from negbench.sampler import Batch, Sampler, SamplerContext, join_candidates
from negbench.task import Task
from negbench.training import Trainer

BASELINE = "in_batch"
#: variants measured besides every registered sampler when ``--samplers`` is not given: EMC²'s
#: tensor-code fallback sweep next to its fused kernel
EXTRA_VARIANTS = {"emc2": ("emc2:kernel=reference",)}
#: the largest candidate matrix (A × C entries) the sampler part builds: 2^26 (256 MiB in float32)
MAX_SIMS = 2**26
#: distinct frozen embeddings; view v of item i is row (i·2 + v) mod this
EMBEDDING_TABLE = 2**16
COLUMNS = ["part", "workload", "input", "sampler", "device", "num_items", "batch_size", "dim", "views", "repeats",
           "median_ms", "in_batch_ms", "ratio", "cpu_ms", "cpu_ratio", "state_bytes", "state_bytes_per_item", "backend", "note"]
PARTS = ("all", "sampler", "step")


# ---- workloads of the end-to-end part -------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    make_task: Callable[[bool], Task]  # smoke -> an unloaded task
    input: Callable[[bool], str]  # smoke -> what one encoder input is


def _digits(smoke: bool) -> Task:
    return TASKS.create("digits", **({"max_items": 64, "hidden": 16, "dim": 8} if smoke else {}))


def _images(size: int) -> Workload:
    def pixels(smoke: bool) -> int:
        return SMOKE_IMAGE_SIZE if smoke else size

    return Workload(f"resnet18-{size}px", lambda smoke: TASKS.create("random_images", size=pixels(smoke), num_items=10_000),
                    lambda smoke: f"3x{pixels(smoke)}x{pixels(smoke)} random")


SMOKE_IMAGE_SIZE = 16
WORKLOADS = {
    "digits-mlp": Workload("digits-mlp", _digits, lambda smoke: "8x8 digits"),
    "resnet18-32px": _images(32),
    "resnet18-96px": _images(96),
}


# ---- configuration ----------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    device: str = "auto"
    samplers: list[str] | None = None  # None: every registered sampler
    batch_sizes: list[int] = field(default_factory=lambda: [32, 256, 1024])
    num_items: list[int] = field(default_factory=lambda: [10_000, 1_000_000])
    dim: int = 128
    repeats: int = 10
    warmup: int = 3
    part: str = "all"
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    step_batch_size: int = 256
    threads: int | None = None  # torch CPU threads (None: torch's default)
    beta: float = 5.0
    seed: int = 0
    smoke: bool = False
    out: Path = Path("results/bench")


#: what ``--smoke`` replaces: a configuration that runs in seconds (tests)
SMOKE = {"batch_sizes": [4], "num_items": [64], "dim": 16, "repeats": 2, "warmup": 1, "step_batch_size": 2}


def parse_int_list(text: str, option: str) -> list[int]:
    """``"32,256"`` → ``[32, 256]``; anything else is a :class:`UserError`."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} expects comma-separated positive integers, got {text!r}; e.g. {option} 32,256") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} expects comma-separated positive integers, got {text!r}; e.g. {option} 32,256")
    return values


def resolve(config: BenchConfig) -> tuple[BenchConfig, torch.device, list[str]]:
    """Validate every option (a :class:`UserError` on bad input) and return the effective
    configuration, the device, and the canonical sampler names (``in_batch`` first)."""
    if config.smoke:
        config = replace(config, **SMOKE)
    device = resolve_device(config.device)
    entries = config.samplers or [v for n in SAMPLERS.names() for v in (n, *EXTRA_VARIANTS.get(n, ()))]
    names = list(dict.fromkeys([BASELINE, *(parse_sampler_spec(n).label for n in entries)]))
    if config.part not in PARTS:
        raise UserError(f"--part must be one of {', '.join(PARTS)}, got {config.part!r}")
    unknown = [w for w in config.workloads if w not in WORKLOADS]
    if unknown:
        raise UserError(f"unknown workload {unknown[0]!r}{suggest(unknown[0], WORKLOADS)}; choose from {', '.join(WORKLOADS)}")
    for option, value in (("--repeats", config.repeats), ("--step-batch-size", config.step_batch_size), ("--dim", config.dim),
                          ("--threads", 1 if config.threads is None else config.threads)):
        if value < 1:
            raise UserError(f"{option} must be a positive integer, got {value}")
    if config.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {config.warmup}")
    too_big = [(b, n) for b in config.batch_sizes for n in config.num_items if 2 * b > n]
    if too_big and config.part in ("all", "sampler"):
        b, n = too_big[0]
        raise UserError(f"--batch-sizes {b} needs at least {2 * b} items but --num-items has {n}; use larger --num-items")
    if config.part in ("all", "step"):
        for name in config.workloads:
            task = WORKLOADS[name].make_task(config.smoke)
            task.load(seed=derive_seed(config.seed, "data"))
            _check_step_batch_size(config.step_batch_size, name, task)
    check_writable(config.out)
    return config, device, names


def _check_step_batch_size(batch_size: int, workload: str, task: Task) -> None:
    if batch_size > task.num_items:
        raise UserError(f"--step-batch-size {batch_size} is larger than {workload}'s {task.num_items} items; "
                        f"use at most {task.num_items}")


# ---- timing -------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _NotApplicable(Exception):
    """This sampler cannot be measured in this configuration (the message says why)."""


def _rotation(names: list[str], round_: int) -> list[str]:
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


class _Stopwatch:
    """Wall-clock and process CPU seconds summed over timed regions (CUDA synchronised at
    both ends of each)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.wall, self.cpu = device, 0.0, 0.0

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        _sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            _sync(self.device)
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu


def _timing(samples: list[_Stopwatch], baseline: list[_Stopwatch]) -> dict[str, float | None]:
    """Medians in ms and their ratios to the baseline's (wall clock, and process CPU time)."""
    def median_ms(watches: list[_Stopwatch], attribute: str) -> float | None:
        return 1000 * statistics.median(getattr(w, attribute) for w in watches) if watches else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    wall, base_wall = median_ms(samples, "wall"), median_ms(baseline, "wall")
    cpu, base_cpu = median_ms(samples, "cpu"), median_ms(baseline, "cpu")
    return {"median_ms": wall, "in_batch_ms": base_wall, "ratio": ratio(wall, base_wall),
            "cpu_ms": cpu, "cpu_ratio": ratio(cpu, base_cpu)}


# ---- part 1: sampler-only cost ----------------------------------------------------------------------------
class _FrozenEmbeddings:
    """Fixed random unit vectors: view v of item i is row (2i + v) mod ``EMBEDDING_TABLE``."""

    def __init__(self, dim: int, device: torch.device, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.table = F.normalize(torch.randn(EMBEDDING_TABLE, dim, generator=gen), dim=1).to(device)

    def __call__(self, items: Tensor, views: Tensor) -> Tensor:
        return self.table[(2 * items + views.clamp_min(0)) % EMBEDDING_TABLE]


def _spec(label: str) -> SamplerSpec:
    """A ``name[:key=value...]`` label parsed as ``negbench compare`` parses its samplers."""
    return parse_sampler_spec(label)


def _create(label: str) -> Sampler:
    """The sampler of a ``name[:key=value...]`` label."""
    spec = _spec(label)
    return SAMPLERS.create(spec.name, **dict(spec.params))


def _bind(name: str, num_items: int, cfg: BenchConfig, device: torch.device) -> tuple[Sampler, int | None]:
    sampler = _create(name)
    views = 2 if sampler.requires_finite_views else None
    seed_name = name.split(":", 1)[0]  # a variant draws the same random numbers as its sampler
    generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, f"bench-{seed_name}"))
    sampler = sampler.bind(SamplerContext(num_items, views, cfg.beta, cfg.dim, device, generator))
    return sampler, views


def _sampler_step(sampler: Sampler, batch: Batch, embed: _FrozenEmbeddings, device: torch.device) -> _Stopwatch:
    """One sampler step, timed over what the runner counts as sampler time."""
    watch = _Stopwatch(device)
    with watch.region():
        extras = sampler.propose(batch)
    candidate_emb = batch.anchor_emb
    if extras is not None and extras.items.numel():
        size = batch.num_anchors * (batch.num_anchors + extras.items.numel())
        if size > MAX_SIMS:
            raise _NotApplicable(f"n/a: A·C = {size:.2g} > {MAX_SIMS:.2g}")
    batch, candidate_emb = join_candidates(batch, candidate_emb, extras, embed, lambda views: views)
    with watch.region(), torch.no_grad():
        sims = batch.anchor_emb @ candidate_emb.T
        sampler.weigh(sims, batch)
    with watch.region(), torch.no_grad():
        sampler.refresh(embed)
    return watch


def _batches(num_items: int, batch_size: int, count: int, embed: _FrozenEmbeddings, device: torch.device,
             seed: int) -> list[tuple[Batch, Batch]]:
    """``count`` batches of distinct items (consecutive slices of one permutation), each in
    the random-augmentation form (views 0, 1) and in the m = 2 finite-view form."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_items, generator=gen)
    out = []
    for k in range(count):
        start = (k * batch_size) % (num_items - batch_size + 1)
        items = order[start : start + batch_size].repeat_interleave(2).to(device)
        forms = []
        for views in (torch.tensor([0, 1]).repeat(batch_size), draw_views(batch_size, 2, gen).reshape(-1)):
            views = views.to(device)
            forms.append(Batch.from_anchors(items, views, embed(items, views)))
        out.append((forms[0], forms[1]))
    return out


def sampler_cost(cfg: BenchConfig, device: torch.device, names: list[str], advance: Callable[[], None]) -> list[dict[str, Any]]:
    """Part 1: one row per (sampler, N, B)."""
    rows = []
    embed = _FrozenEmbeddings(cfg.dim, device, cfg.seed)
    for num_items in cfg.num_items:
        for batch_size in cfg.batch_sizes:
            samplers: dict[str, tuple[Sampler, int | None]] = {}
            notes: dict[str, str] = {}
            for name in names:
                try:
                    samplers[name] = _bind(name, num_items, cfg, device)
                except (UserError, ValueError, RuntimeError) as exc:  # e.g. out of memory for the state
                    notes[name] = f"n/a: {exc}"
            batches = _batches(num_items, batch_size, cfg.warmup + cfg.repeats, embed, device,
                               derive_seed(cfg.seed, f"batches-{num_items}-{batch_size}"))
            times: dict[str, list[_Stopwatch]] = {name: [] for name in names}
            active = list(samplers)
            for round_, (augmented, finite) in enumerate(batches):
                for name in _rotation(active, round_):
                    sampler, views = samplers[name]
                    try:
                        watch = _sampler_step(sampler, finite if views else augmented, embed, device)
                    except _NotApplicable as exc:
                        notes[name] = str(exc)
                        active.remove(name)
                        continue
                    if round_ >= cfg.warmup:
                        times[name].append(watch)
                advance()
            for name in names:
                bound = samplers.get(name)
                state = bound[0].state_bytes() if bound else None
                rows.append({
                    "part": "sampler", "workload": "frozen-embeddings", "input": f"{cfg.dim}-d embeddings", "sampler": name, "device": device.type,
                    "num_items": num_items, "batch_size": batch_size, "dim": cfg.dim,
                    "views": (str(bound[1]) if bound[1] else "random") if bound else None,
                    "repeats": len(times[name]), **_timing(times[name], times[BASELINE]),
                    "state_bytes": state, "state_bytes_per_item": None if state is None else state / num_items,
                    "backend": getattr(bound[0], "sweep_backend", None) if bound else None,
                    "note": notes.get(name, ""),
                })
            del samplers, batches
    return rows


# ---- part 2: end-to-end step time --------------------------------------------------------------------
def _trainer(task: Task, name: str, cfg: BenchConfig, device: torch.device) -> Trainer:
    """A run's trainer of sampler ``name`` (a ``name[:key=value...]`` label) on the loaded
    ``task`` (Adam at its default lr)."""
    spec = _spec(name)
    config = RunConfig(sampler=spec.name, sampler_params=dict(spec.params), task=task.name,
                       batch_size=cfg.step_batch_size, steps=cfg.warmup + cfg.repeats,
                       seed=cfg.seed, device=device.type, beta=cfg.beta, tv_steps=0)
    return Trainer.build(config, task)


def step_time(cfg: BenchConfig, device: torch.device, names: list[str], advance: Callable[[], None],
              console: Console) -> list[dict[str, Any]]:
    """Part 2: one row per (workload, sampler)."""
    rows = []
    for workload_name in cfg.workloads:
        task = WORKLOADS[workload_name].make_task(cfg.smoke)
        task.load(seed=derive_seed(cfg.seed, "data"))
        batch_size = cfg.step_batch_size
        notes: dict[str, str] = {}
        _check_step_batch_size(batch_size, workload_name, task)
        trainers = {}
        for name in names:
            if SAMPLERS.get_class(name.split(":", 1)[0]).requires_finite_views and not task.finite_views:
                notes[name] = "n/a: needs finite views"
                continue
            trainers[name] = _trainer(task, name, cfg, device)
        times: dict[str, list[_Stopwatch]] = {name: [] for name in names}
        for round_ in range(cfg.warmup + cfg.repeats):
            for name in _rotation(list(trainers), round_):
                watch = _Stopwatch(device)
                with watch.region():
                    trainers[name].train_step()
                if round_ >= cfg.warmup:
                    times[name].append(watch)
            advance()
        for name in names:
            trainer = trainers.get(name)
            state = trainer.sampler.state_bytes() if trainer else None
            rows.append({
                "part": "step", "workload": workload_name, "input": WORKLOADS[workload_name].input(cfg.smoke), "sampler": name, "device": device.type,
                "num_items": task.num_items, "batch_size": batch_size,
                "dim": trainer.model.dim if trainer else None,
                "views": str(task.num_views or "random") if trainer else None,
                "repeats": len(times[name]), **_timing(times[name], times[BASELINE]),
                "state_bytes": state, "state_bytes_per_item": None if state is None else state / task.num_items,
                "backend": getattr(trainer.sampler, "sweep_backend", None) if trainer else None,
                "note": notes.get(name, ""),
            })
        del trainers
    return rows


# ---- machine, output -----------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, core counts, GPU name, and the versions of everything that matters."""
    from negbench.kernels import emc2 as emc2_kernels
    from negbench.resolution import provenance

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
        "versions": provenance(device),
        "emc2_cpu_kernel": emc2_kernels.cpu_build_info(),
    }
    with contextlib.suppress(ImportError):
        import triton

        info["versions"]["triton"] = triton.__version__
    return info


def _format(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def tables(rows: list[dict[str, Any]], device: torch.device) -> list[Table]:
    """The rich tables of both parts (``ms`` wall clock, ``cpu ms`` process CPU time)."""
    out = []
    sampler_rows = [r for r in rows if r["part"] == "sampler"]
    if sampler_rows:
        table = Table(title=f"sampler-only cost per step ({device.type}, d={sampler_rows[0]['dim']}, frozen embeddings; medians)")
        for column in ("sampler", "N", "B", "ms", "× in_batch", "cpu ms", "cpu ×", "state bytes", "B/item", "note"):
            table.add_column(column, justify="left" if column in ("sampler", "note") else "right")
        for r in sampler_rows:
            table.add_row(_label(r), f"{r['num_items']:,}", str(r["batch_size"]), _format(r["median_ms"]),
                          _format(r["ratio"], ".2f"), _format(r["cpu_ms"]), _format(r["cpu_ratio"], ".2f"),
                          _format(r["state_bytes"], ","), _format(r["state_bytes_per_item"], ".4g"), r["note"])
        out.append(table)
    step_rows = [r for r in rows if r["part"] == "step"]
    if step_rows:
        table = Table(title=f"training step time against in_batch ({device.type}, interleaved; medians)")
        for column in ("workload", "sampler", "B", "ms", "in_batch ms", "ratio", "cpu ms", "cpu ratio", "note"):
            table.add_column(column, justify="left" if column in ("workload", "sampler", "note") else "right")
        for r in step_rows:
            table.add_row(r["workload"], _label(r), str(r["batch_size"]), _format(r["median_ms"]), _format(r["in_batch_ms"]),
                          _format(r["ratio"], ".3f"), _format(r["cpu_ms"]), _format(r["cpu_ratio"], ".3f"), r["note"])
        out.append(table)
    return out


def _label(row: dict[str, Any]) -> str:
    return escape(row["sampler"] + (f" [{row['backend']}]" if row["backend"] else ""))


@dataclass
class BenchOutcome:
    rows: list[dict[str, Any]]
    csv_path: Path
    json_path: Path
    tables: list[Table]


def run_bench(config: BenchConfig, *, console: Console | None = None, show_progress: bool = True) -> BenchOutcome:
    """Run both parts (or one, ``part``) and write ``bench-<device>.csv`` and ``.json``."""
    console = console or Console(stderr=True)
    cfg, device, names = resolve(config)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, device, names, console, show_progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: BenchConfig, device: torch.device, names: list[str], console: Console, show_progress: bool) -> BenchOutcome:
    rounds = cfg.warmup + cfg.repeats
    total = 0
    if cfg.part in ("all", "sampler"):
        total += len(cfg.num_items) * len(cfg.batch_sizes) * rounds
    if cfg.part in ("all", "step"):
        total += len(cfg.workloads) * rounds
    progress = Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not show_progress)
    rows: list[dict[str, Any]] = []
    with progress:
        bar = progress.add_task("bench", total=total)

        def advance() -> None:
            progress.update(bar, advance=1)

        if cfg.part in ("all", "sampler"):
            rows += sampler_cost(cfg, device, names, advance)
        if cfg.part in ("all", "step"):
            rows += step_time(cfg, device, names, advance, console)
    csv_path = cfg.out / f"bench-{device.type}.csv"
    json_path = cfg.out / f"bench-{device.type}.json"
    buffer = io.StringIO()
    pd.DataFrame(rows, columns=COLUMNS).to_csv(buffer, index=False, float_format="%.6g")
    atomic_write_bytes(csv_path, buffer.getvalue().encode())
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    atomic_write_json(json_path, {"machine": machine_info(device), "options": options, "samplers": names,
                                  "max_sims": MAX_SIMS, "columns": COLUMNS})
    return BenchOutcome(rows, csv_path, json_path, tables(rows, device))
