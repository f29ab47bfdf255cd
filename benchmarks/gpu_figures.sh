#!/usr/bin/env bash
# Issue 13's GPU figures in one run on an H100 / H200 (jax with CUDA preinstalled, no package index):
#   bash benchmarks/gpu_wheels.sh          # here, first: ml-collections and tensorboardX as wheels in .whl/
#   bash benchmarks/gpu_figures.sh         # there: about 10 minutes
# Output goes to stdout and, when $OUT is set, to $OUT/gpu_figures.log.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/gpu_figures.log"
{
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  echo; echo '### INT4 / INT8 bytes per device of GLM-130B (launch/inspect_model.py)'
  for bits in 4 8; do
    python3 launch/inspect_model.py --config configs/glm_130b.py --config.mesh.tensor=1 --quantization-bit-width $bits \
      | tail -1
    python3 launch/inspect_model.py --config configs/glm_130b.py --config.mesh.tensor=8 --quantization-bit-width $bits \
      | tail -1
  done
  echo; echo '### benchmarks/int4_matmul.py'
  timeout 300 python3 benchmarks/int4_matmul.py
  echo; echo '### benchmarks/glm130b_int4_decode.py --derive 2,4 (then the whole model if time allows)'
  timeout 200 python3 benchmarks/glm130b_int4_decode.py --derive 2,4
  timeout 300 python3 benchmarks/glm130b_int4_decode.py --layers 70
} 2>&1 | tee "$LOG"
