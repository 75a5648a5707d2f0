"""Collation in DataLoader workers (`train.dataloader_workers`, on by default on CUDA): forced on here on the CPU,
the steps see the same batches in the same order as without workers, and a run killed mid-training (SIGKILL, no
chance to save) resumes to the same weights as an uninterrupted run without workers.

    python -m pytest -q tests/test_collation_workers.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from run_support import wait_for_dpo_step
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline
from mmrlhf_lite.training import dataloader_workers

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
ARGS = ["model.path=tiny:qwen2_vl:xs", "model.load_in_4bit=false", "model.device=cpu", "data.demo.groups=12",
        "data.demo.image_size=56", "data.eval_fraction=0", "data.demo.safety_fraction=0", "dpo.margin_source=none",
        "dpo.w=0", "dpo.train.groups_per_step=2", "dpo.train.grad_accum=1", f"dpo.train.max_steps={STEPS}",
        "dpo.train.logging_steps=1", "dpo.train.save_steps=2", "dpo.train.learning_rate=1e-3"]


def _recipe(tmp: Path, name: str, workers: int):
    return load_recipe(None, ARGS + [f"dpo.train.dataloader_workers={workers}", f"run.dir={tmp / name}",
                                     f"cache.dir={tmp / 'cache'}"])


def _step_metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["type"] == "metrics" and e.get("stage") == "dpo" and "loss" in e:
            out[e["step"]] = e
    return out


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "dpo" / "final" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One folder with a shared reference cache and the uninterrupted run without workers (`plain`)."""
    tmp = tmp_path_factory.mktemp("workers")
    run_pipeline(_recipe(tmp, "plain", 0), ["reference", "dpo"], echo=False)
    return tmp


def test_auto_is_workers_on_cuda_only(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert dataloader_workers(None, torch.device("cpu")) == 0
    assert dataloader_workers(None, torch.device("cuda")) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")        # 2 cores per rank: one for the rank, one worker
    assert dataloader_workers(None, torch.device("cuda")) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert dataloader_workers(None, torch.device("cuda")) == 0
    assert dataloader_workers(3, torch.device("cpu")) == 3


def test_workers_collate_the_same_batches_in_the_same_order(runs):
    """Every step's loss, log-probs and token count, and the final adapter, equal those of the run without
    workers; the batches were collated in the worker processes (their collation time is off the step's path)."""
    run_pipeline(_recipe(runs, "workers", 2), ["dpo"], echo=False)
    plain, workers = _step_metrics(runs / "plain"), _step_metrics(runs / "workers")
    assert sorted(plain) == sorted(workers) == list(range(1, STEPS + 1))
    for step in plain:
        for key in ("loss", "logp_chosen", "logp_rejected", "tokens"):
            assert workers[step][key] == plain[step][key], (step, key)
        assert workers[step]["collate_s"] > 0 and plain[step]["collate_s"] > 0
    a, b = _adapter(runs / "plain"), _adapter(runs / "workers")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)   # it trained


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out

def test_a_killed_run_with_workers_resumes_to_the_same_weights(runs):
    """SIGKILL after step 5 (checkpoints every 2 steps), then the resume: the final adapter equals the
    uninterrupted run's, and the killed run's worker processes did not outlive it."""
    run_dir = runs / "killed"
    recipe = _recipe(runs, "killed", 2)
    recipe.save(runs / "killed.yaml")
    command = [sys.executable, "-m", "mmrlhf_lite.train", str(runs / "killed.yaml"), "--stages", "dpo", "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_dpo_step(run_dir, 5, proc)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers               # the collating workers run beside the step
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    deadline = time.time() + 60                          # workers notice the dead parent and exit
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.1)
    left = [w for w in workers if Path(f"/proc/{w}").exists()]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"worker processes {left} outlived the killed run"
    assert not (run_dir / "dpo" / "final").exists()
    run_pipeline(recipe, ["dpo"], echo=False)    # the resume, in-process (the same pipeline the command runs)
    resumed = [json.loads(x)["message"] for x in (run_dir / "events.jsonl").read_text().splitlines()
               if "resuming from" in x]
    assert resumed and resumed[-1].endswith(("checkpoint-4", "checkpoint-6"))
    a, b = _adapter(runs / "plain"), _adapter(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
