#!/usr/bin/env bash
# The command line's start-up with and without libtpu installed: the same jax and package in two environments,
# JAX_PLATFORMS unset, runs interleaved; each figure is the wall time of a one-step tiny training run (start-up,
# the first step from a warm compilation cache, checkpoint, summary).
#
#   benchmarks/startup_libtpu.sh PYTHON_WITHOUT_LIBTPU PYTHON_WITH_LIBTPU [RUNS]
set -euo pipefail
without=$1 with=$2 runs=${3:-6}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
run() {
  local t0 t1
  t0=$(date +%s.%N)
  env -u JAX_PLATFORMS "$1" -m diffusion_jax.main --config=configs/tiny.py --workdir="$2" \
    --config.training.num_train_steps=1 >"$2.log" 2>&1
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}
for i in $(seq "$runs"); do
  echo "run $i: without libtpu $(run "$without" "$tmp/without_$i") s, with libtpu $(run "$with" "$tmp/with_$i") s"
done
echo "lines on the console with libtpu that are not there without it (run 2):"
{ diff <(sed -E 's/[0-9.]+//g; s/with_/X/g' "$tmp/with_2.log") <(sed -E 's/[0-9.]+//g; s/without_/X/g' "$tmp/without_2.log") || true; } |
  grep '^<' || echo "(none)"
rm -rf "$tmp"
