"""Helpers for tests that watch a training process through its run folder's events.jsonl."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


def wait_for_dpo_step(run_dir: Path, step: int, proc: subprocess.Popen, *, offset: int = 0,
                      timeout: float = 480) -> None:
    """Wait until the run reports dpo training step `step` in events written after byte `offset` (this process's
    events when the file holds an earlier process's too). Only whole lines are read: the line being written may
    be cut short."""
    path = run_dir / "events.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        if path.exists():
            data = path.read_bytes()[offset:]
            for line in data[:data.rfind(b"\n") + 1].decode().splitlines():
                e = json.loads(line)
                if e["type"] == "progress" and e.get("stage") == "dpo" and e["n"] >= step:
                    return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")
