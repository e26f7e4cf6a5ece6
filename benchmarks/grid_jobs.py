"""Wall clock of an 8-cell ``digits`` grid (``--steps 300``) run by ``negbench compare`` with
``--jobs 1`` (in one process), ``--jobs 2`` (two spawned workers) and ``--backend dask
--jobs 2`` (a Dask LocalCluster of two workers), back to back, each into a fresh runs folder
so that nothing is skipped. Each variant is a separate ``negbench compare`` process, so the
figure includes starting the workers (imports of torch in each) and writing the table.

    python benchmarks/grid_jobs.py                 # one round: jobs1, jobs2, dask
    python benchmarks/grid_jobs.py --rounds 2      # interleaved rounds; the median per variant
    python benchmarks/grid_jobs.py --steps 5       # a smoke run of the script itself

Reported: wall seconds per variant, the speed-up against ``--jobs 1`` of the same round, the
CPU seconds of the whole process tree (``os.times`` of the children), and the 1-minute load
average before and after each variant (``os.getloadavg``) — read the figure against it: on a
shared machine other work takes cores away from the workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = ["--task", "digits", "--samplers", "in_batch,emc2", "--batch-sizes", "4,32", "--seeds", "2"]
STEPS = 300
VARIANTS = {
    "jobs1": ["--jobs", "1"],
    "jobs2": ["--jobs", "2"],
    "dask2": ["--backend", "dask", "--jobs", "2"],
}


def run_variant(name: str, root: Path, steps: int) -> dict[str, float]:
    out = root / name / "runs"
    command = [sys.executable, "-m", "negbench", "compare", *GRID, "--steps", str(steps), *VARIANTS[name],
               "--out", str(out), "--name", str(root / name / "table")]
    load_before = os.getloadavg()[0]
    cpu_before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    cpu_after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (cpu_after.children_user - cpu_before.children_user) + (cpu_after.children_system - cpu_before.children_system)
    shutil.rmtree(root / name)
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every variant")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps of every cell (the figure: 300)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or args.rounds < 1 or args.steps < 1:
        parser.error(f"unknown variants {unknown}" if unknown else "--rounds and --steps must be positive")
    print(f"{os.cpu_count()} logical cores; grid: negbench compare {' '.join(GRID)} --steps {args.steps}", flush=True)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="grid_jobs-") as tmp:
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else list(reversed(names))  # alternate who goes first
            for name in order:
                r = run_variant(name, Path(tmp), args.steps)
                results[name].append(r)
                print(f"round {round_ + 1} {name:6s} wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
                      f"load {r['load_before']:.2f} -> {r['load_after']:.2f}", flush=True)
    print("\nvariant  median wall s  speed-up vs jobs1 (per round)")
    for name in names:
        walls = [r["wall_s"] for r in results[name]]
        line = f"{name:7s}  {statistics.median(walls):12.1f}"
        if "jobs1" in results and name != "jobs1":
            ratios = [j["wall_s"] / r["wall_s"] for j, r in zip(results["jobs1"], results[name])]
            line += "  " + ", ".join(f"{x:.2f}x" for x in ratios)
        print(line)


if __name__ == "__main__":
    main()
