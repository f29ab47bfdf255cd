#!/usr/bin/env bash
# Train on a Slurm GPU cluster: one process per node, driving all of its GPUs, on JAX's distributed runtime.
#
#   sbatch --nodes=4 launch/slurm_train.sh --config configs/glm_130b.py --workdir /shared/runs/glm
#   launch/slurm_train.sh --dry-run --config configs/glm_130b.py ...   # in an allocation: print what would run
#
# Submit from the repository root (sbatch runs a copy of this file; SLURM_SUBMIT_DIR says where it was submitted).
# Every argument goes to launch/train.py. Each task finds its process id (SLURM_PROCID), the process count and the
# coordinator (the first node of the job step, on a port derived from the job id, or JAX_COORDINATOR_PORT) in
# Slurm's variables (glm_jax/distributed.py). The run directory must be on a file system every node mounts.
# Environment: PYTHON (default python), INIT_TIMEOUT (seconds to wait for every node to join, default 600),
# DRY_RUN=1 (as --dry-run). The #SBATCH lines are defaults; sbatch's own options override them.
#SBATCH --job-name=glm-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [[ ! -f launch/train.py ]]; then
  echo "slurm_train.sh: error: $PWD is not the glm-jax repository: submit from its root" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
# --kill-on-bad-exit: a task that fails takes the others down instead of leaving them waiting for it.
cmd=(srun --kill-on-bad-exit=1 "$PYTHON" launch/train.py --init-timeout="${INIT_TIMEOUT:-600}" "$@")
if [[ $DRY_RUN == 1 ]]; then
  exec "$PYTHON" -m glm_jax.distributed slurm-plan "${cmd[@]}"
fi
exec "${cmd[@]}"
