#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: one process per TPU VM worker, each started over `gcloud compute tpus tpu-vm ssh`;
# worker 0 is the coordinator.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod_train.sh --config configs/glm_130b.py --workdir /mnt/runs/glm
#   TPU_NAME=... ZONE=... launch/tpu_pod_train.sh --dry-run --config ...   # print each worker's command only
#
# Every argument goes to launch/train.py, with --coordinator, --num-processes and --process-id (= the worker index)
# added. Each worker needs the repository at REPO_DIR (relative to the home directory, default glm-jax) with its
# environment installed, and the run directory on a file system every worker mounts (e.g. a Filestore NFS share).
# Environment: TPU_NAME, ZONE (required); PROJECT; REPO_DIR; PYTHON (on the workers, default python3);
# COORDINATOR_PORT (default 8476); INIT_TIMEOUT (seconds to wait for every worker to join, default 600);
# WORKER_IPS (the workers' internal addresses in worker order, separated by ';' or ','; default: from
# `gcloud compute tpus tpu-vm describe`); DRY_RUN=1 (as --dry-run).
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}" "${ZONE:?set ZONE to its zone}"
tpu=(gcloud compute tpus tpu-vm)
where=("$TPU_NAME" --zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  where+=(--project="$PROJECT")
fi
ips=${WORKER_IPS:-$("${tpu[@]}" describe "${where[@]}" --format='value(networkEndpoints[].ipAddress)')}
IFS=';, ' read -r -a workers <<< "$ips"
n=${#workers[@]}
if (( n == 0 )); then
  echo "tpu_pod_train.sh: error: no worker addresses for $TPU_NAME in $ZONE" >&2
  exit 2
fi
coordinator=${workers[0]}:${COORDINATOR_PORT:-8476}
args=''
if (( $# )); then
  printf -v args ' %q' "$@"  # quoted again for the worker's shell
fi
pids=()
# Stopping this script (Ctrl-C) stops the ssh sessions it started, rather than leaving them behind.
trap 'kill ${pids[@]+"${pids[@]}"} 2>/dev/null || true' EXIT
for ((i = 0; i < n; i++)); do
  remote="cd ${REPO_DIR:-glm-jax} && ${PYTHON:-python3} launch/train.py --coordinator=$coordinator"
  remote+=" --num-processes=$n --process-id=$i --init-timeout=${INIT_TIMEOUT:-600}$args"
  cmd=("${tpu[@]}" ssh "${where[@]}" --worker="$i" --command="$remote")
  if [[ $DRY_RUN == 1 ]]; then
    echo "process $i of $n on worker $i (${workers[i]}), coordinator $coordinator:"
    echo "  ${tpu[*]} ssh ${where[*]} --worker=$i --command=${remote@Q}"
  else
    "${cmd[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in ${pids[@]+"${pids[@]}"}; do
  wait "$pid" || status=$?
done
exit "$status"
