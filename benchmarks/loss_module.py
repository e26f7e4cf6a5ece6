"""What ``negbench.ContrastiveLoss`` costs against the sampler inside it (issue 12, Speed).

    nice python benchmarks/loss_module.py --threads 1                     # B = 256, d = 128, N = 10^4
    nice python benchmarks/loss_module.py --threads 1 --num-items 1000000 --repeats 20

Four measurements, interleaved in one process — every round runs one step of each, in a
rotating order, on the same batch, so drifts of a shared machine hit them alike:

* ``loss:<s>``: ``criterion(z1, z2, index)`` forward and ``loss.backward()`` of
  ``ContrastiveLoss(<s>)`` on frozen random (B, d) leaf embeddings (default checks on);
* ``sampler:<s>``: the step ``negbench bench --part sampler`` times (``propose``, the similarity
  matrix, ``weigh``, ``refresh``; its own helpers, on the same kind of batch).

for ``<s>`` = the sampler (``emc2``) and ``in_batch``. Reported: medians of process CPU time
(and wall clock), the ratio sampler/in_batch through the module and the bench's ratio, and the
module's extra milliseconds over ``in_batch`` against the sampler's. The module passes when its
extra cost is within 10% of the sampler's own. Written to ``--out`` (JSON, atomically).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from negbench import ContrastiveLoss
from negbench.bench import BenchConfig, _batches, _bind, _FrozenEmbeddings, _rotation, _sampler_step
from negbench.bench import machine_info
from negbench.results import atomic_write_json

BASELINE = "in_batch"


def _cpu_and_wall(step: Callable[[], None]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    step()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sampler", default="emc2")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--num-items", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--beta", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("results/bench/loss-module-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    names = [BASELINE, args.sampler]
    cfg = BenchConfig(device="cpu", samplers=names, batch_sizes=[args.batch_size], num_items=[args.num_items],
                      dim=args.dim, repeats=args.repeats, warmup=args.warmup, beta=args.beta)
    embed = _FrozenEmbeddings(args.dim, device, cfg.seed)
    rounds = args.warmup + args.repeats
    batches = _batches(args.num_items, args.batch_size, rounds, embed, device, seed=1)
    samplers = {name: _bind(name, args.num_items, cfg, device)[0] for name in names}
    losses = {name: ContrastiveLoss(name, num_items=args.num_items, beta=args.beta, dim=args.dim) for name in names}

    def module_step(name: str, batch) -> Callable[[], None]:  # type: ignore[no-untyped-def]
        z = batch.anchor_emb.reshape(-1, 2, args.dim)
        z1, z2 = z[:, 0].clone().requires_grad_(), z[:, 1].clone().requires_grad_()
        index = batch.anchor_items[0::2]
        return lambda: losses[name](z1, z2, index).backward()

    def sampler_step(name: str, batch) -> Callable[[], None]:  # type: ignore[no-untyped-def]
        return lambda: _sampler_step(samplers[name], batch, embed, device)

    tasks = {f"{kind}:{name}": (make, name) for kind, make in (("loss", module_step), ("sampler", sampler_step))
             for name in names}
    times: dict[str, list[tuple[float, float]]] = {key: [] for key in tasks}
    for round_, (augmented, _) in enumerate(batches):
        for key in _rotation(list(tasks), round_):
            make, name = tasks[key]
            sample = _cpu_and_wall(make(name, augmented))
            if round_ >= args.warmup:
                times[key].append(sample)

    cpu = {key: 1000 * statistics.median(t[0] for t in samples) for key, samples in times.items()}
    wall = {key: 1000 * statistics.median(t[1] for t in samples) for key, samples in times.items()}
    s = args.sampler
    result = {
        "cpu_ms": cpu, "wall_ms": wall,
        "loss_cpu_ratio": cpu[f"loss:{s}"] / cpu[f"loss:{BASELINE}"],
        "sampler_cpu_ratio": cpu[f"sampler:{s}"] / cpu[f"sampler:{BASELINE}"],
        "loss_extra_ms": cpu[f"loss:{s}"] - cpu[f"loss:{BASELINE}"],
        "sampler_extra_ms": cpu[f"sampler:{s}"] - cpu[f"sampler:{BASELINE}"],
    }
    result["extra_ratio"] = result["loss_extra_ms"] / result["sampler_extra_ms"]
    result["within_10_percent"] = abs(result["extra_ratio"] - 1) <= 0.10
    atomic_write_json(args.out, {"result": result, "options": {k: str(v) for k, v in vars(args).items()},
                                 "machine": machine_info(device)})
    for key in tasks:
        print(f"{key:>20}  cpu {cpu[key]:8.3f} ms   wall {wall[key]:8.3f} ms")
    print(f"{s}/{BASELINE} CPU-time ratio: through ContrastiveLoss {result['loss_cpu_ratio']:.2f}x, "
          f"sampler only (negbench bench --part sampler) {result['sampler_cpu_ratio']:.2f}x")
    print(f"extra over {BASELINE}: ContrastiveLoss {result['loss_extra_ms']:.3f} ms, sampler {result['sampler_extra_ms']:.3f} ms "
          f"(ratio {result['extra_ratio']:.3f}; within 10%: {result['within_10_percent']})")


if __name__ == "__main__":
    main()
