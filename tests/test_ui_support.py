"""Helpers shared by the UI tests (no tests here): start `python app.py` on a free port with temp roots,
wait for it, and always stop it and every training job it launched.

    python -m pytest -q tests/test_ui_api.py
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# tiny settings: every stage runs in seconds on the tiny model (the lead's demo numbers may change)
TINY = {
    "model": {"load_in_4bit": False},
    "reward": {"critique_mode": "none", "max_new_tokens": 4,
               "train": {"max_steps": 3, "grad_accum": 1, "logging_steps": 1, "save_steps": 1000}},
    "dpo": {"train": {"max_steps": 3, "grad_accum": 1, "logging_steps": 1, "save_steps": 1000}},
    "eval": {"critique_modes": ["none"], "policy_samples": 0, "max_new_tokens": 4},
}
# a reward-only run long enough to be stopped and resumed
# long enough that a Stop clicked once its first curve point is written lands mid-run on a loaded machine (at 6
# steps, about 4 s of training, the run sometimes finished before the stop was seen; at 30, 16 s of training
# at a load of about 5, the click waited for the page to show the point and landed 15 s after it: too late)
LONG_STEPS = 60
LONG = {"model": {"load_in_4bit": False},
        "reward": {"critique_mode": "none", "max_new_tokens": 4,
                   "train": {"max_steps": LONG_STEPS, "grad_accum": 2, "logging_steps": 1, "save_steps": 1000}},
        "run": {"stages": ["reward"]}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def write_recipe(path: Path, extra: dict) -> Path:
    tree = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    path.write_text(yaml.safe_dump(merge(tree, extra), sort_keys=False))
    return path


def demo_zip(tmp: Path, groups: int = 20) -> Path:
    """The demo set (data file + images) zipped, as a user would upload it."""
    from mmrlhf_lite.data.demo import write_demo

    data = write_demo(tmp / "demo-src", groups=groups, seed=0)
    out = tmp / "demo-data.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(data.parent.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(data.parent).as_posix())
    return out


@dataclass
class Server:
    url: str
    root: Path
    data: Path
    runs: Path
    recipes: Path
    uploads: Path
    proc: subprocess.Popen

    def log(self) -> str:
        return (self.root / "app.log").read_text(errors="replace")


def start_server(root: Path, *extra_args: str, timeout: float = 90) -> Server:
    port = free_port()
    dirs = {n: root / n for n in ("data", "runs", "recipes", "uploads")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    write_recipe(dirs["recipes"] / "demo.yaml", {})
    write_recipe(dirs["recipes"] / "tiny.yaml", TINY)
    write_recipe(dirs["recipes"] / "long.yaml", LONG)
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(REPO))
    env.pop("MMRLHF_UI_AUTH", None)
    log = open(root / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port),
                             "--data-dir", str(dirs["data"]), "--runs-dir", str(dirs["runs"]),
                             "--recipes-dir", str(dirs["recipes"]), "--upload-dir", str(dirs["uploads"]),
                             *extra_args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    url = f"http://127.0.0.1:{port}/"
    server = Server(url, root, dirs["data"], dirs["runs"], dirs["recipes"], dirs["uploads"], proc)
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"app did not answer within {timeout} s:\n{server.log()}")


def _job_pids(runs: Path) -> list[int]:
    """Trainer processes the app launched for runs under `runs` (checked against /proc: really ours)."""
    pids = []
    for job in runs.glob("*/ui_job.json"):
        try:
            pid = int(json.loads(job.read_text())["pid"])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError):
            continue
        if str(job.parent).encode() in cmd:
            pids.append(pid)
    return pids


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
    for pid in _job_pids(server.runs):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition", detail=None):
    """`predicate()` until truthy; on a timeout an AssertionError with its last value and, when given,
    `detail()` (what the page and the run folders showed then: a failure in CI must say what was going on)."""
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    extra = ""
    if detail is not None:
        try:
            extra = "\n" + str(detail())
        except Exception as exc:  # noqa: BLE001 - the report of a failure must not hide it
            extra = f"\n(detail failed: {exc!r})"
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r}){extra}")


def run_report(runs: Path, *names: str, lines: int = 15) -> str:
    """Each run's job state as the UI reads it, its last events and the tail of its console.log."""
    from mmrlhf_lite.ui import jobs

    out = []
    for name in names:
        run = runs / name
        try:
            state = jobs.job_state(run)
        except Exception as exc:  # noqa: BLE001
            state = f"unreadable: {exc!r}"
        try:
            tail = [json.dumps(e)[:200] for e in events(run)[-lines:]]
        except Exception as exc:  # noqa: BLE001
            tail = [f"events unreadable: {exc!r}"]
        log = run / "console.log"
        console = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(no console.log)"]
        out += [f"--- run {name}: {state}", "events:", *tail, "console.log:", *console]
    return "\n".join(out)


def jobs_report(runs: Path) -> str:
    """Every run under `runs` as the Live tab's timer sees it (whether some run is active keeps it ticking): its
    job state, the pids its ui_job.json and run.lock name, and what each pid runs now."""
    from mmrlhf_lite.runs import process_start
    from mmrlhf_lite.ui import jobs

    def proc(pid) -> str:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
            return f"pid {pid} (start {process_start(pid)}): {cmd}"
        except (OSError, TypeError):
            return f"pid {pid}: not running"

    out = []
    for name in jobs.list_runs(runs):
        run = runs / name
        try:
            state = jobs.job_state(run)
        except Exception as exc:  # noqa: BLE001
            state = f"unreadable: {exc!r}"
        job = jobs._job(run)
        lock = (run / "run.lock").read_text().strip() if (run / "run.lock").exists() else None
        out.append(f"{name}: {state}; ui_job pid {job.get('pid')} start {job.get('proc_start')} -> "
                   f"{proc(job.get('pid'))}; run.lock {lock!r}"
                   + (f" -> {proc(int(lock.split()[0]))}" if lock else ""))
    return "\n".join(out)


def events(run: Path) -> list[dict]:
    from mmrlhf_lite.events import read_events

    return read_events(run)[0]
