#!/usr/bin/env bash
# Installs the PyTorch reference peers (SwissArmyTransformer 0.4.12 GLM130B on CPU) into the currently active
# Python environment, as shared/reference/peers-on-cpu.md §1 describes. Idempotent: a step is skipped when what
# it installs is already there at the pinned version.
#
#   . .venv/bin/activate && bash tests/install_peers.sh
set -euo pipefail

PYTHON="${PYTHON:-python}"

TORCH_VERSION="2.13.0"            # a CPU wheel of exactly this version is on the machine's disk
SAT_VERSION="0.4.12"
TRANSFORMERS_VERSION="5.23.0"     # the versions the harness was tested with
EINOPS_VERSION="0.8.2"

# have DIST [VERSION]: true when DIST is installed (at VERSION, ignoring a local "+cpu" suffix, when given).
have() {
    "$PYTHON" - "$@" <<'EOF'
import sys
from importlib import metadata
name = sys.argv[1]
want = sys.argv[2] if len(sys.argv) > 2 else None
try:
    got = metadata.version(name)
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if want is None or got.split("+")[0] == want else 1)
EOF
}

if have torch "$TORCH_VERSION"; then
    echo "torch $TORCH_VERSION: already installed"
else
    "$PYTHON" -m pip install "torch==$TORCH_VERSION"
fi

if have swissarmytransformer "$SAT_VERSION"; then
    echo "swissarmytransformer $SAT_VERSION: already installed"
else
    # its declared dependencies (deepspeed, apex, cpm_kernels, datasets, ...) are not needed on CPU
    "$PYTHON" -m pip install --no-deps "swissarmytransformer==$SAT_VERSION"
fi

# what `import sat` really imports
if have numpy && have requests && have tqdm \
    && have einops "$EINOPS_VERSION" && have transformers "$TRANSFORMERS_VERSION"; then
    echo "numpy requests tqdm einops==$EINOPS_VERSION transformers==$TRANSFORMERS_VERSION: already installed"
else
    "$PYTHON" -m pip install numpy requests tqdm "einops==$EINOPS_VERSION" "transformers==$TRANSFORMERS_VERSION"
fi

"$PYTHON" - <<'EOF'
from importlib import metadata
for d in ("torch", "swissarmytransformer", "transformers", "einops", "numpy"):
    print(f"{d}=={metadata.version(d)}")
EOF
