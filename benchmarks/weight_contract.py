"""What the weight contract (negbench.contract, issue 17) costs a training step: the default run
(``negbench run``: emc2 on digits, B = 32) stepped with the check and without it.

    python benchmarks/weight_contract.py --rounds 20 --steps 5
    python benchmarks/weight_contract.py --device cuda --batch-size 1024    # the deferred GPU path

One trainer of that configuration takes every step, with the check on some steps and a no-op
in its place on the others, in the order on, off, off, on (so load changes on a shared machine
and the trainer's own drift hit both alike). Reported: the median process CPU time (and wall
time) per step of each and their ratio, and the median time of the check alone on that run's W.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from negbench.config import RunConfig
from negbench.contract import verdict
from negbench.runner import Trainer, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sampler", default="emc2")
    parser.add_argument("--task", default="digits")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="on/off/off/on groups per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(sampler=args.sampler, task=args.task, batch_size=args.batch_size, steps=10**6, seed=0,
                           out=Path(tmp), device=args.device)
        trainer = Trainer(prepare(config), Console(stderr=True), show_progress=False)
        real_check = trainer.contract.check
        captured: list[tuple] = []

        def spy(weights, batch, step, sims=None):  # type: ignore[no-untyped-def]
            captured[:] = [(weights, batch, sims)]
            real_check(weights, batch, step, sims)

        checks = {"on": spy, "off": lambda *a, **k: None}
        for _ in range(3):  # warm-up
            trainer.train_step()
        cpu: dict[str, list[float]] = {m: [] for m in checks}
        wall: dict[str, list[float]] = {m: [] for m in checks}
        for _ in range(args.rounds * args.steps):
            for mode in ("on", "off", "off", "on"):
                trainer.contract.check = checks[mode]  # type: ignore[method-assign]
                start, start_cpu = time.perf_counter(), time.process_time()
                trainer.train_step()
                trainer.contract.flush()
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                wall[mode].append(time.perf_counter() - start)
                cpu[mode].append(time.process_time() - start_cpu)
        weights, batch, sims = captured[0]
        sampler = trainer.sampler
        alone = []
        for _ in range(200):
            start = time.perf_counter()
            verdict(weights, batch, sampler, sims).tolist()
            alone.append(time.perf_counter() - start)
        on, off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
        print(f"{args.sampler} on {args.task}, B={args.batch_size} (W: {tuple(weights.shape)}), device {args.device}, "
              f"{torch.get_num_threads()} threads, {4 * args.rounds * args.steps} steps, median per step:")
        print(f"  with the check    process CPU {1000 * on:7.2f} ms  wall {1000 * statistics.median(wall['on']):7.2f} ms")
        print(f"  without           process CPU {1000 * off:7.2f} ms  wall {1000 * statistics.median(wall['off']):7.2f} ms")
        print(f"  ratio (CPU time)  x{on / off:.3f}")
        print(f"  the check alone   {1e6 * statistics.median(alone):7.1f} us per step "
              f"({100 * statistics.median(alone) / off:.2f}% of a step without it)")


if __name__ == "__main__":
    main()
