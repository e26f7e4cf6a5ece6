"""CPU (or CUDA) cost of one training step of ResNet-18 at 96 px on ``stl10``, per sampler, and of
the augmentation pipeline per image.

    python benchmarks/image_step.py --threads 2 --batch-size 32 --rounds 3 --steps 3
    python benchmarks/image_step.py --device cuda --rounds 5 --steps 20    # bf16 autocast, peak memory

The samplers run in one process, interleaved round by round (so load changes on a shared
machine hit them alike). ``step`` times the whole ``Trainer.train_step`` with the views
augmented in-process (no workers); ``model`` replays a fixed augmented batch, so it times the
encoder, sampler, loss, backward and optimiser only. The data are random bytes in STL-10's
binary layout (timing does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from negbench.config import RunConfig
from negbench.images import simclr_augmentation
from negbench.runner import Trainer, prepare
from negbench.tasks.stl10 import IMAGE_BYTES, to_pil


def fake_stl10(root: Path, unlabeled: int) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (("unlabeled_X.bin", unlabeled), ("train_X.bin", 20), ("test_X.bin", 20)):
        (folder / name).write_bytes(rng.integers(0, 256, count * IMAGE_BYTES, dtype=np.uint8).tobytes())
    for name in ("train_y.bin", "test_y.bin"):
        (folder / name).write_bytes((np.arange(20) % 10 + 1).astype(np.uint8).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per sampler per round")
    parser.add_argument("--samplers", default="in_batch,emc2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--norm", default="none")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samplers = args.samplers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake_stl10(root / "data", unlabeled=max(512, 4 * args.batch_size))
        images = 2 * args.batch_size
        trainers: dict[tuple[str, str], Trainer] = {}
        fixed = None
        for name in samplers:
            for mode in ("step", "model"):
                config = RunConfig(
                    sampler=name, task="stl10", data_root=root / "data", batch_size=args.batch_size, steps=10**6,
                    seed=0, out=root / "runs", device=args.device, task_params={"workers": 0, "norm": args.norm},
                )
                trainer = Trainer.from_prepared(prepare(config))
                trainer.start_step = -10  # record the sampler time of every step
                if mode == "model":  # a fixed augmented batch instead of fresh views
                    if fixed is None:
                        fixed = trainer.task.inputs(torch.zeros(images, dtype=torch.long), torch.full((images,), -1),
                                                    torch.Generator().manual_seed(0)).to(trainer.device)
                    trainer.anchor_inputs = lambda items, anchor_items, views: fixed  # type: ignore[method-assign]
                for _ in range(2):  # warm-up
                    trainer.train_step()
                trainers[(name, mode)] = trainer

        times: dict[tuple[str, str], list[float]] = {key: [] for key in trainers}
        cpu: dict[tuple[str, str], list[float]] = {key: [] for key in trainers}
        sampler: dict[tuple[str, str], list[float]] = {key: [] for key in trainers}
        for _ in range(args.rounds):
            for key, trainer in trainers.items():
                for _ in range(args.steps):
                    trainer.window.sampler_seconds.clear()
                    start, start_cpu = time.perf_counter(), time.process_time()
                    trainer.train_step()
                    if trainer.device.type == "cuda":
                        torch.cuda.synchronize()
                    times[key].append(time.perf_counter() - start)
                    cpu[key].append(time.process_time() - start_cpu)
                    sampler[key] += trainer.window.sampler_seconds
        print(f"ResNet-18 (norm={args.norm}) at 96 px, batch {args.batch_size} ({images} images/step), "
              f"{args.threads} threads, device {args.device}, {args.rounds} rounds x {args.steps} steps, median:")
        base = {m: statistics.median(times[(samplers[0], m)]) for m in ("step", "model")}
        base_cpu = {m: statistics.median(cpu[(samplers[0], m)]) for m in ("step", "model")}
        for name in samplers:
            for mode in ("step", "model"):
                median = statistics.median(times[(name, mode)])
                median_cpu = statistics.median(cpu[(name, mode)])
                inside = statistics.median(sampler[(name, mode)]) if sampler[(name, mode)] else float("nan")
                print(f"  {name:10s} {mode:5s}  wall {1000 * median:8.1f} ms/step = {images / median:6.1f} images/s "
                      f"(x{median / base[mode]:.3f} of {samplers[0]}); process CPU {1000 * median_cpu:8.1f} ms/step "
                      f"(x{median_cpu / base_cpu[mode]:.3f}); inside the sampler {1000 * inside:.2f} ms")

        if args.device == "cuda":
            print(f"peak CUDA memory (all trainers): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        augmentation = simclr_augmentation(96)
        data = trainers[(samplers[0], "step")].task._unlabeled
        count = 200
        start = time.perf_counter()
        for i in range(count):
            torch.manual_seed(i)
            augmentation(to_pil(data[i % len(data)]))
        per_image = (time.perf_counter() - start) / count
        print(f"augmentation pipeline (96 px, one process): {1000 * per_image:.2f} ms/image")


if __name__ == "__main__":
    main()
