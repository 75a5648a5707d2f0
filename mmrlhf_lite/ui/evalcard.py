"""The Live tab's final-evaluation card and the Compare tab's recipe differences.

`card_html(report)` renders `<run>/eval/report.json` (evaluate.pipeline): Acc / Acc+ per critique mode,
each with one line on what the mode means, the policy's implicit reward accuracy and win rate.
`recipe_diff(runs_root, names)` lists the recipe keys whose values differ between runs.

    python app.py            # Live tab (after `eval`), Compare tab
"""
from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from .jobs import RECIPE_FILE, run_path

MODE_MEANING = {
    "given": "the data's own critique is given to the reward model before it scores (the ceiling for critiques)",
    "generate": "the reward model writes its own critique, then scores: how it judges new answers",
    "none": "the reward model scores the answer directly, without any critique",
}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def report_of(runs_root, run_name: str | None) -> tuple[dict | None, float]:
    """(report or None, its mtime) of a run."""
    import json

    if not run_name:
        return None, 0.0
    try:
        path = run_path(runs_root, run_name) / "eval" / "report.json"
        return json.loads(path.read_text()), path.stat().st_mtime
    except (OSError, ValueError):
        return None, 0.0


def card_html(report: dict | None) -> str:
    if not report:
        return ""
    rows = []
    for mode, res in ((report.get("reward_model") or {}).get("modes") or {}).items():
        o = res.get("overall") or {}
        rows.append(f"<tr><td><b>{html.escape(mode)}</b></td><td>{_pct(o.get('acc'))}</td><td>{_pct(o.get('acc_plus'))}</td>"
                    f"<td>{o.get('pairs', '-')}</td><td>{html.escape(MODE_MEANING.get(mode, ''))}</td></tr>")
    parts = [f"<div class='mm-eval' data-modes='{len(rows)}'><h3 style='margin:4px 0'>Final evaluation (held out: "
             f"{report.get('groups', '?')} groups, {report.get('pairs', '?')} pairs)</h3>"]
    if rows:
        parts.append("<table><tr><th>critique mode</th><th>Acc</th><th>Acc+</th><th>pairs</th><th>what the mode means</th></tr>"
                     + "".join(rows) + "</table>"
                     "<p style='font-size:13px'>Acc: share of pairs ranked right; Acc+: share of groups with every "
                     "pair right.</p>")
    pol = report.get("policy")
    if pol:
        wr = (pol.get("win_rate") or {}).get("win_rate")
        items = [f"implicit reward accuracy {_pct(pol.get('implicit_accuracy'))} (the policy prefers the better "
                 "answer more than the reference does)",
                 f"log-prob ranking accuracy {_pct(pol.get('logp_accuracy'))}"]
        if wr is not None:
            items.append(f"win rate after vs before DPO {_pct(wr)} (judged by the reward model)")
        parts.append("<p><b>Policy (MM-DPO):</b> " + "; ".join(items) + ".</p>")
    parts.append("</div>")
    return "".join(parts)


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_diff(runs_root: str | os.PathLike, names: list[str]) -> pd.DataFrame:
    """One row per recipe key whose value differs between the runs (run.dir left out), one column per run."""
    import yaml

    trees = {}
    for n in names:
        path = Path(run_path(runs_root, n)) / RECIPE_FILE
        try:
            trees[n] = _flat(yaml.safe_load(path.read_text()) or {})
        except (OSError, yaml.YAMLError):
            trees[n] = {}
    keys = sorted({k for t in trees.values() for k in t} - {"run.dir"})
    rows = []
    for k in keys:
        values = [trees[n].get(k, "(default)") for n in names]
        if len({repr(v) for v in values}) > 1:
            rows.append({"key": k, **{n: ", ".join(map(str, v)) if isinstance(v, list) else str(v)
                                      for n, v in zip(names, values)}})
    return pd.DataFrame(rows, columns=["key", *names])
