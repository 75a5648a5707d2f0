"""Compare runs: their final evaluation side by side and their training curves overlaid.

Reads each run's `eval/report.json` (`evaluate.pipeline.load_report`) and `events.jsonl`; e.g. an
MM-DPO run (dpo.w > 0) against plain DPO (dpo.w = 0) on the same data. The reward-model benchmarks
scored into a run (`python -m mmrlhf_lite.evaluate bench`, `RUN/bench/<benchmark>/report.json`) are shown
side by side: one row per benchmark metric, one column per run and critique mode; a cell holds the benchmark's
own count of score ties, and ours (every tie wrong) where that differs.

    python app.py            # Compare runs tab
"""
from __future__ import annotations

import os

import pandas as pd

from .jobs import job_state, list_runs, run_path
from .runview import CURVES, EventTail, curve_frame, curve_table, series_labels, with_series

COMPARE_CURVES = {name: title for name, (title, _, _) in CURVES.items()}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def eval_table(runs_root: str | os.PathLike, names: list[str]) -> pd.DataFrame:
    """One row per (run, critique mode): Acc / Acc+ overall and per category, policy metrics, DPO settings."""
    runs = {name: run_path(runs_root, name) for name in names}
    from ..evaluate.pipeline import load_report  # imports torch: only once the names are known to be safe

    rows, categories = [], set()
    reports = {}
    for name, run in runs.items():
        try:
            reports[name] = load_report(run)
        except ValueError:
            reports[name] = None
        for res in ((reports[name] or {}).get("reward_model") or {}).get("modes", {}).values():
            categories.update(res.get("by_category", {}))
    cats = sorted(categories)
    for name in names:
        report = reports[name]
        base = {"run": name, "status": job_state(run_path(runs_root, name)).status}
        if not report:
            rows.append({**base, "critique mode": "(no evaluation yet)"})
            continue
        pol = report.get("policy") or {}
        wr = (pol.get("win_rate") or {}).get("win_rate")
        d = report.get("dpo") or {}
        extra = {"implicit acc": _pct(pol.get("implicit_accuracy")), "win rate after vs before": _pct(wr),
                 "dpo": f"beta={d.get('beta')} w={d.get('w')} k={d.get('k')}" + (" (plain DPO)" if d.get("w") == 0 else "")}
        modes = (report.get("reward_model") or {}).get("modes", {}) or {"-": None}
        for mode, res in modes.items():
            row = {**base, "critique mode": mode}
            if res:
                row["Acc"], row["Acc+"] = _pct(res["overall"]["acc"]), _pct(res["overall"]["acc_plus"])
                for c in cats:
                    cr = res.get("by_category", {}).get(c)
                    row[f"{c} Acc / Acc+"] = f"{_pct(cr['acc'])} / {_pct(cr['acc_plus'])}" if cr else "-"
            rows.append({**row, **extra})
    columns = ["run", "status", "critique mode", "Acc", "Acc+"] + [f"{c} Acc / Acc+" for c in cats] + [
        "implicit acc", "win rate after vs before", "dpo"]
    return pd.DataFrame(rows, columns=columns).fillna("-")


def bench_table(runs_root: str | os.PathLike, names: list[str]) -> pd.DataFrame:
    """The benchmark tables of several runs side by side: a row per (benchmark, metric), a column per
    `<run> (<critique mode>)` (`, smoke run` for a tiny test model); "-" where a run lacks the benchmark or
    metric."""
    runs = {name: run_path(runs_root, name) for name in names}
    from ..evaluate.bench_run import load_bench_reports
    from ..evaluate.benchmarks import BENCHMARKS

    reports = {name: load_bench_reports(run) for name, run in runs.items()}
    cells: dict[tuple[str, str], dict[str, str]] = {}
    columns: list[str] = []
    for bench, spec in BENCHMARKS.items():  # benchmarks in a fixed order, metrics in their table's order
        for name in names:
            report = reports[name].get(bench)
            if not report:
                continue
            for mode, res in report.get("results", {}).items():
                col = f"{name} ({mode}{', smoke run' if report.get('smoke') else ''})"  # smoke: a tiny test model
                if col not in columns:
                    columns.append(col)
                entries = [("pairs scored", str(report.get("pairs")))] + [(r["metric"], _bench_cell(r))
                                                                          for r in res["table"]]
                for metric, value in entries:
                    cells.setdefault((spec.title, metric), {})[col] = value
    rows = [{"benchmark": b, "metric": m, **{c: per.get(c, "-") for c in columns}} for (b, m), per in cells.items()]
    return pd.DataFrame(rows, columns=["benchmark", "metric"] + columns)


def _bench_cell(row: dict) -> str:
    """The benchmark's own count, and beside it ours with every score tie wrong where that differs (a report
    written before it was kept has only the first)."""
    official = _pct(row["acc"])
    strict = _pct(row["acc_strict"]) if "acc_strict" in row else official
    return official if strict == official else f"{official} (score ties wrong: {strict})"


def overlay(runs_root: str | os.PathLike, names: list[str], curve: str, tail: EventTail) -> pd.DataFrame:
    """One curve of several runs in one long table; series are `<run>: <label>`, each named even without
    points (runview.with_series: it gets its colour)."""
    frames = [curve_frame(tail.events(run_path(runs_root, n)), curve, run_label=n) for n in names]
    frames = [f for f in frames if not f.empty]
    table = curve_table(pd.concat(frames, ignore_index=True).to_dict("records") if frames else [])
    return with_series(table, [f"{n}: {label}" for n in names for label in series_labels(curve)])


def comparable_runs(runs_root: str | os.PathLike) -> list[str]:
    return list_runs(runs_root)
