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
    # uv installs the same pinned wheels several times faster than pip (measured on a fresh clone here: 38 s
    # against 206 s on a loaded machine); pip does it all when uv cannot be had (MMRLHF_LITE_NO_UV=1 forces pip)
    if [[ -z "${MMRLHF_LITE_NO_UV:-}" ]]; then
        pip install -q uv 2>/dev/null || echo "[setup] uv not available: installing with pip"
    fi
fi
if [[ -z "${MMRLHF_LITE_NO_UV:-}" ]] && "$VENV/bin/python" -m uv --version >/dev/null 2>&1; then
    # uv reads neither pip.conf nor PIP_* variables: pass on the local wheel folder pip would use
    install() { UV_HTTP_RETRIES=${UV_HTTP_RETRIES:-1} "$VENV/bin/python" -m uv pip install -q --compile-bytecode --python "$VENV/bin/python" \
        ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} "$@"; }
else
    install() { pip install -q "$@"; }
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [[ -n "${TORCH_INDEX:-}" ]]; then
        install "torch>=2.4,<2.15" --index-url "$TORCH_INDEX"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] NVIDIA GPU found: installing the CUDA build of torch"
        install "torch>=2.4,<2.15"
    else
        echo "[setup] no NVIDIA GPU: installing the CPU build of torch"
        if [[ -n "${PIP_FIND_LINKS:-}" ]] && compgen -G "$PIP_FIND_LINKS/torch-2.13.0+cpu-*.whl" >/dev/null; then
            install torch==2.13.0          # a CPU wheel in the local wheel folder
        else
            install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu 2>/dev/null || install torch==2.13.0
        fi
    fi
fi
if [[ "${1:-}" == "dev" ]]; then
    install -r requirements-dev.txt
else
    install -r requirements.txt
fi
install -e . --no-deps
"$VENV/bin/python" -c "import torch, transformers; print('[setup] torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
