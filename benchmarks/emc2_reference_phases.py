"""Where ``emc2:kernel=reference`` spends a sampler step (README, Performance): the bench's
sampler-only workload (frozen random unit embeddings, d = 128, β = 5, random augmentations, so
one chain per item and two rows per chain) at one batch size, one torch thread. Each phase of
:func:`negbench.samplers.emc2.reference_sweep` is timed in process CPU time and counted in minor
page faults (pages of fresh temporaries touched for the first time), median over ``--steps``
steps after a warm-up, with ``in_batch``'s step interleaved as the baseline.

``--free-first MiB`` allocates, touches and frees one tensor of that size before timing: glibc
then serves allocations up to that size from its heap and stops returning the pages (its
dynamic mmap threshold; it only rises for sizes under 32 MiB, so 32 itself has no effect),
which isolates the compute from the faults.

    python benchmarks/emc2_reference_phases.py --batch-size 256
    python benchmarks/emc2_reference_phases.py --batch-size 256 --free-first 16
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import negbench.samplers.emc2 as emc2_module
from negbench.bench import BenchConfig, _batches, _bind, _FrozenEmbeddings, _sampler_step
from negbench.kernels import emc2 as kernels

#: (module, function) of each phase timed; they nest (the loop inside _walk, inside mh_sweep_pairs,
#: everything inside reference_sweep)
PHASES = ((kernels, "random_streams"), (emc2_module, "proposal_order"), (emc2_module, "_recurse_numpy"),
          (emc2_module, "_walk"), (emc2_module, "mh_sweep_pairs"), (emc2_module, "tally"),
          (emc2_module, "reference_sweep"))


def _counters() -> tuple[float, int]:
    return time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _instrument(samples: dict[str, list[tuple[float, int]]]) -> None:
    """Wrap each phase so that every call appends (CPU ms, minor faults) to ``samples``."""
    for module, name in PHASES:
        original = getattr(module, name)

        def timed(*args: Any, _original: Callable = original, _name: str = name, **kwargs: Any) -> Any:
            cpu, faults = _counters()
            try:
                return _original(*args, **kwargs)
            finally:
                cpu_end, faults_end = _counters()
                samples[_name].append((1000 * (cpu_end - cpu), faults_end - faults))

        setattr(module, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-items", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--free-first", type=int, default=0, metavar="MiB")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg, device = BenchConfig(dim=128), torch.device("cpu")
    embed = _FrozenEmbeddings(cfg.dim, device, 0)
    batches = [b for b, _ in _batches(args.num_items, args.batch_size, args.warmup + args.steps, embed, device, 1)]
    reference, _ = _bind("emc2:kernel=reference", args.num_items, cfg, device)
    in_batch, _ = _bind("in_batch", args.num_items, cfg, device)
    if args.free_first:
        block = torch.ones(args.free_first * 2**20, dtype=torch.uint8)
        del block
    samples: dict[str, list[tuple[float, int]]] = {name: [] for _, name in PHASES}
    steps: dict[str, list[tuple[float, int]]] = {"in_batch step": [], "reference step": []}
    _instrument(samples)
    for i, batch in enumerate(batches):
        for label, sampler in (("in_batch step", in_batch), ("reference step", reference)):
            cpu, faults = _counters()
            _sampler_step(sampler, batch, embed, device)
            cpu_end, faults_end = _counters()
            if i >= args.warmup:
                steps[label].append((1000 * (cpu_end - cpu), faults_end - faults))
        if i < args.warmup:
            for values in samples.values():
                values.clear()
    base = statistics.median(ms for ms, _ in steps["in_batch step"])
    print(f"B = {args.batch_size}, N = {args.num_items}, {args.steps} steps, free-first {args.free_first} MiB; "
          "medians, process CPU")
    print(f"{'':>16} {'ms':>7} {'× in_batch':>10} {'page faults':>11}")
    for name, values in {**steps, **samples}.items():
        ms = statistics.median(v for v, _ in values)
        faults = statistics.median(f for _, f in values)
        print(f"{name:>16} {ms:7.2f} {ms / base:10.2f} {faults:11.0f}")


if __name__ == "__main__":
    main()
