"""What every format parser shares: the row context, field access, media resolution, the parsed pair.

Parsers (`formats_*.py`) turn one raw row into either a whole `PreferenceGroup` (formats with K
responses) or a `PairRow` (one chosen/rejected comparison), which `merge.py` folds into groups.

    python -m pytest -q tests/test_data_formats.py
"""
from __future__ import annotations

import ast
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import DataError
from .groups import Media
from .media import FRAME_SUFFIXES, sample_frames
from .validate import MediaChecker

# MM-RLHF and its RewardBench encode the category only in the media path (`mcq/...`, `video/...`)
KNOWN_CATEGORIES = ("mcq", "long", "short", "safety", "video")
MEMO_LIMIT = 100_000


@dataclass
class RowContext:
    """Where a row came from and how to resolve its media."""
    source: str                      # "file:line"
    root: str                        # folder relative media paths resolve against
    max_frames: int
    checker: MediaChecker
    fmt: str
    warn: Callable[[str, str], None] = lambda kind, msg: None   # (kind, message) -> collected warning
    memo: dict = field(default_factory=dict)  # per-load cache: resolved paths, video folders, built prompts
    prompts: bool = False            # rows without ranked responses are prompts (online rounds asked for)

    def remember(self, key, value):
        if len(self.memo) > MEMO_LIMIT:
            self.memo.clear()
        self.memo[key] = value
        return value

    def error(self, message: str, reason: str, key: str | None = None, path: str | None = None) -> DataError:
        return DataError(self.source, message, reason=reason, key=key, path=path)


@dataclass
class PairRow:
    """One parsed comparison: `chosen` preferred over `rejected` (or tied with it)."""
    source: str
    group_id: str | None             # the row's own group id (rows sharing it form one group)
    prompt: list[dict]
    images: list[Media]
    video: list[Media] | None
    chosen: str
    rejected: str
    chosen_critique: str | None = None
    rejected_critique: str | None = None
    tie: bool = False
    category: str = "general"
    fallback_id: str | None = None   # the id to use when rows are grouped by content (e.g. RLAIF-V `idx`)
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- fields

def get(row: dict, *keys: str) -> Any:
    """The first key that is present and not None (Arrow fills absent keys with None)."""
    for k in keys:
        v = row.get(k)
        if v is not None:
            return v
    return None


def present(row: dict, key: str) -> bool:
    return row.get(key) is not None


def need(row: dict, key: str, ctx: RowContext, kind: type | tuple = str) -> Any:
    value = row.get(key)
    if value is None:
        raise ctx.error(f"missing field '{key}' (format {ctx.fmt})", "missing_field", key=key)
    if not isinstance(value, kind):
        raise ctx.error(f"field '{key}' must be {_kind_name(kind)}, got {type(value).__name__}",
                        "missing_field", key=key)
    return value


def _kind_name(kind) -> str:
    names = {str: "a string", list: "a list", dict: "an object", int: "an integer", float: "a number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def optional_text(value: Any) -> str | None:
    """A critique / reason: empty strings mean none (VL-RewardBench ships "" on every row)."""
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def parse_bool(value: Any, ctx: RowContext, key: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise ctx.error(f"field '{key}' must be true or false, got {value!r}", "bad_value", key=key)


def parse_listish(value: Any, ctx: RowContext, key: str) -> Any:
    """ms-swift accepts `history` as the string repr of a list."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ctx.error(f"field '{key}' is a string that is not a list literal", "bad_value", key=key) from None
    return value


def parse_json_text(value: Any) -> Any:
    """RLHF-V stores `origin_split` as a JSON object inside a string: decode it when it is one."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def as_list(value: Any) -> list:
    """A single media entry or a list of them -> a list (None -> [])."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# -------------------------------------------------------------------------------------------- media

def resolve_path(raw: str, ctx: RowContext) -> str:
    key = ("path", ctx.root, raw)
    path = ctx.memo.get(key)
    if path is None:
        full = os.path.expanduser(raw)
        path = ctx.remember(key, os.path.normpath(full if os.path.isabs(full) else os.path.join(ctx.root, full)))
    return path


def resolve_image(item: Any, ctx: RowContext, key: str) -> Media:
    """A path string, `{"bytes", "path"}` dict (HF Image / ms-swift) or raw bytes -> checked `Media`."""
    if isinstance(item, dict):
        data, path = item.get("bytes"), item.get("path")
        if data:
            item = bytes(data)
        elif path:
            item = path
        else:
            raise ctx.error(f"key '{key}': image entry has neither bytes nor path", "missing_field", key=key)
    if isinstance(item, (bytes, bytearray)):
        item = bytes(item)
        ctx.checker.check(item, ctx.source, key)
        return item
    if not isinstance(item, str):
        raise ctx.error(f"key '{key}': an image must be a path or {{bytes, path}}, got {type(item).__name__}",
                        "missing_field", key=key)
    if not item.strip():
        raise ctx.error(f"key '{key}': empty image path", "missing_image", key=key)
    if item.startswith(("http://", "https://")):
        raise ctx.error(f"key '{key}': remote images are not downloaded; save it locally: {item}", "missing_image",
                        key=key, path=item)
    path = resolve_path(item, ctx)
    ctx.checker.check(path, ctx.source, key)
    return path


def resolve_images(value: Any, ctx: RowContext, key: str) -> list[Media]:
    """All images of a row, each resolved and checked."""
    if isinstance(value, str):  # the common case, memoised: pair rows repeat their image
        memo_key = ("images", ctx.root, value)
        found = ctx.memo.get(memo_key)
        if found is None:
            found = ctx.remember(memo_key, [resolve_image(value, ctx, key)])
        return list(found)
    items = as_list(value)
    return [resolve_image(item, ctx, key if len(items) == 1 else f"{key}[{i}]") for i, item in enumerate(items)]


def resolve_video(value: Any, ctx: RowContext, key: str) -> list[Media]:
    """A folder of frames, or a list of frame paths -> `max_frames` evenly spaced, checked frames."""
    if isinstance(value, str):
        if not value.strip():
            raise ctx.error(f"key '{key}': empty video path", "bad_video", key=key)
        folder = resolve_path(value, ctx)
        cached = ctx.memo.get(("video", folder, ctx.max_frames))
        if cached is not None:
            return list(cached)
        if os.path.isfile(folder):
            raise ctx.error(f"key '{key}': video files are not decoded; give a folder of frames or a list of frame "
                            f"paths instead: {folder}", "bad_video", key=key, path=folder)
        if not os.path.isdir(folder):
            raise ctx.error(f"key '{key}': video folder not found: {folder}", "bad_video", key=key, path=folder)
        frames = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                        if os.path.splitext(f)[1].lower() in FRAME_SUFFIXES)
        if not frames:
            raise ctx.error(f"key '{key}': video folder has no image frames: {folder}", "bad_video", key=key,
                            path=folder)
        picked = sample_frames(frames, ctx.max_frames)
        for f in picked:
            ctx.checker.check(f, ctx.source, key)
        return list(ctx.remember(("video", folder, ctx.max_frames), picked))
    if isinstance(value, (list, tuple)) and value:
        picked = sample_frames(list(value), ctx.max_frames)
        return [resolve_image(f, ctx, key) for f in picked]
    raise ctx.error(f"key '{key}': a video must be a folder of frames or a non-empty list of frame paths, got "
                    f"{type(value).__name__}", "bad_video", key=key)


def single_video(value: Any, ctx: RowContext, key: str) -> list[Media] | None:
    """`videos` lists (ms-swift, LLaMA-Factory) hold one video per entry: one is supported."""
    if value is None:
        return None
    if isinstance(value, str):
        return resolve_video(value, ctx, key)
    items = list(value)
    if not items:
        return None
    if len(items) == 1 and isinstance(items[0], (str, list)):
        return resolve_video(items[0], ctx, f"{key}[0]")
    if all(isinstance(v, str) for v in items) and all(os.path.splitext(v)[1].lower() in FRAME_SUFFIXES for v in items):
        return resolve_video(items, ctx, key)  # a bare list of frames
    raise ctx.error(f"key '{key}': {len(items)} videos in one row; one video per prompt is supported", "unsupported",
                    key=key)


def category_from_media(raw: Any, is_video: bool) -> str:
    """MM-RLHF's category: the first path component named like one (`mcq/x.png` -> mcq)."""
    for item in as_list(raw):
        if isinstance(item, str):
            found = _category_of_path(item)
            if found:
                return found
    return "video" if is_video else "general"


@functools.lru_cache(maxsize=65536)
def _category_of_path(path: str) -> str:
    return next((part for part in path.replace("\\", "/").split("/") if part in KNOWN_CATEGORIES), "")
