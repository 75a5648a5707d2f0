"""Training jobs as run folders: start, stop, resume and the state of each, read from files only.

A job is the CLI in a subprocess (DESIGN.md, "One code path"): start writes `<run>/recipe.yaml` and
launches `python -m mmrlhf_lite.train <run>/recipe.yaml run.dir=<run>` in its own session, appending
its output to `<run>/console.log`. Its state is never kept in the browser or the app's memory: the
run's lock file (`RunDir.running_pid`), `ui_job.json` (the pid the UI launched, for the seconds before
the CLI takes the lock) and `events.jsonl` (run_start / run_end) say whether it runs and how it ended.
So a reloaded page, a second tab, or a restarted app finds the same jobs. Stop writes the STOP file
(the trainers checkpoint and exit with code 3); Resume launches the same command again, with
the same processes and sharding (kept in `ui_job.json`; finished stages are skipped, training resumes from its
checkpoint).

    python app.py            # Train tab -> Start / Stop / Resume
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..events import EVENTS_FILE, read_events
from ..runs import LOCK_FILE, RunDir, process_start, same_process, write_atomic
from .safety import Refused, inside, safe_name

JOB_FILE = "ui_job.json"
LAUNCH_MARK = "launched: "
CONSOLE_LOG = "console.log"
RECIPE_FILE = "recipe.yaml"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
_children: dict[int, subprocess.Popen] = {}  # processes this app launched (reaped so they never linger)
_children_lock = threading.Lock()


@dataclass
class JobState:
    status: str            # new | starting | running | stopping | done | stopped | error | interrupted
    pid: int | None = None
    message: str = ""      # the readable error, when status is error / interrupted

    @property
    def active(self) -> bool:
        return self.status in ("starting", "running", "stopping")

    @property
    def resumable(self) -> bool:
        return self.status in ("stopped", "error", "interrupted")


# --------------------------------------------------------------------------------------------------
# listing

def list_runs(runs_root: str | os.PathLike) -> list[str]:
    """Run folder names under the root, newest made first (a run folder holds a recipe or events). The order is
    by the oldest of those files, not the newest: a run that writes events must not move while the list is
    open (two runs writing in turn swapped places under the pointer, and a click picked the other run)."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and not d.is_symlink() and not d.name.startswith("."):
            marker = [d / f for f in (EVENTS_FILE, RECIPE_FILE, JOB_FILE) if (d / f).exists()]
            if marker:
                found.append((min(f.stat().st_mtime for f in marker), d.name))
    return [name for _, name in sorted(found, reverse=True)]


def run_path(runs_root: str | os.PathLike, name: str) -> Path:
    """The folder of run `name`, refused unless it is a direct child of the runs root."""
    path = inside(runs_root, safe_name(name, what="run name"), what="run")
    if path.parent != Path(runs_root).resolve():
        raise Refused(f"run '{name}' is not a folder directly under the runs root")
    return path


# --------------------------------------------------------------------------------------------------
# state

def _proc_alive(pid: int | None, start: int | None = None) -> bool:
    """Alive and really our trainer: a reused pid does not count, whether another program's or another
    trainer's (the suite, or a second UI, runs many). `start`, the launch's `process_start` when recorded,
    tells the launched process from a later one with its pid; without it, the command line must be a trainer's."""
    if not pid or not 0 < pid < 1 << 31:
        return False
    with _children_lock:
        child = _children.get(pid)
    if child is not None and child.poll() is not None:  # reap: a zombie would look alive to kill(0)
        with _children_lock:
            _children.pop(pid, None)
        return False
    if not same_process(pid, start):
        return False
    cmdline = command_line(pid, ours=child is not None)
    return cmdline if isinstance(cmdline, bool) else b"mmrlhf_lite.train" in cmdline


def command_line(pid: int, *, ours: bool) -> bytes | bool:
    """The NUL-separated command line of a live `pid` (the caller checks it is the program it launched), False
    when no such process runs, or `ours` where the command line cannot tell: between fork and exec (just
    launched: empty for a moment), a zombie, or no /proc (not Linux) -- our own child counts as alive then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = _cmdline(pid)
    except OSError:
        return ours
    return cmdline or ours


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _job(run: Path) -> dict:
    """ui_job.json, or {} when it is missing or damaged (not JSON, not an object, fields of other types)."""
    try:
        job = json.loads((run / JOB_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(job, dict):
        return {}
    pid, started, stop = job.get("pid"), job.get("started", 0), job.get("stop_requested", 0)
    if not all(v is None or type(v) is int for v in (pid, job.get("proc_start"))) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in (started, stop)):
        return {}
    return job


def _last_run(run: Path, events: list[dict] | None = None) -> tuple[dict | None, dict | None, str]:
    """(last run_start, its run_end or None, last error message) from the event stream."""
    if events is None:
        events, _ = read_events(run)
    start = end = None
    error = ""
    for e in events:
        if e.get("type") == "run_start":
            start, end, error = e, None, ""
        elif e.get("type") == "run_end":
            end = e
            error = e.get("message") or error
        elif e.get("type") == "error":
            error = e.get("message") or error
    return start, end, error


def console_error(run: Path) -> str:
    """The latest launch's readable failure from console.log: the CLI's `error: ...` line, or the last
    line of a Python traceback (never the trace itself)."""
    text = tail_text(run / CONSOLE_LOG, 16_000)
    text = text.rsplit(LAUNCH_MARK, 1)[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    marked = [ln for ln in lines if ln.startswith(("error:", "stopped:", "interrupted"))]
    if marked:
        return marked[-1]
    if any(ln.startswith("Traceback") for ln in lines) and _EXC_LINE.match(lines[-1]):
        return f"error: {lines[-1]}"
    return ""


def job_state(run: str | os.PathLike, events: list[dict] | None = None) -> JobState:
    """How the run's latest job stands; `events` (already read, e.g. by an EventTail) saves a re-read."""
    run = Path(run)
    lock_pid = RunDir(run).running_pid() if (run / LOCK_FILE).exists() else None
    job = _job(run)
    launched = job.get("pid")
    start, end, error = _last_run(run, events)
    launched_at = job.get("started", 0)
    if lock_pid and _proc_alive(lock_pid) or _proc_alive(launched, job.get("proc_start")):
        stopping = RunDir(run).stop_requested() or job.get("stop_requested", 0) > launched_at
        # without the lock, the launch is "starting" only until its CLI began: a CLI that released its lock
        # and is finishing (writing its last events, exiting) is still running, never starting again
        began = start is not None and start["time"] >= launched_at - 1
        status = "stopping" if stopping else ("running" if lock_pid or began else "starting")
        return JobState(status, lock_pid or launched)
    if start is None or (launched_at and start["time"] < launched_at - 1):
        # the latest launch never reached run_start: a recipe / run-folder error, or killed early
        msg = console_error(run)
        if job:
            return JobState("error" if msg.startswith("error") else "interrupted", None,
                            msg or "the job exited before it started (see console.log)")
        return JobState("new")
    if end is None:
        return JobState("interrupted", None, console_error(run) or
                        "the process ended without finishing (killed?); Resume continues from the last checkpoint")
    status = end.get("status", "error")
    if status == "error":
        return JobState("error", None, error or console_error(run) or "the run failed")
    return JobState(status)


# --------------------------------------------------------------------------------------------------
# start / stop / resume

NO_SHARDING = "none"
FSDP2 = "fsdp2"
SHARDINGS = (NO_SHARDING, FSDP2)
# what `accelerate launch --config_file recipes/accelerate/fsdp2.yaml` sets; under torchrun the same two
# variables make the trainers shard the base over the processes (docs/distributed.md)
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def launch_command(run: Path, processes: int = 1) -> list[str]:
    """The CLI command of a run; with processes > 1 the same command under torchrun (one node,
    docs/distributed.md). FSDP2 is the same command with `launch_env`'s variables."""
    cli = ["-m", "mmrlhf_lite.train", str(run / RECIPE_FILE), f"run.dir={run}"]
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *cli]
    return [sys.executable, *cli]


def check_launch(processes, sharding) -> tuple[int, str]:
    """(processes, sharding) as a launch takes them, or Refused saying what to change."""
    if isinstance(processes, bool) or not isinstance(processes, int):
        raise Refused(f"processes must be a whole number (one process per GPU), got {processes!r}")
    if not 1 <= processes <= 64:
        raise Refused(f"processes must be between 1 and 64 (one per GPU), got {processes}")
    sharding = NO_SHARDING if sharding in (None, "") else sharding
    if sharding not in SHARDINGS:
        raise Refused(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    if sharding == FSDP2 and processes < 2:
        raise Refused("FSDP2 shards the base over the processes: it needs Processes of 2 or more "
                      "(with one process choose sharding 'none')")
    return processes, sharding


def launch_env(processes: int, sharding: str, base: dict | None = None) -> dict[str, str]:
    """The job's environment: `base` (default: the app's) with FSDP2's launch variables set for an FSDP2
    launch and removed otherwise (an app started with them set must not shard a run that did not ask)."""
    env = dict(os.environ if base is None else base)
    for key in FSDP2_ENV:
        env.pop(key, None)
    if sharding == FSDP2 and processes > 1:
        env.update(FSDP2_ENV)
    return env


def launch_label(processes: int, sharding: str) -> str:
    """How a job was launched, as the Live tab and the run list say it: "1 process", "2 processes, DDP",
    "2 processes, FSDP2"."""
    if processes <= 1:
        return "1 process"
    return f"{processes} processes, {'FSDP2' if sharding == FSDP2 else 'DDP'}"


def launch_of(run: Path) -> tuple[int, str]:
    """(processes, sharding) of a run's last launch (Resume launches the same way); (1, "none") when the
    run has no launch record (or a damaged one)."""
    job = _job(run)
    processes, sharding = job.get("processes", 1), job.get("sharding", NO_SHARDING)
    try:
        return check_launch(processes, sharding)
    except Refused:
        return 1, NO_SHARDING


def _processes_of(run: Path) -> int:
    """The process count of a run's last launch (Resume launches the same command)."""
    return launch_of(run)[0]


def _launch(run: Path, processes: int | None = None, sharding: str | None = None) -> int:
    if processes is None:  # Resume: as the last launch
        processes, sharding = launch_of(run)
    processes, sharding = check_launch(processes, sharding)
    cmd = launch_command(run, processes)
    RunDir(run).stop_file.unlink(missing_ok=True)  # a stop asked of the previous launch is done with
    env = launch_env(processes, sharding, dict(os.environ, PYTHONUNBUFFERED="1"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    for key in [k for k in env if k.startswith("GRADIO_")]:
        env.pop(key)
    shown = " ".join(f"{k}={v}" for k, v in FSDP2_ENV.items()) + " " if sharding == FSDP2 else ""
    with open(run / CONSOLE_LOG, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {LAUNCH_MARK}{shown}{' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=str(PROJECT_ROOT))
    with _children_lock:
        _children[proc.pid] = proc
    write_atomic(run / JOB_FILE, json.dumps({"pid": proc.pid, "proc_start": process_start(proc.pid),
                                             "started": time.time(), "command": cmd,
                                             "processes": processes, "sharding": sharding,
                                             "env": {k: env[k] for k in FSDP2_ENV if k in env}}))
    return proc.pid


def start_run(runs_root: str | os.PathLike, name: str, recipe_yaml: str, processes: int = 1,
              sharding: str = NO_SHARDING) -> Path:
    """Create run folder `name`, write the recipe and launch the CLI (under torchrun when processes > 1;
    `sharding` "fsdp2": with the base sharded over them by FSDP2). Refuses an existing folder."""
    check_launch(processes, sharding)
    run = run_path(runs_root, name)
    if run.exists():
        raise Refused(f"run '{name}' already exists; pick another name (or Resume it from the live view)")
    run.mkdir(parents=True)
    write_atomic(run / RECIPE_FILE, recipe_yaml)
    _launch(run, processes, sharding)
    return run


def resume_run(run: str | os.PathLike) -> int:
    run = Path(run)
    state = job_state(run)
    if state.active:
        raise Refused(f"run '{run.name}' is already {state.status}")
    if state.status == "done":
        raise Refused(f"run '{run.name}' has finished; start a new run to train again")
    if not (run / RECIPE_FILE).exists():
        raise Refused(f"run '{run.name}' has no recipe.yaml to resume from")
    return _launch(run)


def stop_run(run: str | os.PathLike) -> str:
    """Ask the job to checkpoint and exit (STOP file). Before the CLI holds the run's lock, its start-up
    would delete a STOP file, so a watcher re-writes it until the job ends."""
    run = Path(run)
    state = job_state(run)
    if not state.active:
        raise Refused(f"run '{run.name}' is not running ({state.status})")
    rd = RunDir(run)
    rd.request_stop()
    job = _job(run)
    if job:
        job["stop_requested"] = time.time()
        write_atomic(run / JOB_FILE, json.dumps(job))
    threading.Thread(target=_keep_stop, args=(run, state.pid), daemon=True).start()
    return (f"stop requested for '{run.name}': the current stage saves a checkpoint and the job exits "
            "(the eval stage finishes first); Resume continues it")


def _keep_stop(run: Path, pid: int | None, timeout: float = 600.0) -> None:
    end = time.time() + timeout
    rd = RunDir(run)
    while time.time() < end and _proc_alive(pid):
        if (run / LOCK_FILE).exists() and not rd.stop_requested():
            rd.request_stop()
        time.sleep(0.3)


def kill_children() -> None:
    """Terminate the jobs this app launched (used by tests and on interpreter exit of test servers)."""
    with _children_lock:
        procs = list(_children.values())
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


# --------------------------------------------------------------------------------------------------
# delete, rename, files to download

def _folder_of(value, runs_root: Path) -> Path | None:
    try:
        return Path(value).resolve() if value else None
    except (TypeError, OSError):
        return None


def dependents(runs_root: str | os.PathLike, run: Path) -> list[str]:
    """Other runs whose recipe reads this run's folder (its reward model as `reward.model_from`, or a
    `cache.dir` inside it): deleting or renaming the run would break them."""
    import yaml

    root, run = Path(runs_root), Path(run).resolve()
    out = []
    for name in list_runs(root):
        if name == run.name:
            continue
        try:
            tree = yaml.safe_load((root / name / RECIPE_FILE).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        for value in ((tree.get("reward") or {}).get("model_from"), (tree.get("cache") or {}).get("dir")):
            folder = _folder_of(value, root)
            if folder is not None and (folder == run or run in folder.parents):
                out.append(name)
                break
    return out


def _idle(run: Path, what: str) -> None:
    """Refuse to touch a run folder whose job is running (or being started or stopped)."""
    state = job_state(run)
    if state.active:
        raise Refused(f"run '{run.name}' is {state.status}: Stop it and wait until it has stopped before you {what} it")
    if (run / LOCK_FILE).exists() and RunDir(run).running_pid():
        raise Refused(f"run '{run.name}' is in use by another process (its run.lock is held); not {what}d")


def folder_size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            try:
                total += (Path(dirpath) / f).lstat().st_size
            except OSError:
                pass
    return total


def delete_run(runs_root: str | os.PathLike, name: str) -> str:
    """Delete a run folder and everything in it; never while its job runs, nor when another run reads it."""
    run = run_path(runs_root, name)
    if not run.is_dir():
        raise Refused(f"run '{name}' does not exist")
    _idle(run, "delete")
    users = dependents(runs_root, run)
    if users:
        raise Refused(f"run '{name}' is read by run(s) {', '.join(users)} (their reward.model_from or cache.dir): "
                      "delete those first")
    size = folder_size(run)
    shutil.rmtree(run)
    return f"deleted run '{name}' ({size / 2**20:.1f} MB)"


def rename_run(runs_root: str | os.PathLike, name: str, new_name: str) -> str:
    """Rename a run folder; its recipe's run.dir (and a cache.dir inside it) follow. Resume, the Live tab and
    the other tabs find it under the new name; never while its job runs, nor when another run reads it."""
    import yaml

    run = run_path(runs_root, name)
    target = run_path(runs_root, new_name)
    if not run.is_dir():
        raise Refused(f"run '{name}' does not exist")
    if target == run:
        raise Refused(f"run '{name}' already has that name")
    if target.exists():
        raise Refused(f"a run named '{new_name}' exists already; pick another name")
    _idle(run, "rename")
    users = dependents(runs_root, run)
    if users:
        raise Refused(f"run '{name}' is read by run(s) {', '.join(users)} (their reward.model_from or cache.dir) "
                      "through its folder's name: renaming it would break them")
    run.rename(target)
    recipe = target / RECIPE_FILE
    if recipe.exists():
        try:
            tree = yaml.safe_load(recipe.read_text()) or {}
        except yaml.YAMLError:
            tree = None
        if isinstance(tree, dict):
            tree.setdefault("run", {})["dir"] = str(target)
            cache = (tree.get("cache") or {}).get("dir")
            if cache and _folder_of(cache, Path(runs_root)) is not None and str(cache).startswith(str(run)):
                tree["cache"]["dir"] = str(target) + str(cache)[len(str(run)):]
            write_atomic(recipe, yaml.safe_dump(tree, sort_keys=False))
    return f"renamed run '{name}' to '{new_name}'"


RUN_FILES = (("console.log", "console.log"), ("train.log", "train.log"), ("eval/report.md", "report.md"),
             ("eval/report.json", "report.json"))


def run_files(run: Path, out_dir: str | os.PathLike) -> list[Path]:
    """Copies of a run's log and evaluation report (those it has), named `<run>-<file>`, in a fresh folder of
    `out_dir` (what the page offers to download: the app never serves a run folder itself)."""
    import tempfile

    present = [(run / src, dst) for src, dst in RUN_FILES if (run / src).is_file()]
    if not present:
        raise Refused(f"run '{run.name}' has no log or report yet")
    folder = Path(tempfile.mkdtemp(prefix="run-files-", dir=str(out_dir)))
    out = []
    for src, dst in present:
        path = folder / f"{run.name}-{dst}"
        shutil.copyfile(src, path)
        out.append(path)
    return out


# --------------------------------------------------------------------------------------------------
# logs

def tail_text(path: str | os.PathLike, max_bytes: int = 32_000) -> str:
    """The end of a text file; terminal progress redraws (`\\r`) collapse to their last state."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes:
        text = text.split("\n", 1)[-1]
    lines = [ln.rstrip("\r").rsplit("\r", 1)[-1] for ln in text.split("\n")]
    return "\n".join(_ANSI.sub("", ln) for ln in lines)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")
