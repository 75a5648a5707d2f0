#!/usr/bin/env bash
# The product on a GPU in one command (scripts/gpu_smoke.py says what it measures): every stage of
# recipes/qwen2_5_vl_7b-24gb.yaml on a random-init Qwen2.5-VL-7B-shaped checkpoint under a 24 GiB cap, a few
# steps each, results in $OUT (default runs/gpu-smoke/out) as they are measured. About 5 minutes on an H100
# (300 s measured on 2026-12-06, docs/gpu.md; the budget, 330 s, stops a stage that runs over).
#
#   bash scripts/gpu-smoke.sh            # GPU; installs the carried wheels in .whl/ first when they are there
#   bash scripts/gpu-smoke.sh --dry      # CPU, the tiny Qwen2.5-VL twin, same steps (CI: tests/test_gpu_smoke.py)
#
# Wheels for a GPU machine without package access: `bash ../shared/gpu/make-wheels.sh .whl` here (never
# committed: /.whl/ is git-ignored), then carry `.whl` with the command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -x .venv/bin/python ]]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
dry=0
for arg in "$@"; do [[ $arg == --dry ]] && dry=1; done
if [[ $dry -eq 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
    echo "[gpu-smoke] installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PY" scripts/gpu_smoke.py "$@"
