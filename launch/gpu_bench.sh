#!/usr/bin/env bash
# GPU benchmark: `mtjax bench train|decode|checkpoint` for T5 1.1 base and large on one GPU, bf16,
# packed 512/114 (`bench data` needs seqio/TensorFlow, which GPU images often lack: run it apart).
#
#   launch/gpu_bench.sh                   # JSON to stdout (one object per model), tables to stderr
#   OUT=/some/dir launch/gpu_bench.sh     # also bench_<benchmark>_<model>.json in $OUT
#
# Installs nothing: mtjax and its JAX must already be importable by $PYTHON (default python3).
# The whole script keeps to BUDGET_S seconds (default 480, the 8 minutes of a lent GPU): each
# run gets what is left (at most RUN_S, default 300), and runs that no longer fit (under 30 s
# left) are not started. A failed, stopped or skipped run is named and the rest still run; the
# script then exits 1. Ctrl-C stops the run and the script.
# Extra KEY=VALUE overrides or flags are passed to every run, e.g. `--steps 20 train.microbatches=2`.
# Env: PYTHON, OUT, BUDGET_S, RUN_S, BENCHMARKS (default: train decode checkpoint).
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,${/^#\( \|$\)/!q;s/^# \{0,1\}//p}' "$0"
  exit 0
fi
# Paths (OUT, --config, a tasks file) stay relative to where you run this; mtjax is imported
# from this checkout.
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$(dirname "$LAUNCH_DIR")${PYTHONPATH:+:$PYTHONPATH}"

PYTHON=${PYTHON:-python3}
source "$LAUNCH_DIR/xla_gpu_env.sh"

# model:batch — sized to fit an 80 GB H100 without remat (AdamW state is 16 bytes/param). On an
# H200 with cuDNN attention (model.attention=auto), XLA's temp memory was 34 GiB for base at 128
# and 22 GiB for large at 32; batch 128 gave base 1.16x the tokens/s of batch 64.
RUNS=("t5_1_1_base:128" "t5_1_1_large:64")
COMMON=(model.dtype=bfloat16 optim.name=adamw data.inputs_length=512 data.targets_length=114
        data.pack=true --steps 10 --warmup 2)

BENCHMARKS=(${BENCHMARKS:-train decode checkpoint})
# --foreground below keeps each run in the terminal's process group, so a Ctrl-C reaches it;
# the run handles it and exits, and bash (which runs a trap once the run has ended) stops too.
trap 'echo "$0: interrupted" >&2; exit 130' INT
BUDGET_S=${BUDGET_S:-480}
RUN_S=${RUN_S:-300}
deadline=$(( SECONDS + BUDGET_S ))
failed=()
for run in "${RUNS[@]}"; do
  model=${run%%:*}
  batch=${run##*:}
  for benchmark in "${BENCHMARKS[@]}"; do
    output=()
    if [[ -n "${OUT:-}" ]]; then
      mkdir -p "$OUT"
      output=(--output "$OUT/bench_${benchmark}_${model}.json")
    fi
    left=$(( deadline - SECONDS ))
    if (( left < 30 )); then
      echo "$0: mtjax bench $benchmark $model not started (${BUDGET_S} s budget spent)" >&2
      failed+=("$benchmark $model")
      continue
    fi
    limit=$(( left < RUN_S ? left : RUN_S ))
    echo "== mtjax bench $benchmark: $model, batch $batch, bf16, 512/114 (at most $limit s) ==" >&2
    code=0
    timeout --foreground "$limit" "$PYTHON" -m mtjax bench "$benchmark" model.name="$model" \
      train.batch_size="$batch" "${COMMON[@]}" "${output[@]}" "$@" || code=$?
    if (( code != 0 )); then
      (( code == 124 )) && why="stopped after $limit s" || why="exit code $code"
      echo "$0: mtjax bench $benchmark $model failed ($why)" >&2
      failed+=("$benchmark $model")
    fi
  done
done
if (( ${#failed[@]} )); then
  echo "$0: ${#failed[@]} run(s) failed: $(IFS=,; echo "${failed[*]}")" >&2
  exit 1
fi
