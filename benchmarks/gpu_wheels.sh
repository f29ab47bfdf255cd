#!/usr/bin/env bash
# Downloads, here (where pip reaches a package index), the pure-Python packages that glm-jax needs and the GPU
# machines' image lacks (ml-collections, tensorboardX), into .whl/ (git-ignored). On the GPU machine:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# (benchmarks/gpu_figures.sh does this first).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d .whl "ml-collections==1.1.0" "tensorboardX==2.6.5"
ls -l .whl
