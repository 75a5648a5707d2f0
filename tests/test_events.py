"""The run's event stream: JSONL format, tailing with a partial last line, stage statuses.

    python -m pytest -q tests/test_events.py
"""
from __future__ import annotations

import json

import pytest
import torch

from mmrlhf_lite.events import EVENTS_FILE, EventLog, StageStopped, read_events


def lines(run_dir):
    return [json.loads(x) for x in (run_dir / EVENTS_FILE).read_text().splitlines()]


def test_one_json_object_per_line_with_time_type_and_stage(tmp_path):
    log = EventLog(tmp_path, echo=False)
    log.emit("run_start", stages=["reward"])
    with log.stage_run("reward"):
        log.progress(3, 10, unit="step", loss=0.5)
        log.metrics(step=3, loss=torch.tensor(0.25), accuracy=float("nan"), extra={"x": float("inf")})
        log.warning("careful")
        log.info("hello", stage="data")
    events = lines(tmp_path)
    assert [e["type"] for e in events] == ["run_start", "stage_start", "progress", "metrics", "warning", "log",
                                           "stage_end"]
    assert all(isinstance(e["time"], float) for e in events)
    assert "stage" not in events[0]
    assert events[2] == {"time": events[2]["time"], "type": "progress", "stage": "reward", "n": 3, "total": 10,
                         "unit": "step", "loss": 0.5}
    # tensors become numbers, NaN/inf become null (valid JSON for the UI)
    assert events[3]["loss"] == 0.25 and events[3]["accuracy"] is None and events[3]["extra"] == {"x": None}
    assert events[4]["message"] == "careful" and events[4]["stage"] == "reward"
    assert events[5]["stage"] == "data"  # an explicit stage wins over the current one
    assert events[6]["status"] == "done" and events[6]["seconds"] >= 0
    # strict JSON: no NaN literals anywhere in the file
    assert "NaN" not in (tmp_path / EVENTS_FILE).read_text()


def test_no_run_dir_writes_nothing(tmp_path):
    log = EventLog(None, echo=False)
    event = log.emit("log", message="x")
    assert event["message"] == "x" and log.path is None
    assert list(tmp_path.iterdir()) == []


def test_stage_error_is_recorded_and_reraised(tmp_path):
    log = EventLog(tmp_path, echo=False)
    with pytest.raises(ValueError, match="bad data"):
        with log.stage_run("dpo"):
            raise ValueError("bad data")
    events = lines(tmp_path)
    assert [(e["type"], e.get("status")) for e in events] == [("stage_start", None), ("error", None),
                                                             ("stage_end", "error")]
    assert events[1]["message"] == "bad data" and events[1]["kind"] == "ValueError" and events[1]["stage"] == "dpo"
    assert log.stage is None  # the stage context is restored


def test_stage_stop_is_status_stopped_not_error(tmp_path):
    log = EventLog(tmp_path, echo=False)
    with pytest.raises(StageStopped):
        with log.stage_run("reward"):
            raise StageStopped("checkpoint saved")
    events = lines(tmp_path)
    assert [e["type"] for e in events] == ["stage_start", "stage_end"]
    assert events[1]["status"] == "stopped"


def test_read_events_tails_and_leaves_a_partial_line(tmp_path):
    assert read_events(tmp_path) == ([], 0)  # no file yet
    log = EventLog(tmp_path, echo=False)
    log.emit("a", n=1)
    log.emit("b", n=2)
    events, offset = read_events(tmp_path)
    assert [e["type"] for e in events] == ["a", "b"]
    assert offset == (tmp_path / EVENTS_FILE).stat().st_size
    # a writer in the middle of a line: nothing new yet, offset unchanged
    with open(tmp_path / EVENTS_FILE, "a") as fh:
        fh.write('{"time": 1.0, "type": "c", "n"')
    assert read_events(tmp_path, offset) == ([], offset)
    with open(tmp_path / EVENTS_FILE, "a") as fh:
        fh.write(': 3}\nnot json\n{"time": 2.0, "type": "d"}\n')
    events, new_offset = read_events(tmp_path, offset)
    assert events == [{"time": 1.0, "type": "c", "n": 3}, {"time": 2.0, "type": "d"}]  # the corrupt line skipped
    assert new_offset == (tmp_path / EVENTS_FILE).stat().st_size
    assert read_events(tmp_path, new_offset) == ([], new_offset)


def test_echo_writes_readable_lines_to_stderr(tmp_path, capsys):
    log = EventLog(tmp_path, echo=True)
    with log.stage_run("score"):
        log.metrics(step=2, loss=0.123456)
        log.warning("slow")
    err = capsys.readouterr().err
    assert "== stage score ==" in err
    assert "[score] step=2 loss=0.1235" in err
    assert "[score] WARNING: slow" in err
    assert "== stage score: done in " in err
