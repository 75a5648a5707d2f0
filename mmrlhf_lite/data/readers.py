"""Readers (minimal: native ranked JSONL). The full set of formats comes with the data layer."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .groups import PreferenceGroup, Response


@dataclass
class LoadResult:
    groups: list[PreferenceGroup]
    skipped: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)


def load_groups(path, fmt="auto", media_root=None, on_error="raise", max_frames=8, events=None) -> LoadResult:
    path = Path(path)
    root = Path(media_root) if media_root else path.parent
    groups = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            groups.append(PreferenceGroup(
                id=str(rec["id"]), prompt=rec["prompt"], category=rec.get("category", "general"),
                images=[str(root / p) for p in rec.get("images", [])],
                responses=[Response(r["text"], r.get("rank"), r.get("score"), r.get("critique"))
                           for r in rec["responses"]], source=f"{path}:{n}"))
    return LoadResult(groups)
