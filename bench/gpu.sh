#!/usr/bin/env bash
# The benchmark part of the GPU run (issue 30), in priority order, within a time budget (5 minutes by
# default) on one H100/H200, every result appended to $OUT as it is measured:
#   1. ours (packed groups, reference pass counted) at 1, 4, 8 groups per step on the Qwen2-VL-7B shape
#      (random weights, 1024 image tokens, K = 4, ~186-token responses, nf4 + LoRA r16, checkpointing);
#   2. ours with the vision cache at 8 groups;
#   3. TRL's DPOTrainer at 8 pairs per step (issue 10's best batch);
#   4. Unsloth + TRL at 4 pairs per step (its own process: unsloth is imported before transformers);
#   5. the correctness gate in bf16 (ours against an independent forward and TRL's own trainer);
#   6. the most groups per step under 12 and 24 GB caps (bench/memcap.py);
#   7. critique generation, critiques/s, shared prompt against one row per critique (576 image tokens).
# Peak allocated / reserved memory and first-step time are fields of every run row; each row names the TRL
# version it ran (Unsloth 2026.10.9 caps trl at 1.15, the carried wheels' version). An item whose estimate
# no longer fits the time left is recorded as skipped, so the run stays inside the budget.
#
#   bash bench/gpu.sh            # on the GPU machine: installs the carried wheels (.whl/, built here by
#                                # `bash ../shared/gpu/make-wheels.sh .whl`), then runs; $OUT must be set
#   bash bench/gpu.sh --dry      # the same items on the tiny shape on CPU (.venv), in seconds per item: CI;
#                                # each item is a fork of one warm interpreter (bench/warm.py), not a fresh one
#
# Files in $OUT: gpu-bench.jsonl (bench rows, `kind` env / run / gate / memcap / summary / critiques, plus
# one `kind: item` row per item with its exit code and seconds), gpu-bench.log (everything printed).
# Environment: BENCH_BUDGET_S (seconds for all items; default 285, --dry 1800), PYTHON.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
if [[ "${1:-}" == "--dry" ]]; then DRY=1; shift; fi
START=$SECONDS
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if (( DRY )); then
    OUT=${OUT:-$(mktemp -d /tmp/gpu-bench-dry.XXXXXX)}
    PY=${PYTHON:-.venv/bin/python}
    export MMRLHF_LITE_CACHE=${MMRLHF_LITE_CACHE:-$PWD/.cache/bench}
    BUDGET=${BENCH_BUDGET_S:-1800}
    MODEL=(--model tiny --image-tokens 4 --response-tokens 12)
    STEPS=(--steps 1 --warmup 1)
    OURS_BATCHES=(1,2 2) TRL_BATCHES=(2 2)        # ours' batches and ours-vcache's (groups); TRL's and Unsloth + TRL's (pairs)
    GATE_DTYPE=float32        # bnb's bf16 compute is a GPU setting; the dry run checks the plumbing
    CRITIQUES=(--model tiny:qwen2_vl:xs --image-tokens 4 --groups 1 --max-new-tokens 4 --repeats 1)
    MEMCAP=(--memcap-max-batch 2)
else
    : "${OUT:?set OUT to the folder the results go to}"
    PY=${PYTHON:-python3}
    export MMRLHF_LITE_CACHE=${MMRLHF_LITE_CACHE:-/tmp/mmrlhf-cache}
    BUDGET=${BENCH_BUDGET_S:-285}
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "wheel install failed" | tee "$OUT/gpu-bench.log"; exit 1; }
        export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    MODEL=(--model 7b --image-tokens 1024 --response-tokens 186)
    STEPS=(--steps 3 --warmup 1)
    OURS_BATCHES=(1,4,8 8) TRL_BATCHES=(8 4)
    GATE_DTYPE=bfloat16
    CRITIQUES=(--model 7b --image-tokens 576 --groups 4 --max-new-tokens 32 --batch-size 16 --repeats 1)
    MEMCAP=(--memcap-max-batch 8 --memcap-steps 1)
fi
mkdir -p "$OUT"
RES=$OUT/gpu-bench.jsonl
LOG=$OUT/gpu-bench.log
FIRST_LINE=$( [[ -f $RES ]] && wc -l <"$RES" || echo 0 )
echo "[gpu.sh] $( ((DRY)) && echo dry run || echo GPU run ) at $(date -u +%FT%TZ), budget ${BUDGET}s, results in $RES" | tee -a "$LOG"

item() {  # item NAME ESTIMATED_SECONDS COMMAND...: run it if its estimate fits the time left
    local name=$1 est=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if (( left < est )); then
        echo "{\"kind\": \"item\", \"item\": \"$name\", \"status\": \"skipped\", \"reason\": \"out of time: ${left} s left, the item needs about ${est} s\"}" >>"$RES"
        echo "[gpu.sh] $name: skipped (${left} s left, needs ~${est} s)" | tee -a "$LOG"
        return
    fi
    echo "[gpu.sh] $name (~${est} s; ${left} s left)" | tee -a "$LOG"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$left" "$@" >>"$LOG" 2>&1 || rc=$?
    local status=ok
    if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=error; fi
    echo "{\"kind\": \"item\", \"item\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$RES"
    echo "[gpu.sh] $name: $status after $((SECONDS - t0)) s" | tee -a "$LOG"
}

RUN=("$PY")
if (( DRY )); then   # on the tiny model a fresh interpreter's imports cost more than an item: fork them from one
    WARM=$(mktemp -u /tmp/gpu-bench-warm.XXXXXX)
    "$PY" -m bench.warm serve "$WARM" >>"$LOG" 2>&1 &
    WARM_PID=$!
    trap 'kill "$WARM_PID" 2>/dev/null; wait "$WARM_PID" 2>/dev/null; rm -f "$WARM"' EXIT
    RUN=("$PY" -m bench.warm run "$WARM")
fi
DPO=("${RUN[@]}" -m bench.dpo "${MODEL[@]}" --k 4 --out "$RES")
item model 70 "${RUN[@]}" -m bench.build "${MODEL[1]}"
item ours 110 "${DPO[@]}" --systems ours --groups-per-step "${OURS_BATCHES[0]}" "${STEPS[@]}" --isolate no --no-gate
item ours-vcache 40 "${DPO[@]}" --systems ours-vcache --groups-per-step "${OURS_BATCHES[1]}" "${STEPS[@]}" --isolate no --no-gate
item trl 60 "${DPO[@]}" --systems trl --pairs-per-step "${TRL_BATCHES[0]}" "${STEPS[@]}" --isolate no --no-gate
item unsloth-trl 150 "${DPO[@]}" --systems unsloth-trl --pairs-per-step "${TRL_BATCHES[1]}" "${STEPS[@]}" --isolate yes --no-gate
item gate 70 "${DPO[@]}" --no-runs --gate-dtype "$GATE_DTYPE" --gate-groups 1 --isolate no
item memcap 150 "${DPO[@]}" --systems ours --no-runs --no-gate --mem-cap-gb 12,24 "${MEMCAP[@]}" --isolate yes
item critiques 90 "${RUN[@]}" -m bench.critiques "${CRITIQUES[@]}" --out "$RES"
echo "[gpu.sh] done in $((SECONDS - START)) s; rows in $RES" | tee -a "$LOG"
grep -E "^(ours|trl|unsloth)[a-z-]* +[0-9]+ (groups|pairs)|^gate:|^memcap|critiques/s" "$LOG" || true
"$PY" -m bench.summary "$RES" --from-line "$FIRST_LINE" --append 2>>"$LOG" | tee -a "$LOG"
