#!/usr/bin/env bash
# GPU benchmark: `mtjax bench all` for T5 1.1 base and large on one GPU, bf16, packed 512/114.
#
#   launch/gpu_bench.sh                   # JSON to stdout (one object per model), tables to stderr
#   OUT=/some/dir launch/gpu_bench.sh     # also bench_t5_1_1_{base,large}.json in $OUT
#
# Installs nothing: mtjax and its JAX must already be importable by $PYTHON (default python3).
# Expect about 1-3 minutes per model (compile dominates); well under 8 minutes in all.
# Extra KEY=VALUE overrides or flags are passed to every run, e.g. `--steps 20 train.microbatches=2`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# Latency-hiding scheduler: overlap collectives/copies with compute (no effect on one device
# beyond scheduling, harmless). Set XLA_FLAGS yourself to replace these.
export XLA_FLAGS=${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}
# Let XLA take most of the GPU up front (no allocator growth during timing).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

# model:batch — sized to fit an 80 GB H100 without remat (AdamW state is 16 bytes/param).
RUNS=("t5_1_1_base:64" "t5_1_1_large:32")
COMMON=(model.dtype=bfloat16 optim.name=adamw data.inputs_length=512 data.targets_length=114
        data.pack=true --steps 10 --warmup 2)

for run in "${RUNS[@]}"; do
  model=${run%%:*}
  batch=${run##*:}
  output=()
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    output=(--output "$OUT/bench_${model}.json")
  fi
  echo "== mtjax bench all: $model, batch $batch, bf16, 512/114 ==" >&2
  timeout 300 "$PYTHON" -m mtjax.cli bench all model.name="$model" train.batch_size="$batch" \
    "${COMMON[@]}" "${output[@]}" "$@"
done
