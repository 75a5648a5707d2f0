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


def _num(x) -> str:
    """A setting as written (0.1, not 0.30000000000000004)."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def eval_table(runs_root: str | os.PathLike, names: list[str]) -> pd.DataFrame:
    """The final evaluations side by side: a row per metric, a column per run (so a comparison of many runs
    grows down the page, never off its right edge). Rows: the run's status; per critique mode, Acc and Acc+
    overall and per category; the policy's implicit reward accuracy and win rate; the DPO settings. "-"
    where a run lacks the number."""
    runs = {name: run_path(runs_root, name) for name in names}
    from ..evaluate.pipeline import load_report  # imports torch: only once the names are known to be safe

    reports = {}
    modes: list[str] = []
    categories: set[str] = set()
    for name, run in runs.items():
        try:
            reports[name] = load_report(run)
        except ValueError:
            reports[name] = None
        for mode, res in (((reports[name] or {}).get("reward_model") or {}).get("modes") or {}).items():
            if mode not in modes:
                modes.append(mode)
            categories.update((res or {}).get("by_category", {}))
    cats = sorted(categories)
    columns: dict[str, dict[str, str]] = {}
    for name in names:
        report = reports[name]
        col = {"status": job_state(runs[name]).status}
        if not report:
            col["evaluation"] = "none yet"
            columns[name] = col
            continue
        held_out = (report.get("groups"), report.get("pairs"))
        col["evaluation"] = f"{held_out[0]} groups, {held_out[1]} pairs" if None not in held_out else "done"
        for mode in modes:
            res = ((report.get("reward_model") or {}).get("modes") or {}).get(mode)
            if not res:
                continue
            col[f"Acc ({mode})"] = _pct(res["overall"]["acc"])
            col[f"Acc+ ({mode})"] = _pct(res["overall"]["acc_plus"])
            for c in cats:
                cr = res.get("by_category", {}).get(c)
                col[f"{c}: Acc / Acc+ ({mode})"] = f"{_pct(cr['acc'])} / {_pct(cr['acc_plus'])}" if cr else "-"
        pol = report.get("policy") or {}
        col["implicit reward accuracy"] = _pct(pol.get("implicit_accuracy"))
        col["win rate after vs before"] = _pct((pol.get("win_rate") or {}).get("win_rate"))
        d = report.get("dpo") or {}
        col["DPO settings"] = (" ".join(f"{k}={_num(d.get(k))}" for k in ("beta", "w", "k"))
                               + (" (plain DPO)" if d.get("w") == 0 else ""))
        columns[name] = col
    metrics = ["status", "evaluation"]
    for mode in modes:
        metrics += [f"Acc ({mode})", f"Acc+ ({mode})"] + [f"{c}: Acc / Acc+ ({mode})" for c in cats]
    metrics += ["implicit reward accuracy", "win rate after vs before", "DPO settings"]
    rows = [{"metric": m, **{n: columns[n].get(m, "-") for n in names}} for m in metrics]
    return pd.DataFrame(rows, columns=["metric", *names])


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
