"""One progress/metrics event stream per run: `events.jsonl` in the run folder.

The CLI writes it (and mirrors it to tqdm bars in the terminal), the UI and notebooks read it with
`read_events`. One JSON object per line, always with `time` and `type`:

    {"time": 1732540000.1, "type": "stage_start", "stage": "reward"}
    {"time": ..., "type": "progress", "stage": "reward", "n": 12, "total": 80, "unit": "step"}
    {"time": ..., "type": "metrics", "stage": "reward", "step": 12, "loss": 0.61, "reward_accuracy": 0.7}
    {"time": ..., "type": "warning", "stage": "data", "message": "..."}
    {"time": ..., "type": "error", "stage": "dpo", "message": "..."}
    {"time": ..., "type": "stage_end", "stage": "reward", "status": "done|stopped|error", "seconds": 81.2}

    python -m mmrlhf_lite.train recipes/demo.yaml   # writes runs/demo/events.jsonl
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

EVENTS_FILE = "events.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe values: tensors/numpy scalars to floats, NaN/inf to None."""
    if hasattr(value, "tolist") and callable(value.tolist):  # tensors and numpy values of any shape
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventLog:
    """Append-only writer of `events.jsonl`; optionally mirrors progress to tqdm in the terminal. A process
    killed while writing leaves a torn last line: the next writer cuts it before its first append (as the
    caches do), so the line it appends is not glued to it and every line stays readable."""

    def __init__(self, run_dir: str | os.PathLike | None, *, echo: bool = True):
        self.path = Path(run_dir) / EVENTS_FILE if run_dir is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self._bars: dict[str, Any] = {}
        self.stage: str | None = None
        self._tail_checked = False
        self.tags: dict[str, Any] = {}

    def tagged(self, **tags: Any) -> "EventLog":
        """A view writing to the same stream (and terminal bars) whose every event also carries `tags`, e.g.
        `round=2` for the events of an online round's steps."""
        view = copy.copy(self)
        view.tags = {**self.tags, **tags}
        return view

    def emit(self, type: str, **fields: Any) -> dict:
        event = {"time": round(time.time(), 3), "type": type}
        fields = {**self.tags, **fields}
        if "stage" not in fields and self.stage is not None:
            fields["stage"] = self.stage
        event.update(_clean(fields))
        if self.path is not None:
            with open(self.path, "a+b") as fh:
                if not self._tail_checked:
                    cut_torn_tail(fh)
                    self._tail_checked = True
                fh.write((json.dumps(event) + "\n").encode("utf-8"))
        if self.echo:
            self._echo(event)
        return event

    # ----- convenience
    def progress(self, n: int, total: int | None, unit: str = "it", **extra: Any) -> None:
        self.emit("progress", n=int(n), total=None if total is None else int(total), unit=unit, **extra)

    def metrics(self, step: int | None = None, **values: Any) -> None:
        self.emit("metrics", step=step, **values)

    def warning(self, message: str, **extra: Any) -> None:
        self.emit("warning", message=message, **extra)

    def error(self, message: str, **extra: Any) -> None:
        self.emit("error", message=message, **extra)

    def info(self, message: str, **extra: Any) -> None:
        self.emit("log", message=message, **extra)

    @contextlib.contextmanager
    def stage_run(self, name: str, **extra: Any) -> Iterator["EventLog"]:
        """stage_start ... stage_end(status, seconds); an exception ends the stage with status `error`."""
        previous, self.stage = self.stage, name
        start = time.time()
        self.emit("stage_start", **extra)
        status = "done"
        try:
            yield self
        except StageStopped:
            status = "stopped"
            raise
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised
            status = "error"
            self.error(str(exc) or type(exc).__name__, kind=type(exc).__name__)
            raise
        finally:
            self._close_bar(name)
            self.emit("stage_end", status=status, seconds=round(time.time() - start, 2))
            self.stage = previous

    # ----- terminal mirror
    def _echo(self, event: dict) -> None:
        kind, stage = event["type"], event.get("stage") or "-"
        if kind == "progress":
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover
                return
            bar = self._bars.get(stage)
            if bar is None or (event.get("total") and bar.total != event["total"]):
                self._close_bar(stage)
                bar = self._bars[stage] = tqdm(total=event.get("total"), desc=stage, unit=event.get("unit", "it"),
                                               dynamic_ncols=True, leave=True, file=sys.stderr)
            bar.n = event["n"]
            post = {k: v for k, v in event.items() if k not in ("time", "type", "stage", "n", "total", "unit")}
            if post:
                bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in post.items()},
                                refresh=False)
            bar.refresh()
        elif kind == "metrics":
            vals = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in event.items() if k not in ("time", "type", "stage"))
            self._write(f"[{stage}] {vals}")
        elif kind in ("warning", "error"):
            self._write(f"[{stage}] {kind.upper()}: {event.get('message')}")
        elif kind == "log":
            self._write(f"[{stage}] {event.get('message')}")
        elif kind == "stage_start":
            self._write(f"== stage {stage} ==")
        elif kind == "stage_end":
            self._write(f"== stage {stage}: {event.get('status')} in {event.get('seconds')} s ==")

    def _write(self, line: str) -> None:
        bar = next(iter(self._bars.values()), None)
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _close_bar(self, stage: str) -> None:
        bar = self._bars.pop(stage, None)
        if bar is not None:
            bar.close()


def cut_torn_tail(fh, block: int = 1 << 16) -> int:
    """Truncate a binary file open for appending after its last newline (a torn last line: an interrupted
    write); returns the bytes cut."""
    size = fh.seek(0, os.SEEK_END)
    end = size
    while end > 0:
        start = max(0, end - block)
        fh.seek(start)
        newline = fh.read(end - start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    else:
        keep = 0
    if keep < size:
        fh.truncate(keep)
    fh.seek(0, os.SEEK_END)
    return size - keep


class StageStopped(Exception):
    """Raised when a stop was requested and the stage saved its state: the run can be resumed."""


_NUMBER = (int, float)
# field -> allowed types, for the fields the readers (UI runs table, live view, notebooks) compute with
EVENT_FIELDS: dict[str, tuple[type, ...]] = {
    "stage": (str,), "n": _NUMBER, "total": _NUMBER, "step": (int,), "seconds": _NUMBER, "status": (str,),
    "unit": (str,), "tokens": _NUMBER, "gpu_mem_gb": _NUMBER, "stages": (list,), "skip": (list,),
}


def event_problem(value: Any) -> str | None:
    """Why a parsed line cannot be an event (None when it can): an object with a finite number `time`, a
    string `type`, and the typed fields above either absent, null or of their type."""
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, not an object"
    t = value.get("time")
    if not isinstance(t, _NUMBER) or isinstance(t, bool) or not math.isfinite(t):
        return "no number 'time'"
    if not isinstance(value.get("type"), str):
        return "no string 'type'"
    for name, kinds in EVENT_FIELDS.items():
        v = value.get(name)
        if v is not None and (not isinstance(v, kinds) or isinstance(v, bool)
                              or isinstance(v, float) and not math.isfinite(v)):
            return f"field '{name}' is not {' or '.join(k.__name__ for k in kinds)}"
        if isinstance(v, list) and not all(isinstance(x, str) for x in v):
            return f"field '{name}' is not a list of stage names"
    return None


def read_events(run_dir: str | os.PathLike, offset: int = 0, damaged: list[str] | None = None
                ) -> tuple[list[dict], int]:
    """Events appended since byte `offset`, and the new offset (for tailing a live run).

    A partially written last line is left for the next call. A line that cannot be an event (not UTF-8,
    not JSON, not an object, a field of the wrong type: `event_problem`) is skipped, and described in
    `damaged` when a list is given ("byte N: why"), so a reader can show the run as damaged.
    """
    path = Path(run_dir) / EVENTS_FILE
    if not path.exists():
        return [], offset
    events = []
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError as exc:  # a folder named events.jsonl, no permission: nothing readable
        if damaged is not None:
            damaged.append(f"{path} cannot be read ({exc.strerror or exc})")
        return [], offset
    end = data.rfind(b"\n") + 1
    pos = offset
    for line in data[:end].split(b"\n")[:-1]:
        at, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            problem = event_problem(value)
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except (ValueError, RecursionError):
            problem = "not JSON"
        if problem is None:
            events.append(value)
        elif damaged is not None:
            damaged.append(f"byte {at}: {problem}")
    return events, offset + end
