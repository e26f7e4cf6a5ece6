"""Where an ``emc2`` sampler step's time goes (README, Performance): the bench's sampler-only
workload (frozen random unit embeddings, d = 128, one chain per item, β = 5) at one batch size,
one torch thread, with ``torch.profiler`` over ``--steps`` steps after a warm-up; also the
fused sweep alone and ``in_batch``'s step, interleaved, in process CPU time.

    python benchmarks/emc2_profile.py --batch-size 1024 --num-items 10000 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from negbench.bench import BenchConfig, _batches, _bind, _FrozenEmbeddings
from negbench.kernels import emc2 as kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--num-items", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kernel", default="auto", choices=("auto", "reference"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = BenchConfig(dim=128)
    device = torch.device("cpu")
    embed = _FrozenEmbeddings(cfg.dim, device, 0)
    batches = [b for b, _ in _batches(args.num_items, args.batch_size, 2 * args.steps + 2, embed, device, 1)]
    emc2, _ = _bind(f"emc2:kernel={args.kernel}", args.num_items, cfg, device)
    in_batch, _ = _bind("in_batch", args.num_items, cfg, device)
    captured: list[kernels.SweepInputs] = []
    original = emc2._sweep

    def timed_sweep(inputs: kernels.SweepInputs) -> kernels.Sweep:
        captured.append(inputs)
        return original(inputs)

    emc2._sweep = timed_sweep  # type: ignore[method-assign]
    times: dict[str, list[float]] = {"in_batch step": [], "emc2 step": [], "emc2 sweep alone": []}
    with torch.no_grad():
        for i, batch in enumerate(batches[: args.steps + 2]):
            for name, sampler in (("in_batch step", in_batch), ("emc2 step", emc2)):
                start = time.process_time()
                sampler.weigh(batch.anchor_emb @ batch.anchor_emb.T, batch)
                if i >= 2:
                    times[name].append(time.process_time() - start)
            start = time.process_time()
            original(captured[-1])
            if i >= 2:
                times["emc2 sweep alone"].append(time.process_time() - start)
        for name, values in times.items():
            print(f"{name:>18}: {1000 * statistics.median(values):8.2f} ms (median of {len(values)}, process CPU)")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[args.steps + 2 :]:
                with torch.profiler.record_function("sims = E E^T"):
                    sims = batch.anchor_emb @ batch.anchor_emb.T
                with torch.profiler.record_function("emc2.weigh"):
                    emc2.weigh(sims, batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
