#!/usr/bin/env bash
# Train on a TPU VM pod slice (v4/v5e/v5p): the same command on every worker through
# `gcloud compute tpus tpu-vm ssh --worker=all`; jax.distributed.initialize() finds the other
# workers from the TPU metadata. mtjax must be installed on every worker (same path), and the
# workdir must be a filesystem every worker mounts at the same path: mtjax writes the run
# directory through the local filesystem, so mount a bucket (gcsfuse) rather than give gs://.
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b --workdir /mnt/bucket/runs/xl \
#       model.name=t5_1_1_xl model.dtype=bfloat16 train.batch_size=256 mesh.fsdp=-1
#
# Multi-slice: add mesh.dcn_data=<slices>. On maintenance events the workers get SIGTERM,
# save at an agreed step and exit 42; this script then re-runs the command (it resumes), up to
# MTJAX_MAX_RESTARTS times (default 100).
set -uo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [mtjax train arguments...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
REMOTE_DIR=${MTJAX_REMOTE_DIR:-\~/mtjax}
ARGS=$(printf ' %q' "$@")
COMMAND="cd $REMOTE_DIR && TF_CPP_MIN_LOG_LEVEL=2 mtjax train$ARGS"

for (( attempt = 0; attempt <= ${MTJAX_MAX_RESTARTS:-100}; attempt++ )); do
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$COMMAND"
  code=$?
  [[ $code -eq 42 ]] || exit $code
  echo "$0: preempted at a checkpoint; restarting (attempt $((attempt + 1)))" >&2
done
exit 42
