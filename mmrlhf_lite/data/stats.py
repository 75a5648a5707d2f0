"""Counts over loaded groups (pure), token-length percentiles with a processor, and their text report.

    python -m mmrlhf_lite.data stats runs/demo/data/demo/demo.jsonl --processor tiny:qwen2_vl:xs
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

from .groups import PreferenceGroup
from .media import load_image
from .readers import LoadResult, skip_summary


def group_stats(result: LoadResult) -> dict[str, Any]:
    """Counts over the ranked groups, and over every prompt (ranked groups and rows without a ranking, the
    rounds-ready rows online rounds sample answers for)."""
    groups = [g for g in result.groups if g.is_ranked()]
    unranked = [g for g in result.groups if not g.is_ranked()]
    categories: dict[str, dict[str, int]] = {}
    k, images, distinct = Counter(), 0, set()
    n = Counter()
    prompt_images, prompt_distinct = 0, set()
    for g in result.groups:
        prompt_images += len(g.images)
        prompt_distinct.update(m if isinstance(m, str) else hash(m) for m in g.images)
    for g in groups:
        pairs, ties = len(g.pairs()), len(g.ties())
        n["pairs"] += pairs
        n["ties"] += ties
        n["responses"] += len(g.responses)
        n["critiques"] += sum(r.critique is not None for r in g.responses)
        n["explicit"] += g.explicit_pairs is not None
        k[len(g.responses)] += 1
        c = categories.setdefault(g.category, {"groups": 0, "pairs": 0, "ties": 0})
        c["groups"] += 1
        c["pairs"] += pairs
        c["ties"] += ties
        images += len(g.images)
        distinct.update(m if isinstance(m, str) else hash(m) for m in g.images)
        n["inline"] += sum(isinstance(m, bytes) for m in g.images)
        n["video"] += g.video is not None
        n["frames"] += len(g.video or [])
        n["text_only"] += not g.images and g.video is None
    return {
        "formats": dict(result.formats), "rows": result.rows, "skipped": dict(result.skipped),
        "warnings": len(result.warnings), "groups": len(groups), "ranked_groups": len(groups) - n["explicit"],
        "explicit_groups": n["explicit"], "responses": n["responses"], "k": dict(sorted(k.items())),
        "critiques": n["critiques"], "pairs": n["pairs"], "ties": n["ties"],
        "categories": dict(sorted(categories.items())),
        "media": {"images": images, "distinct_images": len(distinct), "inline_images": n["inline"],
                  "video_groups": n["video"], "frames": n["frames"], "text_only_groups": n["text_only"]},
        "prompts": {"prompts": len(result.groups), "images": prompt_images, "distinct_images": len(prompt_distinct),
                    "rounds_ready_rows": len(unranked),
                    "unranked_responses": sum(len(g.responses) for g in unranked),
                    "with_meta": sum(bool(g.meta) for g in result.groups)},
    }


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank p50 / p90 / p99 / max (empty -> {})."""
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, max(0, -(-q * len(s) // 100) - 1))]  # noqa: E731
    return {"p50": pick(50), "p90": pick(90), "p99": pick(99), "max": s[-1]}


def _chat(group: PreferenceGroup) -> tuple[list[dict], list]:
    """The prompt as the processor takes it: image parts with loaded images, video frames as images."""
    messages, loaded, it = [], [], iter(group.images)
    for turn in group.prompt:
        parts = []
        for p in turn["content"]:
            if p["type"] == "image":
                parts.append({"type": "image"})
                loaded.append(load_image(next(it)))
            elif p["type"] == "video":
                for frame in group.video or []:
                    parts.append({"type": "image"})
                    loaded.append(load_image(frame))
            else:
                parts.append({"type": "text", "text": p.get("text") or ""})
        messages.append({"role": turn["role"], "content": parts})
    return messages, loaded


def token_stats(groups: list[PreferenceGroup], processor, sample: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Token lengths: prompt (chat template + image tokens), each response, each critique.

    Prompts are encoded on a seeded sample of `sample` groups (images make them the slow part).
    """
    tok = processor.tokenizer
    picked = groups if len(groups) <= sample else random.Random(seed).sample(groups, sample)
    prompt = []
    for g in picked:
        messages, images = _chat(g)
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt.append(len(processor(text=[text], images=images or None)["input_ids"][0]))
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    responses = [count(r.text) for g in groups for r in g.responses]
    critiques = [count(r.critique) for g in groups for r in g.responses if r.critique]
    return {"sampled_groups": len(picked), "prompt": percentiles(prompt), "response": percentiles(responses),
            "critique": percentiles(critiques)}


def format_report(stats: dict[str, Any], tokens: dict[str, Any] | None = None) -> str:
    fmts = Counter(stats["formats"].values())
    lines = [
        "format      " + (", ".join(f"{f} ({n} file{'s' * (n > 1)})" for f, n in fmts.items()) or "-"),
        f"rows        {stats['rows']} read" + (f"; {skip_summary(Counter(stats['skipped']))}" if stats["skipped"] else
                                               ", 0 skipped"),
        f"groups      {stats['groups']} (ranked {stats['ranked_groups']}, pairs as given {stats['explicit_groups']})",
        f"responses   {stats['responses']} (K: " + ", ".join(f"{k}x{n}" for k, n in stats["k"].items())
        + f"), with critique {stats['critiques']}",
        f"pairs       {stats['pairs']}",
        f"ties        {stats['ties']}",
        "categories  " + "; ".join(f"{c} {v['groups']} groups / {v['pairs']} pairs / {v['ties']} ties"
                                   for c, v in stats["categories"].items()),
    ]
    m = stats["media"]
    lines.append(f"media       {m['images']} images ({m['distinct_images']} distinct, {m['inline_images']} inline), "
                 f"{m['video_groups']} video groups ({m['frames']} frames), {m['text_only_groups']} text-only groups")
    p = stats.get("prompts")
    if p:
        lines.append(f"prompts     {p['prompts']} ({p['images']} images, {p['distinct_images']} distinct; {p['with_meta']} "
                     f"with meta): {p['prompts'] - p['rounds_ready_rows']} ranked groups + {p['rounds_ready_rows']} "
                     "rounds-ready rows without a ranking"
                     + (f" ({p['unranked_responses']} unranked responses, not used)" if p["unranked_responses"] else ""))
        if p["rounds_ready_rows"]:
            lines.append("            rows without a ranking are prompts for online rounds: read only with rounds.n > 0 "
                         "(--rounds N); docs/rounds.md")
    lines.append(f"warnings    {stats['warnings']}")
    if tokens is not None:
        lines.append(f"tokens      (prompt over {tokens['sampled_groups']} groups, with image tokens)")
        for what in ("prompt", "response", "critique"):
            p = tokens[what]
            lines.append(f"  {what:<9} " + ("  ".join(f"{k} {v}" for k, v in p.items()) if p else "-"))
    return "\n".join(lines)
