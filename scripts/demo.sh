#!/usr/bin/env bash
# The main job on the embedded default: set up, then run the demo recipe end to end
# (reward -> score -> reference -> dpo -> eval) on a tiny model and synthetic data, on CPU.
#
#   bash scripts/demo.sh [key.path=value ...]       e.g. run.dir=runs/demo2
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mmrlhf_lite.train recipes/demo.yaml "$@"
