"""`load_groups(path, ...)`: any supported source and format -> validated `PreferenceGroup`s.

Pipeline: `sources` (files -> raw rows with file:line) -> `formats` (detect, parse one row: media
resolved and checked, prompt typed, responses checked) -> `merge` (pair rows -> groups, ranks
recovered). A bad row raises `DataError` naming file:line (`data.on_error: raise`), or is counted by
reason and left out (`skip`); the counts go to the event stream as one `data_skipped` event.

    python -m mmrlhf_lite.data stats runs/demo/data/demo/demo.jsonl
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from . import registry
from .errors import DataError
from .formats import FORMATS, PARSERS, detect, is_prompt_row
from .groups import PreferenceGroup
from .merge import GroupBuilder
from .rows import PairRow, RowContext
from .sources import iter_rows, list_sources
from .validate import MediaChecker

MAX_EVENT_WARNINGS = 20       # per kind; the rest are counted in one summary line
ONCE_PER_FILE = {"templated"}  # warnings that say something about a whole file


@dataclass
class LoadResult:
    groups: list[PreferenceGroup]
    skipped: Counter = field(default_factory=Counter)   # reason -> rows left out (on_error=skip)
    warnings: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # file -> format used
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first skipped row's message
    errors: list[DataError] = field(default_factory=list)   # every skipped row's error, in read order
    rows: int = 0                                           # rows read (including skipped ones)


class _Warnings:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self._once: set[tuple[str, str]] = set()

    def add(self, kind: str, message: str, file: str = "") -> None:
        if kind in ONCE_PER_FILE:
            if (kind, file) in self._once:
                return
            self._once.add((kind, file))
        self.items.append((kind, message))


def load_groups(path, fmt="auto", media_root=None, on_error="raise", max_frames=8, events=None,
                allow_empty=False, dataset=None, prompts=False) -> LoadResult:
    """Read every row under `path` (file, folder, `datasets` folder) into groups; see the module doc.

    `prompts` (online rounds asked for): rows without ranked responses are read as prompts, groups whose
    `is_ranked()` is False (formats*.py say which rows per format); without it they are the errors they were.

    `dataset` names an entry of the LLaMA-Factory registry (`dataset_info.json`) at `path` (registry.py);
    `path` naming a registry file without it is an error that lists the entries.
    `allow_empty=True` returns a result without groups instead of raising (the UI lists its skipped rows)."""
    if fmt not in FORMATS:
        raise DataError("", f"unknown data.format '{fmt}'; choose one of {', '.join(FORMATS)}", reason="bad_value")
    if on_error not in ("raise", "skip"):
        raise DataError("", f"unknown data.on_error '{on_error}'; choose raise or skip", reason="bad_value")
    transform = None
    if dataset or registry.looks_like_registry(path):
        entry = registry.resolve(path, dataset)
        if fmt not in ("auto", entry.fmt):
            raise DataError(str(path), f"data.format is '{fmt}' but entry '{dataset}' is read as '{entry.fmt}' "
                            "(leave data.format at auto)", reason="bad_value")
        path, fmt, transform = entry.path, entry.fmt, entry.transform
        media_root = media_root or entry.media_root
    result = LoadResult(groups=[])
    checker, builder, warnings, memo = MediaChecker(), GroupBuilder(), _Warnings(), {}
    for file in list_sources(path):
        root = str(media_root) if media_root else (file if os.path.isdir(file) else os.path.dirname(file) or ".")
        file_fmt = None if fmt == "auto" else fmt
        warn = (lambda f: lambda kind, msg: warnings.add(kind, msg, f))(file)
        ctx = RowContext(file, root, max_frames, checker, file_fmt or "", warn, memo, prompts=prompts)
        parse = PARSERS.get(file_fmt)
        for raw in iter_rows(file):
            result.rows += 1
            ctx.source = raw.source
            try:
                if raw.error is not None:
                    raise raw.error
                row = transform(raw.row, raw.source) if transform else raw.row
                if parse is None:
                    file_fmt = ctx.fmt = _detect(raw.source, row, prompts)
                    result.formats[file] = file_fmt
                    parse = PARSERS[file_fmt]
                parsed = parse(row, ctx)
                if isinstance(parsed, PairRow):
                    builder.add_pair(parsed)
                else:
                    builder.add_group(parsed)
            except DataError as err:
                if on_error == "raise":
                    raise
                result.skipped[err.reason] += 1
                result.examples.setdefault(err.reason, str(err))
                result.errors.append(err)
        if file_fmt is not None:
            result.formats.setdefault(file, file_fmt)
    groups, merge_warnings = builder.finish()
    for kind, message in merge_warnings:
        warnings.add(kind, message)
    result.groups = groups
    result.warnings = [m for _, m in warnings.items]
    _report(result, warnings.items, events)
    if not groups and not allow_empty:
        summary = f" ({skip_summary(result.skipped)})" if result.skipped else ""
        raise DataError(str(path), f"no {'groups or prompts' if prompts else 'preference groups'} were loaded from "
                        f"{result.rows} row(s){summary}", reason="bad_source")
    return result


PROMPTS_HINT = ("; a row without responses is a prompt for online rounds, read only when rounds are asked for "
                "(rounds.n > 0, or --rounds N; docs/rounds.md)")


def _detect(source: str, row: dict, prompts: bool = False) -> str:
    found = detect(row, prompts)
    if found is None:
        keys = sorted(k for k, v in row.items() if v is not None)
        raise DataError(source, f"cannot tell the format from the fields {keys}; set data.format to one of "
                        f"{', '.join(f for f in FORMATS if f != 'auto')} (docs/data-formats.md)"
                        f"{PROMPTS_HINT if is_prompt_row(row) else ''}", reason="unknown_format")
    return found


def skip_summary(skipped: Counter) -> str:
    total = sum(skipped.values())
    return f"skipped {total} row(s): " + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())


def _report(result: LoadResult, items: list[tuple[str, str]], events) -> None:
    if events is None:
        return
    per_kind: Counter = Counter()
    for kind, message in items:
        per_kind[kind] += 1
        if per_kind[kind] <= MAX_EVENT_WARNINGS:
            events.warning(message, stage="data")
    for kind, n in per_kind.items():
        if n > MAX_EVENT_WARNINGS:
            events.warning(f"... and {n - MAX_EVENT_WARNINGS} more '{kind}' warnings (LoadResult.warnings has all)",
                           stage="data")
    if result.skipped:
        events.warning(skip_summary(result.skipped), stage="data")
        events.emit("data_skipped", stage="data", counts=dict(result.skipped), examples=dict(result.examples),
                    message=skip_summary(result.skipped))

