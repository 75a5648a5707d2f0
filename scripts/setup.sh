#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment: torch first, then the pinned stack, then this package.
#
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh dev      # + test tools (pytest, playwright, nbclient)
#
# Without an NVIDIA GPU the CPU build of torch is installed first: an unpinned torch would pull the CUDA
# build (several GB). With a GPU, `pip install -r requirements-gpu.txt` afterwards adds unsloth.
# Environment: PYTHON (interpreter), VENV (default .venv), TORCH_INDEX (a torch wheel index to use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
pip() { "$VENV/bin/python" -m pip "$@"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
    pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [[ -n "${TORCH_INDEX:-}" ]]; then
        pip install -q "torch>=2.4,<2.15" --index-url "$TORCH_INDEX"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] NVIDIA GPU found: installing the CUDA build of torch"
        pip install -q "torch>=2.4,<2.15"
    else
        echo "[setup] no NVIDIA GPU: installing the CPU build of torch"
        pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --timeout 15 --retries 0 \
            2>/dev/null || pip install -q torch==2.13.0
    fi
fi
if [[ "${1:-}" == "dev" ]]; then
    pip install -q -r requirements-dev.txt
else
    pip install -q -r requirements.txt
fi
pip install -q -e . --no-deps
"$VENV/bin/python" -c "import torch, transformers; print('[setup] torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
