#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool's `run`): check the image, then the sweep.
#
#   bash benchmarks/gpu/lease.sh            # results under $OUT (default /tmp/mtjax_gpu_out)
#
# The GPU image brings its own jax/flax/optax/orbax and no seqio/TensorFlow. If mtjax's smoke
# benchmark fails with the image's packages, the wheels in .whl/ (flax, optax, orbax-checkpoint
# at the versions pyproject.toml pins; fetched beforehand with `pip download`, see
# benchmarks/README.md) are installed into /tmp/site and the smoke test runs again.
# SKIP_SMOKE=1 goes straight to the sweep; ATTENTION_TIMEOUT=75 first runs attention_variants.py
# for at most that many seconds. Budget: smoke about 30 s, then sweep.py stops starting work at DEADLINE seconds (default 330).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/mtjax_gpu_out}
mkdir -p "$OUT"
source launch/xla_gpu_env.sh

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version \
  --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tail -3

smoke() {
  timeout 150 python3 -m mtjax bench train --smoke model.dtype=bfloat16 --output "$OUT/smoke.json" >/dev/null
}
if [[ -z "${SKIP_SMOKE:-}" ]] && ! smoke 2>"$OUT/smoke.log"; then
  grep -v -E "^(WARNING|I[0-9]{4}|W[0-9]{4})" "$OUT/smoke.log" | tail -25
  echo "== the image's packages failed the smoke benchmark; trying the carried wheels =="
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  if ! smoke 2>"$OUT/smoke.log"; then
    grep -v -E "^(WARNING|I[0-9]{4}|W[0-9]{4})" "$OUT/smoke.log" | tail -40
    exit 3
  fi
fi
grep -E "tokens_per_s|mfu|compile_s" "$OUT/smoke.json" 2>/dev/null | head -4

# cuDNN attention alone, in the ways mtjax could pass T5's bias and packing (attention_variants.py).
if [[ "${ATTENTION_TIMEOUT:-0}" != 0 ]]; then
  timeout "$ATTENTION_TIMEOUT" python3 benchmarks/gpu/attention_variants.py --out-dir "$OUT" 2>&1 \
    | grep --line-buffered -v -E "^(WARNING|I[0-9]{4}|W[0-9]{4})" | cut -c1-300
fi

: >"$OUT/sweep.log"  # there before tail starts: the background job may not have opened it yet
timeout "${SWEEP_TIMEOUT:-420}" python3 benchmarks/gpu/sweep.py --out-dir "$OUT" \
  --deadline-s "${DEADLINE:-330}" >"$OUT/sweep.log" 2>&1 &
sweep=$!
# Show the sweep's own lines as they come (the reply keeps the tail), not the library chatter.
tail -f "$OUT/sweep.log" --pid=$sweep | grep --line-buffered -v -E "^(WARNING|I[0-9]{4}|W[0-9]{4}|  )"
code=0
wait $sweep || code=$?
echo "sweep exit $code"
exit $code  # the run's rc: a failed or timed-out sweep is not a success
