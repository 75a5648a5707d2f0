"""A run's event stream as what the live view shows: stage progress with ETA, curves, messages.

Pure functions of `events.jsonl` (mmrlhf_lite.events): the UI never asks the trainer anything, it
re-reads the file. `EventTail` keeps one growing list per run and reads only the bytes appended since
the last look, so every open tab can poll every second or two at no real cost.

Curves are long-format tables (step, value, series) for gradio's LinePlot. The rounds stage's curves
(`ROUND_CURVES`) are tables (round, value, series) over rounds instead of steps, one point per round's metrics
event (docs/rounds.md). Tokens/s is derived: the
DPO trainer logs `tokens`, the mean packed tokens per micro-batch over the logging window, so a window
of `s - s_prev` optimizer steps processed `tokens * grad_accum * (s - s_prev)` tokens between the
progress events of steps `s_prev` and `s`.

    python -m pytest -q tests/test_ui_units.py
"""
from __future__ import annotations

import html
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..events import EVENTS_FILE, read_events

# plot name -> (title, y label, [(stage, metrics key, series label)])
CURVES: dict[str, tuple[str, str, list[tuple[str, str, str]]]] = {
    "reward_loss": ("Reward model loss", "loss", [("reward", "loss", "total"), ("reward", "bt_loss", "ranking (BT)"),
                                                  ("reward", "critique_loss", "critique CE")]),
    "reward_acc": ("Reward accuracy", "accuracy", [("reward", "pair_accuracy", "train pairs"),
                                                   ("reward", "eval_pair_accuracy_given", "held-out pairs")]),
    "dpo_loss": ("MM-DPO loss", "loss", [("dpo", "loss", "total"), ("dpo", "dpo_loss", "DPO"),
                                         ("dpo", "sft_nll", "SFT NLL")]),
    "dpo_acc": ("DPO implicit accuracy", "accuracy", [("dpo", "implicit_accuracy", "implicit accuracy")]),
    "margins": ("Margins", "margin", [("reward", "reward_margin", "reward margin (reward stage)"),
                                      ("dpo", "implicit_margin", "implicit margin (dpo)"),
                                      ("dpo", "delta_mean", "reward delta of DPO pairs")]),
    "beta": ("Dynamic beta", "beta", [("dpo", "beta_min", "min"), ("dpo", "beta_mean", "mean"),
                                      ("dpo", "beta_max", "max")]),
}
# plot name -> (title, y label, [(metrics key, series label)]): the rounds stage's one metrics event per round
# (`step` = the round, keys `rounds_*`; rounds/__init__.py), grouped by what shares a y axis
ROUND_CURVES: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "rounds_held_out": ("Rounds: held-out answers", "share", [
        ("rounds_right_answers", "right answers"), ("rounds_well_formed", "well-formed"),
        ("rounds_implicit_accuracy", "implicit accuracy")]),
    "rounds_sampled": ("Rounds: the round's sampled answers", "share", [
        ("rounds_sampled_right_answers", "right answers"), ("rounds_sampled_well_formed", "well-formed"),
        ("rounds_sampled_empty", "empty"), ("rounds_sampled_ranker_right", "reward model: right > wrong"),
        ("rounds_sampled_best_right", "reward model's top answer right")]),
    "rounds_reward": ("Rounds: reward model's mean score", "score", [
        ("rounds_reward_score", "held-out answers"), ("rounds_sampled_reward_score", "sampled answers")]),
    "rounds_rank": ("Rounds: reward rank of the held-out answers", "rank (1 = first)", [
        ("rounds_reward_rank", "reward rank")]),
    "rounds_drift": ("Rounds: sampled answers' drift", "nats / words", [
        ("rounds_sampled_kl_to_initial", "KL to pi_0 (nats)"), ("rounds_sampled_length_words", "length (words)")]),
    "rounds_groups": ("Rounds: MM-DPO groups", "count", [
        ("rounds_groups", "groups"), ("rounds_pairs", "pairs"), ("rounds_dropped_degenerate", "dropped: degenerate"),
        ("rounds_dropped_tied", "dropped: tied"), ("rounds_dropped_unknown", "dropped: answer unknown")]),
}
SPEED_CURVES = ("tokens_per_s", "gpu_mem")
STAGE_ORDER = ("data", "reward", "score", "reference", "dpo", "eval")


# --------------------------------------------------------------------------------------------------
# incremental reading

class EventTail:
    """Per run folder: the events read so far and the byte offset to continue from."""

    def __init__(self) -> None:
        self._state: dict[Path, tuple[int, int, list[dict]]] = {}  # run -> (inode, offset, events)
        self._damaged: dict[Path, list[str]] = {}  # run -> the lines of events.jsonl that were skipped
        self._lock = threading.Lock()

    def events(self, run: str | os.PathLike) -> list[dict]:
        run = Path(run)
        path = run / EVENTS_FILE
        try:
            st = path.stat()
        except OSError:
            return []
        with self._lock:
            inode, offset, events = self._state.get(run, (st.st_ino, 0, []))
            damaged = self._damaged.setdefault(run, [])
            if inode != st.st_ino or st.st_size < offset:  # replaced or truncated: start over
                offset, events = 0, []
                damaged.clear()
            if st.st_size > offset:
                new, offset = read_events(run, offset, damaged)
                events = events + new
            self._state[run] = (st.st_ino, offset, events)
            return events

    def damaged(self, run: str | os.PathLike) -> list[str]:
        """The lines of the run's events.jsonl skipped so far (unreadable), as "byte N: why"."""
        with self._lock:
            return list(self._damaged.get(Path(run), []))

    def offset(self, run: str | os.PathLike) -> int:
        with self._lock:
            return self._state.get(Path(run), (0, 0, []))[1]


# --------------------------------------------------------------------------------------------------
# stages

@dataclass
class StageView:
    name: str
    status: str = "pending"     # pending | running | done | stopped | error | skipped
    n: int = 0
    total: int | None = None
    unit: str = ""
    seconds: float | None = None  # the stage's time: every piece since it last started afresh (Stop + Resume)
    rate: float | None = None   # units per second over the last RATE_WINDOW progress events of this attempt
    eta: float | None = None    # seconds left at that rate
    pieces: int = 0             # invocations the stage ran in (2 after one Stop + Resume)
    before: float = 0.0         # seconds of the pieces before the current invocation (running: so far)
    _recent: list[tuple[float, int]] = field(default_factory=list, repr=False)  # (time, n) of this attempt

    @property
    def fraction(self) -> float | None:
        if self.status == "done" or self.status == "skipped":
            return 1.0
        if self.total:
            return min(1.0, self.n / self.total)
        return None


RATE_WINDOW = 6  # progress events (5 intervals) the speed and ETA are taken over: the recent pace, not the
# attempt's average (a resumed attempt's first steps, or a machine that got busier, would mislead it)


def stage_times(events: list[dict]) -> dict[str, tuple[float, int, bool]]:
    """Per stage, over every invocation of the run: (seconds, pieces, done) of its latest attempt.

    A stage stopped and resumed is one attempt in several pieces (each invocation's `stage_end` gives
    the seconds of its piece): its time is their sum. An attempt ends when the stage is done; a later
    `stage_start` (a `--redo`, or a stage recomputed because an input changed) starts a new one."""
    out: dict[str, tuple[float, int, bool]] = {}
    for e in events:
        stage, kind = e.get("stage"), e.get("type")
        if kind == "stage_start" and stage:
            seconds, pieces, done = out.get(stage, (0.0, 0, False))
            out[stage] = (0.0, 0, False) if done else (seconds, pieces, False)
        elif kind == "stage_end" and stage:
            seconds, pieces, _ = out.get(stage, (0.0, 0, False))
            out[stage] = (seconds + (_seconds(e) or 0.0), pieces + 1, e.get("status", "done") == "done")
    return out


def _seconds(event: dict) -> float | None:
    """A stage_end's `seconds` (None when missing or unreadable)."""
    try:
        value = float(event.get("seconds"))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def stage_views(events: list[dict]) -> list[StageView]:
    """The stages of the latest invocation, each with its progress, in run order; each stage's time
    counts the pieces of earlier invocations too (a stage done before a Stop keeps its duration)."""
    start_idx = max((i for i, e in enumerate(events) if e.get("type") == "run_start"), default=None)
    if start_idx is None:
        return []
    run_start = events[start_idx]
    views = {s: StageView(s) for s in run_start.get("stages", [])}
    earlier = stage_times(events[:start_idx])
    for name, v in views.items():
        seconds, pieces, done = earlier.get(name, (0.0, 0, False))
        if name in run_start.get("skip", []):
            v.status = "skipped"
            if done:
                v.seconds, v.pieces = seconds, pieces
        elif not done:  # the pieces of a stopped (or failed) attempt that this invocation continues
            v.before, v.pieces = seconds, pieces
    for e in events[start_idx:]:
        v = views.get(e.get("stage"))
        if v is None:
            continue
        kind = e.get("type")
        if kind == "stage_start":
            v.status, v.n, v.total, v.rate, v.eta, v._recent = "running", 0, None, None, None, []
        elif kind == "progress":
            v.n, v.total, v.unit = int(e.get("n") or 0), e.get("total"), e.get("unit", "")
            if v._recent and v.n < v._recent[-1][1]:
                v._recent = []  # counting started over
            v._recent = (v._recent + [(e["time"], v.n)])[-RATE_WINDOW:]
            (t0, n0), (t1, n1) = v._recent[0], v._recent[-1]
            if t1 > t0 and n1 > n0:
                v.rate = (n1 - n0) / (t1 - t0)
                v.eta = (v.total - v.n) / v.rate if v.total else None
        elif kind == "stage_end":
            v.status, v.eta = e.get("status", "done"), None
            piece = _seconds(e)
            v.seconds = piece if not v.pieces else v.before + (piece or 0.0)
            v.pieces += 1
    return list(views.values())


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _pieces(v: StageView) -> str:
    return f" in {v.pieces} pieces (Stop + Resume)" if v.pieces > 1 else ""


def stage_text(v: StageView) -> str:
    if v.status == "skipped":
        if v.seconds is not None:
            return f"done earlier in {format_duration(v.seconds)}{_pieces(v)}; skipped now: already done with these settings"
        return "skipped: already done with these settings"
    if v.status == "pending":
        return "waiting"
    count = f"{v.n}/{v.total} {v.unit}s" if v.total else (f"{v.n} {v.unit}s" if v.n else "")
    if v.status == "running":
        speed = ""
        if v.rate:
            speed = f"{v.rate:.2f} {v.unit}/s" if v.rate >= 1 else f"{1 / v.rate:.1f} s/{v.unit}"
        before = f"{format_duration(v.before)} before the stop" if v.pieces else ""
        parts = [p for p in (count, speed, f"ETA {format_duration(v.eta)}" if v.eta is not None else "", before) if p]
        return " · ".join(parts) or "starting"
    if v.status == "done":
        return f"done in {format_duration(v.seconds)}{_pieces(v)}" + (f" ({count})" if count else "")
    return f"{v.status} after {format_duration(v.seconds)}{_pieces(v)}" + (f" at {count}" if count else "")


def progress_html(views: list[StageView]) -> str:
    """One bar per stage (plain HTML, every string escaped)."""
    if not views:
        return "<div class='mm-progress'><em>No stage has started yet.</em></div>"
    colours = {"done": "#16a34a", "running": "#2563eb", "stopped": "#d97706", "error": "#dc2626",
               "skipped": "#9ca3af", "pending": "#e5e7eb"}
    rows = []
    for v in views:
        frac = v.fraction
        width = 100 * (frac if frac is not None else (0.3 if v.status == "running" else 0))
        rows.append(
            f"<div class='mm-stage' data-stage='{html.escape(v.name)}' data-status='{html.escape(v.status)}'>"
            f"<span class='mm-stage-name'>{html.escape(v.name)}</span>"
            f"<div class='mm-bar'><div style='width:{width:.1f}%;background:{colours.get(v.status, '#2563eb')}'></div></div>"
            f"<span class='mm-stage-text'>{html.escape(stage_text(v))}</span></div>")
    return "<div class='mm-progress'>" + "".join(rows) + "</div>"


# --------------------------------------------------------------------------------------------------
# curves

def curve_table(rows: list[dict] | None = None) -> pd.DataFrame:
    """(step, value, series) with numeric step and value columns even when empty.

    gradio's LinePlot fixes each axis's scale from the first table it draws and later only swaps the data:
    an empty table with untyped (object) columns makes both axes categorical for good (every value its
    own tick label, no lines). Every curve table the UI hands a plot comes from here."""
    frame = pd.DataFrame(rows or [], columns=["step", "value", "series"])
    return frame.astype({"step": "int64", "value": "float64", "series": "object"})


def series_labels(name: str) -> list[str]:
    """The series one of CURVES can have (its legend)."""
    return [label for _, _, label in CURVES[name][2]]


SPEED_SERIES = ["tokens/s"]
GPU_SERIES = [f"{s} peak GB" for s in STAGE_ORDER]


def with_series(frame: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """`frame` plus one empty row (step and value NaN, which the plot skips) per label it lacks.

    The plot builds its colour scale, like its axes, from the first table it draws; a series missing
    from that table gets no colour later: its line is drawn with no stroke (invisible). Naming every
    series from the start gives each its colour and legend entry."""
    present = set(frame["series"])
    missing = [label for label in dict.fromkeys(labels) if label not in present]
    if not missing:
        return frame
    extra = pd.DataFrame({"step": [math.nan] * len(missing), "value": [math.nan] * len(missing), "series": missing})
    return pd.concat([frame.astype({"step": "float64"}), extra], ignore_index=True)


def curve_plot(events: list[dict], name: str) -> pd.DataFrame:
    """What the live view's plot of one of CURVES gets: its points and every series it can have."""
    return with_series(curve_frame(events, name), series_labels(name))


def _metric_events(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("type") == "metrics" and e.get("step") is not None]


def curve_frame(events: list[dict], name: str, run_label: str | None = None) -> pd.DataFrame:
    """Long table (step, value, series) for one of CURVES; `run_label` prefixes series (compare view)."""
    _, _, keys = CURVES[name]
    rows = []
    for e in _metric_events(events):
        for stage, key, label in keys:
            value = e.get(key)
            if e.get("stage") == stage and isinstance(value, (int, float)) and math.isfinite(value):
                rows.append({"step": int(e["step"]), "value": float(value),
                             "series": f"{run_label}: {label}" if run_label else label})
    return curve_table(rows)


def round_metrics(events: list[dict]) -> dict[int, dict]:
    """Per round, the numbers of its metrics event (stage `rounds`, no `part`, `step` = the round).

    Only a round finished for the first time reports (a resumed stage does not repeat the rounds it had), so a
    report of round r after rounds beyond r means the rounds were redone from r (`--redo rounds`): the later
    ones are dropped until they report again."""
    out: dict[int, dict] = {}
    for e in _metric_events(events):
        if e.get("stage") != "rounds" or e.get("part") is not None:
            continue
        try:
            r = int(e["step"])
        except (TypeError, ValueError):
            continue
        out = {k: v for k, v in out.items() if k < r}
        out[r] = {k: float(v) for k, v in e.items() if k.startswith("rounds_") and isinstance(v, (int, float))
                  and not isinstance(v, bool) and math.isfinite(v)}
    return dict(sorted(out.items()))


def has_rounds(events: list[dict]) -> bool:
    """Whether the run has a round to show (the round-0 metrics of the policy the rounds start from count)."""
    return bool(round_metrics(events))


def round_table(rows: list[dict] | None = None) -> pd.DataFrame:
    """(round, value, series) with the round as text: a nominal x axis, whose ticks are the rounds themselves
    (a numeric axis over rounds 0..3 would tick at 0.5 steps). `round_order` gives its order."""
    frame = pd.DataFrame(rows or [], columns=["round", "value", "series"])
    return frame.astype({"round": "object", "value": "float64", "series": "object"})


def round_series_labels(name: str) -> list[str]:
    return [label for _, label in ROUND_CURVES[name][2]]


def round_frame(events: list[dict], name: str) -> pd.DataFrame:
    """Long table (round, value, series) for one of ROUND_CURVES, rounds in order."""
    keys = ROUND_CURVES[name][2]
    rows = [{"round": str(r), "value": numbers[key], "series": label}
            for r, numbers in round_metrics(events).items() for key, label in keys if key in numbers]
    return round_table(rows)


def round_plot(events: list[dict], name: str) -> pd.DataFrame:
    """What the Live tab's plot of one of ROUND_CURVES gets: its points and every series it can have (a series
    without points gets one row with value NaN, which the plot skips: see `with_series`)."""
    frame = round_frame(events, name)
    present = set(frame["series"])
    first = frame["round"].iloc[0] if len(frame) else "0"
    missing = [{"round": first, "value": math.nan, "series": label}
               for label in round_series_labels(name) if label not in present]
    return round_table(frame.to_dict("records") + missing) if missing else frame


def round_order(events: list[dict]) -> list[str]:
    """The x axis's order (the plot's `sort`): the rounds as numbers, not as text ("10" after "9"; a nominal axis
    sorts its values as text unless told)."""
    return [str(r) for r in round_metrics(events)]


def tokens_per_second(events: list[dict], grad_accum: int) -> pd.DataFrame:
    """(step, value, series) of DPO tokens/s between consecutive logged steps (see module doc)."""
    step_time: dict[int, float] = {}
    rows = []
    prev_step = None
    for e in events:
        if e.get("stage") != "dpo":
            continue
        if e.get("type") == "stage_start":
            step_time, prev_step = {}, None
        elif e.get("type") == "progress":
            step_time[int(e.get("n") or 0)] = e["time"]
        elif e.get("type") == "metrics" and e.get("step") is not None and e.get("tokens") is not None:
            s = int(e["step"])
            t_now, t_prev = step_time.get(s, e["time"]), step_time.get(prev_step) if prev_step else None
            if prev_step is not None and t_prev is not None and t_now > t_prev and s > prev_step:
                rows.append({"step": s, "value": e["tokens"] * grad_accum * (s - prev_step) / (t_now - t_prev),
                             "series": "tokens/s"})
            prev_step = s
    return curve_table(rows)


def gpu_memory(events: list[dict]) -> pd.DataFrame:
    rows = [{"step": int(e["step"]), "value": float(e["gpu_mem_gb"]), "series": f"{e.get('stage')} peak GB"}
            for e in _metric_events(events) if isinstance(e.get("gpu_mem_gb"), (int, float))]
    return curve_table(rows)


def point_counts(events: list[dict]) -> dict[str, int]:
    """Logged optimizer steps per stage (the x positions the curves have so far)."""
    steps: dict[str, set] = {}
    for e in _metric_events(events):
        steps.setdefault(e.get("stage", "?"), set()).add(e["step"])
    return {stage: len(s) for stage, s in steps.items()}


def final_metrics(events: list[dict]) -> dict[str, float]:
    """Eval-stage numbers logged without a step (reward_acc_*, eval_implicit_accuracy, eval_win_rate)."""
    out: dict[str, float] = {}
    for e in events:
        if e.get("type") == "metrics" and e.get("step") is None:
            out.update({k: v for k, v in e.items() if isinstance(v, (int, float)) and k not in ("time",)})
    return out


# --------------------------------------------------------------------------------------------------
# messages

def messages(events: list[dict], limit: int = 12) -> list[tuple[str, str, str]]:
    """(kind, stage, message) of the latest warnings and errors, oldest first."""
    out = [(e["type"], e.get("stage") or "-", str(e.get("message", "")))
           for e in events if e.get("type") in ("warning", "error")]
    return out[-limit:]


# Library messages that alarm more than they say, as the log box shows them instead: (pattern, note).
LIBRARY_NOTES = [
    (re.compile(r"^.*Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.*$"),
     "[note] bitsandbytes: its optional CPU kernel package `kernels` is not installed; the portable 4-bit "
     "kernel is used instead (harmless, nothing to do)"),
]


def explain_library_noise(text: str) -> str:
    """The log with known harmless library warnings replaced by one line saying what they mean (each kept
    once per burst: repeated in a row, a note is shown once)."""
    out: list[str] = []
    for line in text.splitlines():
        for pattern, note in LIBRARY_NOTES:
            if pattern.match(line):
                line = note
                break
        if not (out and line == out[-1] and line.startswith("[note]")):
            out.append(line)
    return "\n".join(out)
