#!/usr/bin/env bash
# The CPU side-by-side: ours against TRL's DPOTrainer on the same weights, data, LoRA targets, 4-bit setting
# and dtype (float32), each measurement in its own process, at the `cpu` shape (bench/configs.py: Qwen2-VL
# layout, ~37M parameters, 256 image tokens, K = 4, ~64-token responses), where a step's time is matmul time.
# In one run: this machine's float32 matmul peak (bench/peak.py), the correctness gate (bench/gate.py:
# our per-pair loss and log-probs against an independent computation and TRL's own trainer), each system at
# two batch sizes with one profiled step (torch.profiler), and the summary (bench/summary.py). A regression
# guard, not a CPU tuning target: ours/trl should stay >= 10x (docs/benchmarks.md, "CPU side by side").
# Under 10 minutes on an idle 2-core machine; other jobs on the cores slow it and skew the ratio.
#
#   bash bench/cpu.sh                 # appends to bench/results/cpu-side-by-side.jsonl (BENCH_OUT overrides)
#   bash bench/cpu.sh --tiny          # the same harness on the tiny shape in one process, seconds (the CI test)
#   bash bench/cpu.sh --steps 5       # further arguments go to `python -m bench.dpo` and win
#
# The last line reads exactly `ours/trl pairs/s = X.XXx at <shape>` (the best batch of each system).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
export MMRLHF_LITE_CACHE=${MMRLHF_LITE_CACHE:-$PWD/.cache/bench}
export TOKENIZERS_PARALLELISM=false
OUT=${BENCH_OUT:-bench/results/cpu-side-by-side.jsonl}
if [[ "${1:-}" == "--tiny" ]]; then
    shift
    ARGS=(--model tiny --image-tokens 4 --response-tokens 12 --groups-per-step 1 --pairs-per-step 2
          --systems ours,trl --steps 1 --warmup 1 --isolate no --no-gate)
else
    ARGS=(--model cpu --image-tokens 256 --response-tokens 64 --k 4 --groups-per-step 1,2 --pairs-per-step 2,4
          --systems ours,ours-vcache,trl --steps 3 --warmup 1 --isolate yes --gate-groups 1)
fi
echo "[cpu.sh] $(uptime)"
exec "$PY" -m bench.dpo "${ARGS[@]}" --threads 2 --profile --peak-tflops measure --out "$OUT" "$@"
