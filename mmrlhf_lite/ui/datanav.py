"""Data tab navigation: Prev/Next through the groups (optionally of one category), the validation report
filtered by kind of problem, and the report as a CSV download.

Pure functions of a `databrowser.DataReport` (cached per file version), so every click reads nothing new.

    python app.py            # Data tab
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from .databrowser import DataReport, problems_frame

ALL = "(all)"
WARNINGS = "warnings"


def categories(report: DataReport) -> list[str]:
    return [ALL] + sorted({g.category for g in report.groups})


def problem_kinds(report: DataReport) -> list[str]:
    """The kinds of problem in the report (its errors' reasons, and warnings), for the filter."""
    errors = list(getattr(report.result, "errors", []) or []) if report.result is not None else []
    kinds = sorted({e.reason for e in errors})
    if report.result is not None and report.result.warnings:
        kinds.append(WARNINGS)
    return [ALL] + kinds


def step(report: DataReport, index: int | float | None, delta: int, category: str | None = None) -> int:
    """The index `delta` groups away (+1 next, -1 previous) among the groups of `category` (all when empty),
    stopping at the ends; from a group of another category, the nearest one in that direction."""
    n = len(report.groups)
    if n == 0:
        return 0
    i = min(max(int(index or 0), 0), n - 1)
    if not category or category == ALL:
        return min(max(i + delta, 0), n - 1)
    j = i + delta
    while 0 <= j < n:
        if report.groups[j].category == category:
            return j
        j += delta
    return i


def first_of(report: DataReport, category: str | None) -> int:
    """The first group of a category (0 for all, or when none has it)."""
    if not category or category == ALL:
        return 0
    return next((i for i, g in enumerate(report.groups) if g.category == category), 0)


def filtered_problems(report: DataReport, data_root, kind: str | None) -> pd.DataFrame:
    frame = problems_frame(report, data_root, limit=10_000)
    if not kind or kind == ALL:
        return frame
    if kind == WARNINGS:
        return frame[frame["problem"].str.startswith("warning: ")].reset_index(drop=True)
    errors = list(getattr(report.result, "errors", []) or []) if report.result is not None else []
    keep = [i for i, e in enumerate(errors) if e.reason == kind]
    return frame.iloc[keep].reset_index(drop=True)


def report_csv(report: DataReport, data_root, out_dir: str | os.PathLike) -> Path:
    """The whole validation report (every problem, unfiltered) as a CSV file in a fresh folder of out_dir."""
    frame = problems_frame(report, data_root, limit=1_000_000)
    folder = Path(tempfile.mkdtemp(prefix="report-", dir=str(out_dir)))
    stem = Path(report.name.rstrip("/")).stem or "data"
    path = folder / f"{stem}-validation-report.csv"
    frame.to_csv(path, index=False)
    return path
