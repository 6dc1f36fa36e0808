#!/usr/bin/env bash
# Train on a TPU VM pod slice (v4/v5e/v5p): the same command on every worker through
# `gcloud compute tpus tpu-vm ssh --worker=all`, with MTJAX_DISTRIBUTED=auto:
# jax.distributed.initialize() finds the other workers from the TPU metadata. mtjax must be
# installed on every worker (same path), and the workdir must be a filesystem every worker
# mounts at the same path: mtjax writes the run directory through the local filesystem, so
# mount a bucket (gcsfuse) rather than give gs://.
# The command runs in the workers' home directory, or in MTJAX_REMOTE_DIR (e.g. a checkout
# there): relative paths in the arguments (--config, a tasks file) are read from it. It runs in
# a non-login shell, whose PATH may lack where pip put mtjax (~/.local/bin for `pip install
# --user`): set MTJAX_BIN to the workers' command, e.g. MTJAX_BIN="python3 -m mtjax" or a full
# path (default: mtjax).
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b --workdir /mnt/bucket/runs/xl \
#       model.name=t5_1_1_xl model.dtype=bfloat16 train.batch_size=256 mesh.fsdp=-1
#
# One TPU name is one slice: several slices over DCN (multi-slice, queued resources) need the
# command on every slice's workers, with mesh.dcn_data=<slices>, which this script does not do.
# On maintenance events the workers get SIGTERM, save at an agreed step and exit 42; this
# script then re-runs the command (it resumes), up to MTJAX_MAX_RESTARTS times (default 100).
set -uo pipefail
usage="usage: $0 TPU_NAME ZONE [mtjax train arguments...]"
for arg in "${@:1:2}"; do
  if [[ "$arg" == -h || "$arg" == --help ]]; then
    sed -n '2,${/^#\( \|$\)/!q;s/^# \{0,1\}//p}' "$0"
    exit 0
  elif [[ "$arg" == -* ]]; then
    echo "$0: TPU_NAME and ZONE come first, got '$arg'; $usage" >&2
    exit 2
  fi
done
if [[ $# -lt 2 ]]; then
  echo "$usage" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
ARGS=""  # not printf alone: with no arguments it still prints one empty one, ''
if (( $# )); then ARGS=$(printf ' %q' "$@"); fi
# MTJAX_DISTRIBUTED=auto: JAX finds the other workers through the TPU metadata server, which
# mtjax cannot see from the environment (without it mtjax would not start jax.distributed).
COMMAND="MTJAX_DISTRIBUTED=auto TF_CPP_MIN_LOG_LEVEL=2 ${MTJAX_BIN:-mtjax} train$ARGS"
if [[ -n "${MTJAX_REMOTE_DIR:-}" ]]; then
  COMMAND="cd $(printf '%q' "$MTJAX_REMOTE_DIR") && $COMMAND"
fi

restarts=${MTJAX_MAX_RESTARTS:-100}
for (( attempt = 0; ; attempt++ )); do
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$COMMAND"
  code=$?
  [[ $code -eq 42 ]] || exit $code
  if (( attempt >= restarts )); then
    echo "$0: preempted at a checkpoint; not restarting (MTJAX_MAX_RESTARTS=$restarts reached)" >&2
    exit 42
  fi
  echo "$0: preempted at a checkpoint; restarting ($((attempt + 1)) of $restarts)" >&2
done
