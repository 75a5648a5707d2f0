"""`bash scripts/gpu-smoke.sh --dry`: the GPU smoke's steps on the tiny Qwen2.5-VL twin on CPU (what CI can run
of it). Every stage of recipes/qwen2_5_vl_7b-24gb.yaml runs in its own process and the files in $OUT say what
was measured: the pre-flight's estimate beside each stage, first-step time, throughput, the step-0 log-ratio.

    python -m pytest -q tests/test_gpu_smoke.py
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["reward", "score", "reference", "dpo", "eval"]


def test_gpu_smoke_dry_runs_every_stage_and_writes_what_it_measured(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    res = subprocess.run(["bash", "scripts/gpu-smoke.sh", "--dry", "--run-dir", str(tmp_path / "run")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + (out / "summary.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["events.jsonl", "preflight.txt", "smoke.jsonl", "stages.log",
                                                     "summary.md"]
    records = [json.loads(x) for x in (out / "smoke.jsonl").read_text().splitlines()]
    env_rec, build, pre = records[0], records[1], records[2]
    assert env_rec["kind"] == "environment" and env_rec["compute_dtype"] == "float32"
    assert build["kind"] == "build" and build["status"] == "done" and "qwen2_5_vl" in build["model"]
    assert pre["kind"] == "preflight" and pre["status"] == "plan OK" and sorted(pre["stages"]) == sorted(STAGES)
    assert pre["budget"]["gib"] == 24.0
    stages = {r["stage"]: r for r in records if r["kind"] == "stage"}
    assert list(stages) == STAGES
    for name, r in stages.items():
        assert r["status"] == "done" and r["error"] is None, r
        assert r["seconds"] > 0 and r["peak_rss_gib"] > 0
    for name in ("reward", "dpo"):
        assert 0 < stages[name]["first_step_s"] < stages[name]["seconds"]
        assert stages[name]["steps_per_s"] > 0 and stages[name]["groups_per_s"] > 0
        assert stages[name]["collate_s_per_step"] > 0
    assert stages["score"]["critiques_per_s"] > 0 and stages["score"]["critiques_per_s_with_load"] > 0
    assert stages["dpo"]["step0_abs_log_ratio_max"] <= 1e-5     # the reference pass = the step-0 policy
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in STAGES]
    assert [line.split("|")[1].strip() for line in table] == STAGES
    assert all(line.split("|")[2].strip() == "done" for line in table)
    assert "pre-flight: plan OK" in summary and "compute dtype float32" in summary
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in events if e["type"] == "stage_end"] == STAGES
    assert "plan OK" in (out / "preflight.txt").read_text()


def test_gpu_smoke_records_failed_stages_and_goes_on(tmp_path):
    """Stages that fail are recorded with their `error:` line and the script goes on to the next ones, then
    exits 1 (here every stage fails at once: the model folder does not exist)."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "MMRLHF_LITE_SMOKE_EXTRA": f"model.path={tmp_path / 'no-such-model'}"}
    res = subprocess.run(["bash", "scripts/gpu-smoke.sh", "--dry", "--run-dir", str(tmp_path / "run")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    records = [json.loads(x) for x in (out / "smoke.jsonl").read_text().splitlines()]
    pre = next(r for r in records if r["kind"] == "preflight")
    assert pre["status"] != "plan OK" and "path not found" in pre["error"]
    stages = {r["stage"]: r for r in records if r["kind"] == "stage"}
    assert list(stages) == STAGES                      # every stage was tried
    for r in stages.values():
        assert r["status"] == "exit 2" and "path not found" in r["error"] and "no-such-model" in r["error"]
    summary = (out / "summary.md").read_text()
    assert "## Errors" in summary and summary.count("path not found") >= len(STAGES)
