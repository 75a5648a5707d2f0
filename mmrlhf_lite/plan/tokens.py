"""Token statistics of a recipe's data (percentiles, the longest micro-batch, samples over max_length),
memoized per group in the run's cache, and the check `run_pipeline` makes before loading any weight.

    python -m pytest -q tests/test_preflight.py
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.groups import PreferenceGroup
from ..models.image_tokens import image_counter
from ..recipe import Recipe
from .counters import (CRITIQUE_STAGES, POLICY_STAGES, GroupTokens, _chars_counter, _Counter, _formula_counter,
                       _processor_counter)


def percentiles(values: Sequence[int]) -> dict[str, int] | None:
    """p50 / p95 / max by the nearest-rank rule (an observed value, never interpolated)."""
    if not values:
        return None
    s = sorted(values)
    rank = lambda q: s[max(1, math.ceil(q * len(s))) - 1]  # noqa: E731
    return {"p50": rank(0.50), "p95": rank(0.95), "max": s[-1]}


TOKENS_CACHE = "tokens.jsonl"
COUNTER_VERSION = 1


def _media_stamp(media) -> Any:
    """A cheap identity for token counting: path + size + mtime (image sizes come from headers), or the
    digest of inline bytes."""
    import hashlib
    import os

    if isinstance(media, bytes):
        return hashlib.sha256(media).hexdigest()
    try:
        st = os.stat(media)
        return [str(media), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(media), None]


def memoize_counter(count: Callable, cache_dir: Path, salt: Any) -> Callable:
    """Per-group counts kept in `<cache_dir>/tokens.jsonl`, keyed by everything the count reads (model
    files, lengths and pixel settings via `salt`; the group's text, media stamps and source): a resumed
    run or a second dry run counts only new or changed groups. Written in batches; `count.flush()` at the
    end."""
    from ..cache.store import JsonlStore, content_key

    store = JsonlStore(Path(cache_dir) / TOKENS_CACHE, {"tokens": dict, "problems": list})
    pending: list[dict] = []

    def flush() -> None:
        if pending:
            try:
                store.put_many(pending)
            except OSError:  # a full or read-only disk only costs the next run the recount
                pass
            pending.clear()

    def memo(g: PreferenceGroup, with_critique: bool) -> tuple["GroupTokens", list[dict]]:
        video = None
        if g.video is not None:
            video = [_media_stamp(f) for f in g.video] if isinstance(g.video, list) else _media_stamp(g.video)
        key = content_key("tokens", COUNTER_VERSION, salt, with_critique, g.source or g.id, g.prompt,
                          [_media_stamp(m) for m in g.images], video,
                          [(r.text, r.critique) for r in g.responses])
        rec = store.get(key)
        if rec is not None:
            try:
                return GroupTokens(**rec["tokens"]), rec["problems"]
            except TypeError:  # a memo line of another shape (an edited file): count again
                pass
        t, problems = count(g, with_critique)
        pending.append({"key": key, "tokens": dataclasses.asdict(t), "problems": problems})
        if len(pending) >= 2000:
            flush()
        return t, problems

    memo.flush = flush
    return memo



def _counter(recipe: Recipe, stages: Sequence[str], config: dict | None = None,
             config_source: str | None = None, memo_dir: Path | None = None) -> _Counter:
    """The exact counter when the processor loads (memoized in `memo_dir` when given); offline, the family
    formula when the family and a config are known; else characters/4."""
    from ..models.families import FAMILIES, detect_family, family_of_model_type
    from ..models.loading import load_processor, resolve_model_path

    try:
        path = resolve_model_path(recipe.model.path)
        family = detect_family(path, recipe.model.family)
        processor = load_processor(path, family, recipe.model)
    except Exception as exc:  # noqa: BLE001 - any failure here only costs accuracy, and is reported
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        family = FAMILIES.get(recipe.model.family)
        if family is None and config is not None:
            try:
                family = family_of_model_type(config.get("model_type", ""))
            except ValueError:
                family = None
        if family is not None and config is not None and image_counter(family) is not None:
            try:
                c = _formula_counter(recipe, family, config, reason)
                c.config_source = config_source
                return c
            except (KeyError, ValueError, TypeError) as exc2:
                reason = f"{reason}; no offline formula: {exc2}"
        return _chars_counter(recipe, reason)
    c = _processor_counter(recipe, stages, family, processor, config)
    c.config_source = config_source
    if memo_dir is not None:
        from ..cache.store import model_fingerprint
        from ..models.reward_score import TEMPLATE_VERSION

        m = recipe.model
        salt = [model_fingerprint(m.path), family.name, TEMPLATE_VERSION, m.min_pixels, m.max_pixels,
                recipe.data.max_frames, recipe.dpo.train.max_length, recipe.reward.train.max_length,
                sorted(set(stages) & set(POLICY_STAGES + CRITIQUE_STAGES + ("score", "eval")))]
        c.count = memoize_counter(c.count, memo_dir, salt)
    return c


def token_stats(recipe: Recipe, stages: Sequence[str], groups: Sequence[PreferenceGroup],
                train_ids: set[str], config: dict | None = None, config_source: str | None = None,
                memo_dir: Path | None = None) -> tuple[dict[str, Any], list[dict], list[GroupTokens]]:
    """Token counts (percentiles, the longest micro-batch), the samples over max_length (all groups, train and
    eval) and each group's counts. `config` is the model's config.json content when known (it fixes the
    offline image-token formula and the vision patches per image token)."""
    counter = _counter(recipe, stages, config, config_source, memo_dir)
    per_group: list[GroupTokens] = []
    too_long: list[dict] = []
    train_packed = train_unpacked = 0
    with_critique = any(s in stages for s in CRITIQUE_STAGES + ("score", "eval"))
    for g in groups:
        t, problems = counter.count(g, with_critique)
        per_group.append(t)
        too_long.extend(problems)
        if g.id in train_ids:
            train_packed += t.packed
            train_unpacked += sum(t.prompt + n for n in t.responses)
    getattr(counter.count, "flush", lambda: None)()
    images = [t.image for t in per_group]
    splits = {}
    for split, keep in (("train", lambda g: g.id in train_ids), ("eval", lambda g: g.id not in train_ids)):
        chosen = [t for g, t in zip(groups, per_group) if keep(g)]
        splits[split] = {"image": percentiles([t.image for t in chosen]),
                         "packed": percentiles([t.packed for t in chosen])}
    crit_seq = [t.critique_prompt + n for t in per_group for n in t.critique_branches]
    stats = {"method": counter.method, "note": counter.note, "family": counter.family, "groups": len(groups),
             "config": counter.config_source,
             "prompt": percentiles([t.prompt for t in per_group]),
             "image": percentiles(images) if counter.method != "chars/4" else None,
             "response": percentiles([n for t in per_group for n in t.responses]),
             "sequence": percentiles([t.prompt + n for t in per_group for n in t.responses]),
             "packed": percentiles([t.packed for t in per_group]),
             "critique": percentiles([n for t in per_group for n in t.critiques]),
             "critique_sequence": percentiles(crit_seq) if counter.method != "chars/4" else None,
             "train_tokens_packed": train_packed, "train_tokens_unpacked": train_unpacked,
             "splits": splits if counter.method != "chars/4" else None}
    if not any(s in stages for s in CRITIQUE_STAGES):
        stats["critique_sequence"] = None
    stats["longest"] = longest(per_group) if per_group else None
    return stats, too_long, per_group


def preflight_too_long(recipe: Recipe, stages: Sequence[str], groups: Sequence[PreferenceGroup],
                       memo_dir: Path | None = None) -> list[dict]:
    """The samples a run of `stages` would find longer than max_length, counted exactly with the model's own
    tokenizer, template and image-token rules before any weight is loaded (what `run_pipeline` refuses to
    start on). [] when nothing to check or the processor cannot be loaded (the stage then reports that).
    With `memo_dir`, counts are kept there and a later call recounts only new or changed groups."""
    if not any(s in stages for s in POLICY_STAGES + CRITIQUE_STAGES):
        return []
    counter = _counter(recipe, stages, memo_dir=memo_dir)
    if counter.method != "processor":
        return []
    with_critique = any(s in stages for s in CRITIQUE_STAGES)
    out = [p for g in groups for p in counter.count(g, with_critique)[1]]
    getattr(counter.count, "flush", lambda: None)()
    return out


def longest(per_group: Sequence[GroupTokens]) -> dict[str, int]:
    """The worst case a micro-batch can meet, per quantity (each from its own longest group)."""
    return {
        "packed": max(t.packed for t in per_group),
        "prompt": max(t.prompt for t in per_group),
        "sequence": max(t.prompt + max(t.responses) for t in per_group),
        "response_tokens": max(sum(t.responses) for t in per_group),
        "responses": max(len(t.responses) for t in per_group),
        "images": max(t.images for t in per_group),
        "patches": max(t.patches for t in per_group),
        "image_tokens": max(t.image for t in per_group),
        "largest_image": max(t.largest_image for t in per_group),
        "critique_packed": max(t.critique_packed for t in per_group),
        "critique_prompt": max(t.critique_prompt for t in per_group),
        "critique_sequence": max((t.critique_prompt + n for t in per_group for n in t.critique_branches), default=0),
        "critique_targets": max(t.critique_targets for t in per_group),
        "critique_context": max((n for t in per_group for n in t.critique_branches), default=0),
    }
