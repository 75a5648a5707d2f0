"""Helpers for tests that watch a training process through its run folder's events.jsonl, and for tests that run a
command's `main` in the test process."""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


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


@dataclass
class CommandResult:
    """What `python -m <command> ...` would leave: its exit code and its output."""
    returncode: int
    stdout: str
    stderr: str


def run_main(main: Callable[[list[str]], int], args, *, cwd: Path, capsys) -> CommandResult:
    """`main(args)` of a command in this process, as `python -m <command> args` run in `cwd` would (its exit code,
    a SystemExit's included, and what it printed), without a new interpreter's imports (~7 CPU s each). A
    traceback in the output fails. What a command sets for the life of its process is put back afterwards: the
    working directory, the SIGINT/SIGTERM handlers (a run's clean stop), the root logger's handlers and levels
    (a run folder's train.log) and PIL's pixel limit (`data.max_image_pixels`). Tests of the process itself (a
    real exit, signals, a fresh interpreter) start one instead."""
    import logging
    import signal

    from PIL import Image

    root, ours = logging.getLogger(), logging.getLogger("mmrlhf_lite")
    saved_handlers = [(h, h.level) for h in root.handlers]
    saved_levels = (root.level, ours.level)
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved_pixels, saved_cwd = Image.MAX_IMAGE_PIXELS, os.getcwd()
    capsys.readouterr()
    os.chdir(cwd)
    try:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:   # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
    finally:
        os.chdir(saved_cwd)
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        Image.MAX_IMAGE_PIXELS = saved_pixels
        for h in root.handlers[:]:
            if h not in dict(saved_handlers):
                root.removeHandler(h)
                h.close()
        for h, level in saved_handlers:
            h.setLevel(level)
        root.setLevel(saved_levels[0])
        ours.setLevel(saved_levels[1])
    assert "Traceback" not in out.out + out.err, out.err
    return CommandResult(code, out.out, out.err)
