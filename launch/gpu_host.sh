#!/usr/bin/env bash
# Train on one GPU host with all its GPUs: one process, JAX sees every local GPU, the mesh spans
# them (default mesh: FSDP over all devices).
#
#   launch/gpu_host.sh --workdir runs/base model.name=t5_1_1_base model.dtype=bfloat16 \
#       train.batch_size=128 mesh.data=2 mesh.fsdp=-1
#
# Re-run the same command to resume. A SIGTERM or Ctrl-C sent to this script is passed on to
# mtjax, which saves at the end of its step and exits (42 after SIGTERM); the script exits with
# mtjax's code, so it can be a container's entry point. With MTJAX_RESTART_ON_PREEMPT=1 the
# script restarts training itself when mtjax alone was stopped (exit 42, the script not
# signalled). Env: MTJAX_BIN (default: mtjax).
set -uo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,${/^#\( \|$\)/!q;s/^# \{0,1\}//p}' "$0"
  exit 0
fi
# Paths in the arguments (--workdir, --config, a tasks file) stay relative to where you run this.
source "$(dirname "${BASH_SOURCE[0]}")/xla_gpu_env.sh"
source "$(dirname "${BASH_SOURCE[0]}")/wait_for.sh"
MTJAX_BIN=${MTJAX_BIN:-mtjax}

child=""
stopping=0
# SIGTERM for both: mtjax saves on it; a Ctrl-C at a terminal has reached mtjax already, and a
# second SIGINT would make it stop without saving.
forward() { stopping=1; [[ -n $child ]] && kill -TERM "$child" 2>/dev/null; }
trap forward TERM INT

while true; do
  $MTJAX_BIN train "$@" &
  child=$!
  wait_for "$child"
  child=""
  if [[ $code -eq 42 && "${MTJAX_RESTART_ON_PREEMPT:-0}" == 1 && $stopping == 0 ]]; then
    echo "$0: preempted (checkpoint written); restarting" >&2
    continue
  fi
  exit $code
done
