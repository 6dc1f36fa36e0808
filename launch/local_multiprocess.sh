#!/usr/bin/env bash
# Run N mtjax training processes on this machine as one multi-host run: the CPU devices are split
# between them (MTJAX_LOCAL_DEVICES in all, default 8) and they talk through jax.distributed on
# 127.0.0.1 with gloo collectives. Used by the tests; handy to debug multi-host code on a laptop.
#
#   launch/local_multiprocess.sh N [mtjax train arguments...]
#   launch/local_multiprocess.sh 2 --workdir runs/mh model.name=t5_1_1_test mesh.data=2
#
# Process 0 prints to the terminal; process i>0 logs to <MTJAX_LOG_DIR or /tmp>/mtjax_process_<i>.log.
# Env: MTJAX_BIN (default: mtjax), MTJAX_PORT (default: a free port), MTJAX_LOCAL_DEVICES,
# MTJAX_STOP_GRACE_S (default 30).
# Exit code: the first non-zero exit code of any process, in time (42: preempted, resume by
# re-running). A process that fails (any code but 42 and 130, which are stops at a checkpoint)
# gets the others a SIGTERM, and a SIGKILL MTJAX_STOP_GRACE_S seconds later: without it they
# wait for JAX's heartbeat timeout (minutes), or forever in start-up for a peer that never came.
# "[Gloo] Rank r is connected to n peer ranks. Expected number ... is : n" lines come from the
# gloo library inside jaxlib (it has no switch to quiet them): matching numbers mean all connected.
set -euo pipefail
if (( BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1) )); then
  # `wait -n -p` (which process ended) came with bash 5.1.
  echo "$0: needs bash 5.1 or later (this is $BASH_VERSION)" >&2
  exit 2
fi
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,${/^#\( \|$\)/!q;s/^# \{0,1\}//p}' "$0"
  exit 0
fi

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N [mtjax train arguments...]" >&2
  exit 2
fi
N=$1; shift
TOTAL=${MTJAX_LOCAL_DEVICES:-8}
if (( TOTAL % N )); then
  echo "$0: MTJAX_LOCAL_DEVICES=$TOTAL is not divisible by N=$N" >&2
  exit 2
fi
PER_PROCESS=$(( TOTAL / N ))
PORT=${MTJAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
LOG_DIR=${MTJAX_LOG_DIR:-/tmp}
if (( N > 1 )) && [[ ! -d "$LOG_DIR" || ! -w "$LOG_DIR" ]]; then
  echo "$0: MTJAX_LOG_DIR=$LOG_DIR is not a writable directory (processes 1..$((N - 1)) log there)" >&2
  exit 2
fi
read -r -a BIN <<< "${MTJAX_BIN:-mtjax}"
GRACE=${MTJAX_STOP_GRACE_S:-30}

pids=()
killer=""
stopping=0
stop_all() {  # $1: the signal
  kill "-$1" "${pids[@]}" 2>/dev/null || true
}
# Forward SIGTERM/SIGINT to every process (preemption: each saves and exits 42). Set before the
# first start, so that no signal falls between two starts; a stuck start-up gets the SIGKILL.
on_signal() {
  stopping=1
  stop_all TERM
  if [[ -z "$killer" ]]; then
    ( sleep "$GRACE"; kill -KILL "${pids[@]}" 2>/dev/null ) </dev/null >/dev/null 2>&1 &
    killer=$!
  fi
}
trap on_signal TERM INT

for (( i = 0; i < N; i++ )); do
  (( stopping )) && break  # signalled while starting: start no more
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

declare -A running  # pid -> process index
for i in "${!pids[@]}"; do running[${pids[$i]}]=$i; done
status=0
while (( ${#running[@]} > 0 )); do
  pid=""
  code=0
  wait -n -p pid "${!running[@]}" || code=$?  # the next to end, whichever it is
  if [[ -z "${pid:-}" ]]; then
    (( code > 128 )) && continue  # a trapped signal interrupted the wait (pid unset)
    echo "$0: wait failed ($code) with processes still running; stopping them" >&2
    on_signal
    exit 1
  fi
  i=${running[$pid]}
  unset "running[$pid]"
  (( code == 0 )) && continue
  (( status == 0 )) && status=$code
  (( code == 42 || code == 130 )) && continue  # stopped at a checkpoint, as the others will
  where=$([[ $i -gt 0 ]] && echo "; log: $LOG_DIR/mtjax_process_$i.log" || true)
  echo "$0: process $i exited with $code$where; stopping the others" >&2
  on_signal
done
(( ${#pids[@]} == 0 )) && status=143  # signalled before the first start
if [[ -n "$killer" ]]; then
  pkill -P "$killer" 2>/dev/null || true  # its sleep
  kill "$killer" 2>/dev/null || true
fi
exit $status
