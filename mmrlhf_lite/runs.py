"""Run folders: the resolved recipe, events, logs, per-stage status, stop requests, resume.

    runs/demo/
      recipe.yaml          the resolved recipe of the latest invocation
      events.jsonl         progress/metrics/warnings/errors (mmrlhf_lite.events)
      train.log            python logging of the CLI
      stages/<stage>.json  {"status": "done", "inputs": {...}, ...} once a stage has finished
      data/ reward/ cache/ dpo/ eval/   each stage's outputs

A second invocation on the same folder skips finished stages whose inputs are unchanged, resumes
unfinished ones from their checkpoints / caches, and refuses (naming the changed keys) to mix a
finished stage with a changed recipe: nothing finished is ever silently overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from .recipe import STAGES, Recipe, stages_fed

# The recipe keys each stage's results depend on (a change invalidates a finished stage), in pipeline order:
# derived from the recipe fields' `stages` metadata (recipe.py), so a new key says which stages it feeds.
_FED = stages_fed()
STAGE_INPUTS: dict[str, tuple[str, ...]] = {stage: tuple(k for k, fed in _FED.items() if stage in fed)
                                            for stage in STAGES}
# Which finished stages each stage reads (a recomputed input stage makes its finished readers stale).
STAGE_DEPS: dict[str, tuple[str, ...]] = {"score": ("reward",), "dpo": ("score", "reference"), "eval": ("reward", "dpo"),
                                          "rounds": ("reward", "dpo")}
STAGE_DIRS = {"reward": "reward", "score": "score", "reference": "reference", "dpo": "dpo", "eval": "eval",
              "rounds": "rounds"}
STOP_FILE = "STOP"
LOCK_FILE = "run.lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says what to do."""


def _lookup(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def stage_inputs(recipe_dict: dict, stage: str) -> dict:
    """The values of the keys `stage` depends on, by dotted key path (what `stages/<stage>.json` records)."""
    return {k: _lookup(recipe_dict, k) for k in STAGE_INPUTS[stage]}


def _flatten(tree: dict) -> dict:
    """{"model": {"lora_r": 4}, "run.seed": 0} -> {"model.lora_r": 4, "run.seed": 0}: a record of this version is
    flat already; one of an earlier version held whole sections. (A loop, not recursion: a damaged record
    may nest as deep as JSON allows.)"""
    out: dict = {}
    todo = [("", tree)]
    while todo:
        prefix, node = todo.pop()
        if isinstance(node, dict) and node:
            todo += [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items()]
        else:
            out[prefix] = node
    return out


def readers(stages) -> list[str]:
    """`stages` and every stage that reads their outputs, directly or through another (what `--redo` of
    `stages` recomputes when they are all asked for), in pipeline order."""
    out = set(stages)
    for stage in STAGES:  # pipeline order: a stage's inputs come before it
        if any(dep in out for dep in STAGE_DEPS.get(stage, ())):
            out.add(stage)
    return [s for s in STAGES if s in out]


def redo_for(stages) -> list[str]:
    """The fewest stages whose `--redo` recomputes all of `stages`: those not read, directly or through another,
    by one of the others."""
    stages = set(stages)
    return [s for s in STAGES if s in stages and not any(s in readers([o]) for o in stages - {s})]


def cache_dir_of(recipe: Recipe) -> Path:
    """Where a run's caches live: `cache.dir` when set (shared between runs), else `<run.dir>/cache`."""
    return Path(recipe.cache.dir) if recipe.cache.dir else Path(recipe.run.dir) / "cache"


def _read_pid(lock: Path) -> int:
    return _read_lock(lock)[0]


def _read_lock(lock: Path) -> tuple[int, int | None]:
    """(pid, its kernel start time or None) of a lock file `pid time [start]` (-1 when unreadable)."""
    try:
        fields = lock.read_text().split()
        return int(fields[0]), (int(fields[2]) if len(fields) > 2 else None)
    except (OSError, ValueError, IndexError):
        return -1, None


def process_start(pid: int) -> int | None:
    """When process `pid` started, in the kernel's clock ticks since boot (/proc/<pid>/stat, field 22): with the
    pid it names one process for good, where a pid alone is reused once the process exits (pid_max is often
    32768, and every thread takes an id from the same pool: this project's test suite wraps it in about 2.5
    hours on the 2-core development machine). None where there is no /proc or no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start: int | None = None) -> bool:
    """Process `pid` runs, and when `start` (its `process_start`) is known, it is that process, not a later one
    that was given the same pid."""
    if not 0 < pid < 1 << 31:  # a damaged lock file: 0 or a negative pid would signal a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return same_process(pid, start)


def same_process(pid: int, start: int | None) -> bool:
    """False only when the process now holding `pid` started at another time than `start` (both known)."""
    return start is None or (now := process_start(pid)) is None or now == start


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ----- layout
    def stage_dir(self, stage: str) -> Path:
        return self.path / STAGE_DIRS[stage]

    def status_file(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.json"

    def status(self, stage: str) -> dict | None:
        f = self.status_file(stage)
        if not f.exists():
            return None
        try:
            st = json.loads(f.read_bytes())
        except (OSError, ValueError, RecursionError):  # damaged (not JSON, not UTF-8): as if not done
            return None
        return st if isinstance(st, dict) else None

    def is_done(self, stage: str) -> bool:
        st = self.status(stage)
        return bool(st and st.get("status") == "done")

    def mark_done(self, stage: str, recipe: Recipe, **info: Any) -> None:
        f = self.status_file(stage)
        f.parent.mkdir(parents=True, exist_ok=True)
        upstream = {d: self.status(d).get("id") for d in STAGE_DEPS.get(stage, ()) if self.is_done(d)}
        payload = {"status": "done", "finished": time.time(), "id": uuid.uuid4().hex, "upstream": upstream,
                   "inputs": stage_inputs(recipe.to_dict(), stage), **info}
        write_atomic(f, json.dumps(payload, indent=2, default=str))

    def clear(self, stage: str) -> None:
        """Forget a finished stage and delete its outputs (`--redo STAGE`: an explicit request)."""
        self.status_file(stage).unlink(missing_ok=True)
        d = self.stage_dir(stage)
        if d.exists():
            shutil.rmtree(d)

    # ----- consistency with an earlier invocation
    def changed_stages(self, recipe: Recipe) -> dict[str, list[str]]:
        """Finished stages whose recipe inputs differ from `recipe`: stage -> the changed key paths.

        A key a stage's record lacks (recorded by an earlier version, whose records held fewer keys) is
        compared with its value in another finished stage's record, else with its default: the value every
        version before the key existed ran with."""
        now = recipe.to_dict()
        records = {}
        for stage in STAGE_INPUTS:
            st = self.status(stage)
            if st and st.get("status") == "done":
                inputs = st.get("inputs")
                records[stage] = _flatten(inputs) if isinstance(inputs, dict) else {}
        defaults = Recipe().to_dict()
        out = {}
        for stage, recorded in records.items():
            changed = []
            for key, value in stage_inputs(now, stage).items():
                if key in recorded:
                    then = recorded[key]
                else:
                    then = next((r[key] for r in records.values() if key in r), _lookup(defaults, key))
                if then != value:
                    changed.append(key)
            if changed:
                out[stage] = sorted(changed)
        return out

    def stale_stages(self) -> dict[str, str]:
        """Finished stages computed from an input stage that was recomputed (or deleted) since, directly or
        through another stale stage: stage -> why. Stages finished before stages recorded this are trusted."""
        stale: dict[str, str] = {}
        for stage in STAGE_INPUTS:  # in pipeline order, so staleness propagates downstream
            st = self.status(stage)
            if not st or st.get("status") != "done":
                continue
            upstream = st.get("upstream")
            for dep, stamp in (upstream if isinstance(upstream, dict) else {}).items():
                dep_st = self.status(dep)
                if dep in stale:
                    stale[stage] = f"'{dep}' is out of date"
                elif not dep_st or dep_st.get("status") != "done":
                    stale[stage] = f"'{dep}' was deleted after it finished"
                elif dep_st.get("id") != stamp:
                    stale[stage] = f"'{dep}' was recomputed after it finished"
                else:
                    continue
                break
        return stale

    def check_recipe(self, recipe: Recipe, stages: list[str]) -> list[str]:
        """Stages already done with the same inputs (skipped). Raises if a finished stage would be
        reused or overwritten with different inputs."""
        stale = self.stale_stages()  # recomputed when next asked for: their inputs may differ
        changed = {s: keys for s, keys in self.changed_stages(recipe).items() if s not in stale}
        if changed:
            stage, keys = next(iter(changed.items()))  # the first in pipeline order
            raise RunFolderError(changed_message(self.path, stage, keys, redo_for(changed)))
        return [s for s in stages if self.is_done(s)]

    # ----- lock and stop requests
    def acquire(self) -> None:
        """Take the folder for this process. An OS lock (flock) held for the life of the process makes two
        invocations that start at the same moment safe (one gets the folder, the other a clear refusal), and is
        freed by the kernel if the process is killed; the pid written inside serves `running_pid`."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_FILE
        fd = self._lock_os(lock)
        try:
            pid, start = _read_lock(lock)  # a live pid without the OS lock: a process of a version without it
            if pid > 0 and pid != os.getpid() and _pid_alive(pid, start):
                raise RunFolderError(self._in_use(pid))
            me = os.getpid()
            line = f"{me} {time.time()}" + (f" {t}" if (t := process_start(me)) is not None else "") + "\n"
            if fd is None:
                lock.write_text(line)
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, line.encode(), 0)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self._lock_fd = fd
        self.stop_file.unlink(missing_ok=True)

    def _in_use(self, pid: int | None) -> str:
        who = f"process {pid}" if pid else "another process"
        return (f"run folder {self.path} is in use by {who}; wait for it, "
                f"stop it (touch {self.path / STOP_FILE}), or use another run.dir")

    def _lock_os(self, lock: Path) -> int | None:
        """An exclusive non-blocking flock on the lock file itself (None where the OS has no flock)."""
        try:
            import fcntl
        except ImportError:  # Windows: the pid check alone
            return None
        for _ in range(20):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunFolderError(self._in_use(_read_pid(lock) or None)) from None
            try:  # the holder we waited on may have removed the file: lock the one at the path
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise RunFolderError(f"could not lock {lock}: it keeps being replaced")

    def release(self) -> None:
        lock = self.path / LOCK_FILE
        try:
            if lock.exists() and _read_pid(lock) == os.getpid():
                lock.unlink()  # while still holding the OS lock
        except OSError:
            pass
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._lock_fd = None

    def running_pid(self) -> int | None:
        pid, start = _read_lock(self.path / LOCK_FILE)
        return pid if pid > 0 and _pid_alive(pid, start) else None

    @property
    def stop_file(self) -> Path:
        return self.path / STOP_FILE

    def request_stop(self) -> None:
        self.stop_file.parent.mkdir(parents=True, exist_ok=True)
        self.stop_file.write_text(str(time.time()))

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask for a clean stop (checkpoint, then exit); a second SIGINT aborts."""
        def handler(signum, frame):
            if self.stop_requested() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.request_stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. notebooks)
                pass


def changed_message(path: Path, stage: str, changed: list[str], redo: list[str] | None = None) -> str:
    """The refusal for a finished stage whose keys changed. `redo`: the stages whose `--redo` recomputes every
    changed stage (`redo_for`; the stages that read theirs run again with them), default `stage` alone."""
    redo = redo or [stage]
    what = (f"pass --redo {stage} to recompute it (its outputs are deleted)" if redo == [stage] else
            f"pass --redo {','.join(redo)} to recompute them (their outputs are deleted)")
    return (f"run folder {path} has finished stage '{stage}' with different settings "
            f"(changed: {', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); "
            f"use a new run.dir, or {what}")


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file + rename, so a kill or a full disk never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
