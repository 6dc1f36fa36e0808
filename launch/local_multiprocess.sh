#!/usr/bin/env bash
# Run N mtjax training processes on this machine as one multi-host run: the CPU devices are split
# between them (MTJAX_LOCAL_DEVICES in all, default 8) and they talk through jax.distributed on
# 127.0.0.1 with gloo collectives. Used by the tests; handy to debug multi-host code on a laptop.
#
#   launch/local_multiprocess.sh N [mtjax train arguments...]
#   launch/local_multiprocess.sh 2 --workdir runs/mh model.name=t5_1_1_test mesh.data=2
#
# Process 0 prints to the terminal; process i>0 logs to <MTJAX_LOG_DIR or /tmp>/mtjax_process_<i>.log.
# Env: MTJAX_BIN (default: mtjax), MTJAX_PORT (default: a free port), MTJAX_LOCAL_DEVICES.
# Exit code: the first non-zero exit code of any process (42: preempted, resume by re-running).
# "[Gloo] Rank r is connected to n peer ranks. Expected number ... is : n" lines come from the
# gloo library inside jaxlib (it has no switch to quiet them): matching numbers mean all connected.
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,${/^#\( \|$\)/!q;s/^# \{0,1\}//p}' "$0"
  exit 0
fi

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N [mtjax train arguments...]" >&2
  exit 2
fi
N=$1; shift
source "$(dirname "${BASH_SOURCE[0]}")/wait_for.sh"
TOTAL=${MTJAX_LOCAL_DEVICES:-8}
if (( TOTAL % N )); then
  echo "$0: MTJAX_LOCAL_DEVICES=$TOTAL is not divisible by N=$N" >&2
  exit 2
fi
PER_PROCESS=$(( TOTAL / N ))
PORT=${MTJAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
LOG_DIR=${MTJAX_LOG_DIR:-/tmp}
read -r -a BIN <<< "${MTJAX_BIN:-mtjax}"

pids=()
for (( i = 0; i < N; i++ )); do
  env_vars=(
    MTJAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" MTJAX_NUM_PROCESSES="$N" MTJAX_PROCESS_ID="$i"
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$PER_PROCESS ${XLA_FLAGS:-}"
  )
  if (( i == 0 )); then
    env "${env_vars[@]}" "${BIN[@]}" train "$@" &
  else
    env "${env_vars[@]}" "${BIN[@]}" train "$@" > "$LOG_DIR/mtjax_process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Forward SIGTERM/SIGINT to every process (preemption: each saves and exits 42).
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT

status=0
for i in "${!pids[@]}"; do
  wait_for "${pids[$i]}"
  if (( code != 0 )); then
    (( status == 0 )) && status=$code
    if (( i > 0 && code != 42 && code != 130 )); then  # 42, 130: stopped at a checkpoint
      echo "$0: process $i exited with $code; log: $LOG_DIR/mtjax_process_$i.log" >&2
    fi
  fi
done
exit $status
