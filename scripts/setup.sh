#!/usr/bin/env bash
# Install treespec into the current Python environment.
#   bash scripts/setup.sh          # the library and its demo
#   bash scripts/setup.sh --dev    # plus the test tools
# A plain `torch` requirement with no torch installed pulls the multi-GB CUDA build from PyPI,
# so when no torch is importable we first install the CPU build pinned here; an existing torch
# (a CUDA build on a GPU machine, say) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "no torch found: installing the CPU build torch==${TREESPEC_TORCH_VERSION:-2.13.0}"
    "$PY" -m pip install -q "torch==${TREESPEC_TORCH_VERSION:-2.13.0}"
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
"$PY" -m pip install -q -e ".${extra}"
