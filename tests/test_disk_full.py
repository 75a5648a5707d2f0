"""A full disk never loses work: the CLI stops with a message that says so (whichever library hit it:
safetensors and torch.save do not raise OSError), and the same command, once there is space, keeps the
finished stages and caches and resumes past a half-written checkpoint.

The end-to-end test fills a real (tmpfs) filesystem, so it needs root to mount one; it is skipped with the
reason elsewhere.

    python -m pytest -q tests/test_disk_full.py
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import disk_full, run_pipeline

REPO = Path(__file__).resolve().parents[1]
ARGS = ["model.path=tiny:qwen2_vl:xs", "model.load_in_4bit=false", "model.device=cpu", "data.demo.groups=12",
        "data.demo.image_size=56", "data.eval_fraction=0", "dpo.margin_source=none", "dpo.w=0",
        "dpo.train.groups_per_step=1", "dpo.train.grad_accum=1", "dpo.train.max_steps=6",
        "dpo.train.save_steps=4", "dpo.train.logging_steps=1"]


def test_disk_full_is_recognised_from_every_writer():
    assert disk_full(OSError(errno.ENOSPC, "No space left on device", "x.bin"))
    assert disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                                  "writing file data/0: file write failed"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise ValueError("saving the checkpoint failed") from inner
    except ValueError as outer:
        assert disk_full(outer)
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(ValueError("image features and image tokens do not match"))


def _can_mount(path: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(path)], check=True)
    return ok


def _cli(recipe: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mmrlhf_lite.train", str(recipe), "--stages", "reference,dpo", "-q"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_full_disk_stops_cleanly_and_the_same_command_resumes(tmp_path, tiny_qwen2_vl_xs):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if not _can_mount(run_dir):
        pytest.skip("needs root and tmpfs mounts to fill a real filesystem")
    recipe = tmp_path / "recipe.yaml"
    load_recipe(None, ARGS + [f"run.dir={run_dir}"]).save(recipe)
    # 200 KiB: the data, the reference cache and the events fit; the first DPO checkpoint does not
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(run_dir)], check=True)
    try:
        full = _cli(recipe)
        assert full.returncode == 1, full.stderr
        assert "error: disk full while writing" in full.stderr and "run the same command again" in full.stderr
        assert "Traceback" not in full.stderr, full.stderr
        status = json.loads((run_dir / "stages" / "reference.json").read_text())
        assert status["status"] == "done"  # reference finished before the disk filled
        # space again: the same recipe and stages keep the reference stage and finish (in-process: the pipeline
        # the command runs, without importing the stack again)
        subprocess.run(["mount", "-o", "remount,size=16m", str(run_dir)], check=True)
        run_pipeline(load_recipe(recipe), ["reference", "dpo"], echo=False)
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        last_start = max(i for i, e in enumerate(events) if e["type"] == "run_start")
        messages = [e.get("message", "") for e in events[last_start:]]
        assert "stage reference already done with these settings; skipped (--redo reference recomputes)" in messages
        assert not [e for e in events[last_start:] if e["type"] == "stage_start" and e.get("stage") == "reference"]
        assert json.loads((run_dir / "stages" / "dpo.json").read_text())["status"] == "done"
        assert (run_dir / "dpo" / "final" / "adapter_model.safetensors").exists()
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], check=False)
