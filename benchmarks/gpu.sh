#!/usr/bin/env bash
# The memory and speed benchmarks on one GPU, in under 8 minutes, into benchmarks/results/gpu/.
#
# Writes the same outputs as the CPU runs (memory.json / .md / .png, train_step.json,
# inference.json), with each memory record also holding the allocator's measured peak
# (`peak_bytes`: one run on zero-filled arguments). JAX's peak statistic is per
# process and cannot be reset, so each measured program runs in its own process.
# Needs `pip install -e .[cuda,bench]`.
#
# Usage: bash benchmarks/gpu.sh [--dry-run]   (--dry-run prints the commands only)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT_DIR:-benchmarks/results/gpu}
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1

run() {  # run SECONDS COMMAND...: one stage, bounded in time
  local limit=$1
  shift
  echo "+ $*"
  if [[ $DRY_RUN == 0 ]]; then
    timeout "$limit" "$@" || echo "stage failed or ran out of time (${limit}s): $*" >&2
  fi
}

if [[ $DRY_RUN == 0 ]]; then
  "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" \
    || { echo "No GPU visible to JAX (jax.default_backend() != 'gpu')." >&2; exit 1; }
  mkdir -p "$OUT"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the allocator's peak is then the programs' own

MEMORY=("$PYTHON" benchmarks/memory.py --json "$OUT/memory.json" --resume --peak --models pi0)
start=$SECONDS
# The claims first: LoRA and full fine-tuning at batch 32, sampling at batch 1 (~1 min each).
run 120 "${MEMORY[@]}" --programs train --strategies lora --batches 32
run 120 "${MEMORY[@]}" --programs train --strategies full --batches 32
run 60 "${MEMORY[@]}" --programs sample --weights bfloat16 --batches 1
run 60 "${MEMORY[@]}" --programs sample --weights int8 --batches 1
run 90 "${MEMORY[@]}" --programs train --strategies qlora-int8 --batches 32
# Speed of the small benchmark π0 (pi0_speed.py's configuration).
run 60 "$PYTHON" benchmarks/train_step.py --strategies full lora --json "$OUT/train_step.json"
run 45 "$PYTHON" benchmarks/inference.py --json "$OUT/inference.json"
# Table and plot from whatever was measured.
run 30 "$PYTHON" benchmarks/memory.py --json "$OUT/memory.json" --report-only
echo "gpu.sh: $((SECONDS - start)) s; outputs in $OUT"
