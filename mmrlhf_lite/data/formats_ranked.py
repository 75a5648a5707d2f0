"""Parsers of the K-response formats: one row = one whole `PreferenceGroup`.

    ranked      {id, category?, prompt: turns | str, images?, video?, responses: [{text, rank?, score?, critique?}],
                 pairs?, ties?, meta?}      our native form, what `PreferenceGroup.to_record()` writes
    vlfeedback  {id, prompt, completions: [{model, response, annotations: {Aspect: {Rating: "4", Rationale}}}]
                 | {model: [...], response: [...], annotations: [...]}, img_path?}

With online rounds asked for (`RowContext.prompts`), a `ranked` row with no `responses` (absent or empty), with
fewer than 2, or with responses that carry no rank, score or pairs, is a prompt: its responses are kept unranked.

VLFeedback has no chosen/rejected: a completion's score is the mean of its numeric ratings (`"N/A"`
and missing aspects are left out) and ranks follow the scores. A completion without any numeric
rating cannot be placed: it is left out with a warning.

    python -m pytest -q tests/test_data_formats.py -k "ranked or vlfeedback"
"""
from __future__ import annotations

import math
import os
from typing import Any

from . import chat
from .groups import PreferenceGroup, Response
from .rows import RowContext, get, need, optional_text, present, resolve_images, resolve_path, resolve_video
from .validate import check_distinct, check_response_text

VLFEEDBACK_IMAGE_KEYS = ("img_path", "image", "images")


def _prompt_turns(value: Any, ctx: RowContext) -> tuple[list, list]:
    if isinstance(value, str):
        return [("user", value)], []
    return chat.messages(value, ctx, "prompt")


def _number(value: Any, ctx: RowContext, key: str, integer: bool = False) -> float | int:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer() and value >= 1
    if not ok:
        what = "an integer >= 1 (1 = best)" if integer else "a finite number"
        raise ctx.error(f"key '{key}' must be {what}, got {value!r}", "bad_value", key=key)
    return int(value) if integer else float(value)


def _index_pairs(value: Any, k: int, ctx: RowContext, key: str) -> list[tuple[int, int]]:
    out = []
    for p in value:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and 0 <= i < k for i in p)
                and p[0] != p[1]):
            raise ctx.error(f"key '{key}': {p!r} is not a pair of two response indices in 0..{k - 1}", "bad_value",
                            key=key)
        out.append((int(p[0]), int(p[1])))
    return out


def parse_ranked(row: dict, ctx: RowContext) -> PreferenceGroup:
    gid = need(row, "id", ctx, (str, int))
    if ctx.prompts and row.get("responses") is None:
        row = {**row, "responses": []}
    items = need(row, "responses", ctx, list)
    responses = []
    for i, item in enumerate(items):
        key = f"responses[{i}]"
        if not isinstance(item, dict):
            raise ctx.error(f"key '{key}' must be an object with 'text'", "missing_field", key=key)
        text = item.get("text")
        if not isinstance(text, str):
            raise ctx.error(f"missing field '{key}.text' (format {ctx.fmt})", "missing_field", key=f"{key}.text")
        check_response_text(text, ctx.source, f"{key}.text")
        rank = None if item.get("rank") is None else _number(item["rank"], ctx, f"{key}.rank", integer=True)
        score = None if item.get("score") is None else _number(item["score"], ctx, f"{key}.score")
        responses.append(Response(text, rank, score, optional_text(item.get("critique"))))
    explicit = present(row, "pairs")
    labelled = explicit or all(r.rank is not None for r in responses) or all(r.score is not None for r in responses)
    unlabelled = not explicit and all(r.rank is None and r.score is None for r in responses)
    if ctx.prompts and (len(responses) < 2 or unlabelled):
        return _ranked_prompt(row, ctx, str(gid), responses)
    if len(responses) < 2:
        raise ctx.error(f"key 'responses': a group needs at least 2 responses, got {len(responses)}",
                        "too_few_responses", key="responses")
    check_distinct([r.text for r in responses], ctx.source, [f"responses[{i}].text" for i in range(len(responses))])
    if not labelled:
        raise ctx.error("key 'responses': give every response a 'rank' (1 = best), or every response a 'score', "
                        "or list the 'pairs'", "missing_field", key="responses")
    group = _ranked_prompt(row, ctx, str(gid), responses)
    if explicit:
        group.explicit_pairs = _index_pairs(row["pairs"], len(responses), ctx, "pairs")
        group.explicit_ties = _index_pairs(row.get("ties") or [], len(responses), ctx, "ties")
    return group


def _ranked_prompt(row: dict, ctx: RowContext, gid: str, responses: list[Response]) -> PreferenceGroup:
    """The group's prompt, media, category and meta; its responses as parsed (ranked or not)."""
    images = resolve_images(get(row, "images", "image"), ctx, "images")
    video = resolve_video(row["video"], ctx, "video") if present(row, "video") else None
    turns, _ = _prompt_turns(need(row, "prompt", ctx, (str, list)), ctx)
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise ctx.error("key 'meta' must be an object", "bad_value", key="meta")
    return PreferenceGroup(
        id=gid, prompt=chat.build_prompt(turns, len(images), video is not None, ctx, "prompt"),
        responses=responses, images=images, video=video, category=str(row.get("category") or "general"),
        source=ctx.source, meta=meta)


# ------------------------------------------------------------------------------------------ VLFeedback

def _completions(value: Any, ctx: RowContext) -> list[dict]:
    """List of structs, or Parquet's struct of lists -> list of dicts."""
    if isinstance(value, dict):
        cols = {k: v for k, v in value.items() if isinstance(v, list)}
        lengths = {len(v) for v in cols.values()}
        if "response" not in cols or len(lengths) != 1:
            raise ctx.error("key 'completions': a struct of lists needs equal-length 'response', 'model', "
                            "'annotations' lists", "bad_value", key="completions")
        return [dict(zip(cols, values)) for values in zip(*cols.values())]
    if isinstance(value, list) and all(isinstance(c, dict) for c in value):
        return value
    raise ctx.error("key 'completions' must be a list of objects (or an object of lists)", "missing_field",
                    key="completions")


def _rating(value: Any, ctx: RowContext, key: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().upper() in ("", "N/A", "NA", "NONE")):
        return None
    try:
        rating = float(value)
    except (TypeError, ValueError):
        raise ctx.error(f"key '{key}': rating {value!r} is not a number (or \"N/A\")", "bad_value", key=key) from None
    if not math.isfinite(rating):
        raise ctx.error(f"key '{key}': rating {value!r} is not finite", "bad_value", key=key)
    return rating


def parse_vlfeedback(row: dict, ctx: RowContext) -> PreferenceGroup:
    gid = str(need(row, "id", ctx, (str, int)))
    turns, _ = _prompt_turns(need(row, "prompt", ctx, (str, list)), ctx)
    responses, ratings, models = [], [], []
    for i, comp in enumerate(_completions(row["completions"], ctx)):
        key = f"completions[{i}]"
        text = comp.get("response")
        if not isinstance(text, str):
            raise ctx.error(f"missing field '{key}.response' (format {ctx.fmt})", "missing_field",
                            key=f"{key}.response")
        check_response_text(text, ctx.source, f"{key}.response")
        aspects = comp.get("annotations") or {}
        if not isinstance(aspects, dict):
            raise ctx.error(f"key '{key}.annotations' must be an object", "bad_value", key=f"{key}.annotations")
        scored, notes = {}, []
        for aspect, ann in aspects.items():
            if not isinstance(ann, dict):
                continue  # an aspect Arrow filled with null
            r = _rating(ann.get("Rating"), ctx, f"{key}.annotations.{aspect}.Rating")
            if r is not None:
                scored[aspect] = r
            if optional_text(ann.get("Rationale")):
                notes.append((aspect, ann.get("Rating"), ann["Rationale"]))
        if not scored:
            ctx.warn("unrated", f"{ctx.source}: key '{key}': no numeric rating (all N/A or missing), so it cannot be "
                                f"ranked; left out of group '{gid}'")
            continue
        critique = notes[0][2] if len(notes) == 1 else "\n".join(f"{a} ({r}): {t}" for a, r, t in notes) or None
        responses.append(Response(text, score=sum(scored.values()) / len(scored), critique=critique))
        ratings.append(scored)
        models.append(comp.get("model"))
    if len(responses) < 2:
        raise ctx.error(f"key 'completions': {len(responses)} rated completion(s); a group needs at least 2",
                        "too_few_responses", key="completions")
    check_distinct([r.text for r in responses], ctx.source, [f"completions[{i}].response" for i in range(len(responses))])
    image_key = next((k for k in VLFEEDBACK_IMAGE_KEYS if present(row, k)), None)
    if image_key is not None:
        images = resolve_images(row[image_key], ctx, image_key)
    else:  # the VLFeedback loader's convention: <images dir>/<id>.jpg
        guess = resolve_path(f"{gid}.jpg", ctx)
        images = resolve_images(guess, ctx, "img_path") if os.path.isfile(guess) else []
        if not images:
            ctx.warn("no_image", f"{ctx.source}: group '{gid}' has no image ('img_path' absent and {guess} not found); "
                                 "read as text-only")
    return PreferenceGroup(id=gid, prompt=chat.build_prompt(turns, len(images), False, ctx, "prompt"),
                           responses=responses, images=images, category=str(row.get("category") or "general"),
                           source=ctx.source, meta={"models": models, "ratings": ratings})
