"""What one cell of ``negbench rate`` costs, and what ``--grad-split R`` adds (issue 11).

Runs one cell (a run of T SGD steps with E evaluations, from the cached warm start) per
sampler, with and without ``--grad-split R``, interleaved (plain, split, plain, split, ... in
one process, a fresh run folder each time), and reports the median process CPU time of each
and their ratio. The warm start is computed (and cached) before the timing starts, so it is
not counted; what is, is the whole run: steps, evaluations, the probes, the files.

    python benchmarks/rate_cell.py                       # digits' first 500 items, B = 4, T = 400
    python benchmarks/rate_cell.py --samplers in_batch --horizon 1600 --repeats 3

Process CPU time (``time.process_time``) is used because the machine may be shared: it
counts this process's work only, where the wall clock also counts the waits.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

import negbench
from negbench.config import RunConfig
from negbench.grid import parse_sampler_spec
from negbench.rate import DEFAULT_SAMPLERS, Schedule


def cell(sampler: str, out: Path, args: argparse.Namespace, grad_split: int) -> RunConfig:
    spec = parse_sampler_spec(sampler)
    schedule = Schedule(args.lr_scale, "sqrt", args.evals)
    return RunConfig(sampler=spec.name, sampler_params=dict(spec.params), task="digits",
                     task_params={"max_items": str(args.max_items)}, batch_size=args.batch_size, steps=args.horizon,
                     optimizer="sgd", lr=schedule.lr(args.horizon), eval_every=schedule.eval_every(args.horizon),
                     seed=0, out=out, tv_steps=0, init="stationary", grad_split=grad_split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS)
    parser.add_argument("--max-items", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--horizon", type=int, default=400)
    parser.add_argument("--evals", type=int, default=16)
    parser.add_argument("--lr-scale", type=float, default=10.0)
    parser.add_argument("--grad-split", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("results/runs"), help="where the warm start cache lives")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet = Console(quiet=True)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "0" / ".init"
        cache.parent.mkdir(parents=True)
        (args.cache / ".init").mkdir(parents=True, exist_ok=True)
        cache.symlink_to((args.cache / ".init").resolve())
        negbench.run(cell(samplers[0], root / "0", args, 0), show_progress=False, console=quiet)  # warm start
        times: dict[tuple[str, int], list[float]] = {}
        for repeat in range(args.repeats):
            for sampler in samplers:
                for split in (0, args.grad_split):
                    out = root / f"{repeat}-{sampler}-{split}"
                    out.mkdir()
                    (out / ".init").symlink_to(cache.resolve())
                    start = time.process_time()
                    negbench.run(cell(sampler, out, args, split), show_progress=False, console=quiet)
                    times.setdefault((sampler, split), []).append(time.process_time() - start)
    print(f"digits first {args.max_items} items, B = {args.batch_size}, T = {args.horizon}, {args.evals} evaluations, "
          f"{args.threads} thread(s); median process CPU seconds over {args.repeats} interleaved repeats")
    print(f"{'sampler':<22}{'cell s':>9}{'ms/step':>9}{f'split {args.grad_split} s':>12}{'ratio':>8}")
    for sampler in samplers:
        plain = statistics.median(times[(sampler, 0)])
        split = statistics.median(times[(sampler, args.grad_split)])
        print(f"{sampler:<22}{plain:>9.2f}{1000 * plain / args.horizon:>9.2f}{split:>12.2f}"
              f"{split / plain if plain > 0 else math.nan:>7.2f}×")


if __name__ == "__main__":
    main()
