#!/usr/bin/env bash
# Train on one GPU host with all its GPUs: one process, JAX sees every local GPU, the mesh spans
# them (default mesh: FSDP over all devices).
#
#   launch/gpu_host.sh --workdir runs/base model.name=t5_1_1_base model.dtype=bfloat16 \
#       train.batch_size=128 mesh.data=2 mesh.fsdp=-1
#
# Re-run the same command to resume. With MTJAX_RESTART_ON_PREEMPT=1 the script restarts
# training itself after a SIGTERM-triggered checkpoint (exit code 42).
set -uo pipefail
# Paths in the arguments (--workdir, --config, a tasks file) stay relative to where you run this.
source "$(dirname "${BASH_SOURCE[0]}")/xla_gpu_env.sh"
MTJAX_BIN=${MTJAX_BIN:-mtjax}

while true; do
  $MTJAX_BIN train "$@"
  code=$?
  if [[ $code -eq 42 && "${MTJAX_RESTART_ON_PREEMPT:-0}" == 1 ]]; then
    echo "$0: preempted (checkpoint written); restarting" >&2
    continue
  fi
  exit $code
done
