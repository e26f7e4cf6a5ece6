#!/usr/bin/env bash
# Interleaved A/B of the fused EMC² sweep at two commits, built as negbench builds it (its
# CFLAGS, -march=native, one thread), plus the current source with phase timers:
#
#     bash benchmarks/emc2_sweep_ab.sh BEFORE_COMMIT [REPEATS]
#
# For B = 32, 256, 1,024: median process-CPU ms per sweep of each build, its ratio to the
# BEFORE build's, whether the outputs are identical, and cycles per proposal in each phase.
set -euo pipefail
before=${1:?usage: emc2_sweep_ab.sh BEFORE_COMMIT [REPEATS]}
repeats=${2:-15}
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
flags=(-O3 -std=c99 -fPIC -shared -fno-fast-math -ffp-contract=off -march=native)
git -C "$root" show "$before:negbench/kernels/emc2_sweep.c" > "$work/before.c"
cc "${flags[@]}" "$work/before.c" -o "$work/before.so" -lm
cc "${flags[@]}" "$root/negbench/kernels/emc2_sweep.c" -o "$work/current.so" -lm
cc "${flags[@]}" -DNEGBENCH_PHASE_TIMERS "$root/negbench/kernels/emc2_sweep.c" -o "$work/current+timers.so" -lm
cc -O2 "$root/benchmarks/emc2_sweep_ab.c" -o "$work/ab" -ldl
cd "$work"
for batch in 32 256 1024; do
    n=$repeats; [ "$batch" = 32 ] && n=$((repeats * 20))
    ./ab "$batch" "$n" ./before.so ./current.so ./current+timers.so
done
