"""Killing the CLI never loses work: SIGKILL mid-training resumes from the last checkpoint; SIGTERM (what
`kill` and job schedulers send) saves a checkpoint and exits with code 3; re-running finishes the run."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from run_support import wait_for_dpo_step
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline

REPO = Path(__file__).resolve().parents[1]
ARGS = ["model.path=tiny:qwen2_vl:xs", "model.load_in_4bit=false", "model.device=cpu", "data.demo.groups=12",
        "data.demo.image_size=56", "data.eval_fraction=0", "dpo.margin_source=none", "dpo.w=0",
        "dpo.train.groups_per_step=1", "dpo.train.grad_accum=1", "dpo.train.max_steps=16",
        "dpo.train.save_steps=4", "dpo.train.logging_steps=1"]


def _complete(checkpoint: Path) -> bool:
    from mmrlhf_lite.training import CHECKPOINT_COMPLETE
    return (checkpoint / CHECKPOINT_COMPLETE).exists()


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mmrlhf_lite.train", str(run_dir.parent / "recipe.yaml"), "--stages", "dpo", "-q"]


def _cli(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(_command(run_dir), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

def test_sigkill_then_sigterm_then_finish(tmp_path):
    run_dir = tmp_path / "run"
    recipe = load_recipe(None, ARGS + [f"run.dir={run_dir}"])
    recipe.save(tmp_path / "recipe.yaml")
    run_pipeline(recipe, ["reference"], echo=False)

    proc = _cli(run_dir)
    wait_for_dpo_step(run_dir, 5, proc, offset=(run_dir / "events.jsonl").stat().st_size)   # checkpoint-4 written
    proc.send_signal(signal.SIGKILL)          # no chance to save anything
    proc.wait(timeout=60)
    # a kill can land mid-save: only checkpoints marked complete are resumable
    checkpoints = [int(p.name.split("-")[1]) for p in (run_dir / "dpo" / "checkpoints").glob("checkpoint-*")
                   if _complete(p)]
    assert checkpoints and max(checkpoints) >= 4
    latest = max(checkpoints)

    offset = (run_dir / "events.jsonl").stat().st_size
    proc = _cli(run_dir)                       # same command: resumes
    wait_for_dpo_step(run_dir, latest + 3, proc, offset=offset)
    proc.send_signal(signal.SIGTERM)           # clean stop: checkpoint, exit 3
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    assert "Run the same command again to resume" in out
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    resumed = [e["message"] for e in events if e["type"] == "log" and "resuming from" in e.get("message", "")]
    assert resumed and resumed[0].endswith(f"checkpoint-{latest}")
    stopped = [e for e in events if e["type"] == "stage_end" and e["status"] == "stopped"]
    assert len(stopped) == 1
    last_ckpt = max(int(p.name.split("-")[1]) for p in (run_dir / "dpo" / "checkpoints").glob("checkpoint-*"))
    assert last_ckpt >= latest + 3             # the step SIGTERM interrupted was saved too

    # the rest of the run (in-process: the CLI's resume was seen above; this proves the stopped run finishes)
    offset = (run_dir / "events.jsonl").stat().st_size
    run_pipeline(recipe, ["dpo"], echo=False)
    assert (run_dir / "dpo" / "final" / "adapter_config.json").exists()
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_bytes()[offset:].decode().splitlines()]
    assert any(e["type"] == "log" and e["message"].endswith(f"checkpoint-{last_ckpt}") for e in events)
    assert json.loads((run_dir / "dpo" / "train_result.json").read_text())["steps"] == 16
