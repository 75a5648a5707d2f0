"""Parsers of two public reward-model benchmarks in the layouts they ship: one row = one pair = one group.

    vl_rewardbench  VL-RewardBench (arXiv 2411.17451), a `datasets` Parquet with the image as bytes:
                    {id, query, response: [answer 1, answer 2], image: {bytes, path} | path,
                     human_ranking: [0, 1] (answer 1 preferred) | [1, 0] (answer 2 preferred),
                     query_source, models?, judge?, rationale?, meta?, human_error_analysis?, ground_truth?}
    mm_rewardbench  Multimodal RewardBench (arXiv 2502.14191), a JSON array beside an image folder:
                    {ID, Image: path under the image folder, Text, Output1, Output2,
                     Better: "Output1" | "Output2", Category}

The two answers keep their order; the preferred one gets rank 1. `human_ranking` values are ranks
(0 = best), so equal values are a tie: kept as a tie, left out of accuracy and counted. A VL-RewardBench
row's domain comes from its `id`, as the benchmark's scoring script (`cal.py`) tells it (`vl_dataset`);
`query_source` is optional and kept as it is (the released rows hold upstream set names such as `COCO` or
`VQAv2`, or nothing). Multimodal RewardBench's `Image` resolves against the JSON file's folder (its
`data/`), or `--media-root` / `data.media_root`. Neither benchmark ships a critique per answer
(VL-RewardBench's `rationale` explains the pair), so critique mode `given` does not apply.

    python -m mmrlhf_lite.data stats path/to/vl_rewardbench.parquet
    python -m pytest -q tests/test_bench_rm.py
"""
from __future__ import annotations

from typing import Any

from . import chat
from .groups import PreferenceGroup, Response
from .rows import RowContext, need, resolve_images
from .validate import check_distinct, check_response_text

VL_REWARDBENCH = "vl-rewardbench"
MM_REWARDBENCH = "mm-rewardbench"

# VL-RewardBench's scoring script (cal.py of github.com/vl-rewardbench/VL_RewardBench, `get_dataset_from_id`,
# as of its 2025-05-08 fix) names a row's source set from its id: the text before the first "_" or "-" (the
# whole id when it has neither), compared case-sensitively; every other prefix is `vlfeedback`. Its
# `group_mapping` then puts each set in one of the three domains.
VL_DATASET_OF_PREFIX = {"RLAIF": "rlaif-v", "RLHF": "rlhf-v", "hallucination": "povid",
                        "mathverse": "reasoning_tasks", "mmmu": "reasoning_tasks", "wildvision": "wildvision-battle"}
VL_OTHER_DATASET = "vlfeedback"
VL_DOMAIN_OF_DATASET = {"vlfeedback": "general", "wildvision-battle": "general", "povid": "hallucination",
                        "rlaif-v": "hallucination", "rlhf-v": "hallucination", "reasoning_tasks": "reasoning"}
VL_DOMAIN_ORDER = ("general", "hallucination", "reasoning")


def vl_dataset(row_id: str) -> str:
    """VL-RewardBench's source set of a row, from its id (see VL_DATASET_OF_PREFIX)."""
    cut = [i for i in (row_id.find("_"), row_id.find("-")) if i != -1]
    prefix = row_id[:min(cut)] if cut else row_id
    return VL_DATASET_OF_PREFIX.get(prefix, VL_OTHER_DATASET)


def vl_domain(dataset: str) -> str | None:
    """The domain (general / hallucination / reasoning) of a source set `vl_dataset` names (None for another)."""
    return VL_DOMAIN_OF_DATASET.get(dataset)


def _unique_id(raw: Any, ctx: RowContext, key: str) -> str:
    """The row's id; a repeated one gets `#2`, `#3`... (each row is its own pair) with a warning."""
    gid = str(raw)
    seen = ctx.memo.setdefault(("bench ids", ctx.fmt), {})
    n = seen.get(gid, 0) + 1
    seen[gid] = n
    if n == 1:
        return gid
    ctx.warn("duplicate_bench_id", f"{ctx.source}: key '{key}': id '{gid}' repeats; this row is read as '{gid}#{n}'")
    return f"{gid}#{n}"


def _text(row: dict, key: str, ctx: RowContext) -> str:
    text = need(row, key, ctx)
    check_response_text(text, ctx.source, key)
    return text


def parse_vl_rewardbench(row: dict, ctx: RowContext) -> PreferenceGroup:
    gid = _unique_id(need(row, "id", ctx, (str, int)), ctx, "id")
    query = need(row, "query", ctx)
    answers = need(row, "response", ctx, list)
    if len(answers) != 2 or not all(isinstance(a, str) for a in answers):
        raise ctx.error(f"key 'response': expected a list of two answer strings, got {len(answers)} item(s)",
                        "bad_value", key="response")
    for i, a in enumerate(answers):
        check_response_text(a, ctx.source, f"response[{i}]")
    check_distinct(answers, ctx.source, ["response[0]", "response[1]"])
    ranking = need(row, "human_ranking", ctx, list)
    if len(ranking) != 2 or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranking):
        raise ctx.error(f"key 'human_ranking': expected two ranks such as [0, 1] (answer 1 preferred) or [1, 0] "
                        f"(answer 2 preferred), got {ranking!r}", "bad_value", key="human_ranking")
    raw_id = str(row["id"])
    dataset = vl_dataset(raw_id)
    source = row.get("query_source")  # optional, any value: the domain comes from the id
    images = resolve_images(need(row, "image", ctx, (str, dict, bytes)), ctx, "image")
    prompt = chat.build_prompt([("user", query)], len(images), False, ctx, "query")
    # ranks: 0 = best in the file; ours start at 1
    responses = [Response(a, rank=int(r) + 1) for a, r in zip(answers, ranking)]
    meta = {"benchmark": VL_REWARDBENCH, "dataset": dataset, "domain": vl_domain(dataset), "row_id": raw_id,
            "query_source": None if source is None else str(source)}
    return PreferenceGroup(id=gid, prompt=prompt, responses=responses, images=images, category=dataset,
                           source=ctx.source, meta=meta)


def parse_mm_rewardbench(row: dict, ctx: RowContext) -> PreferenceGroup:
    gid = _unique_id(need(row, "ID", ctx, (str, int)), ctx, "ID")
    text = need(row, "Text", ctx)
    answers = [_text(row, "Output1", ctx), _text(row, "Output2", ctx)]
    check_distinct(answers, ctx.source, ["Output1", "Output2"])
    better = need(row, "Better", ctx)
    if better not in ("Output1", "Output2"):
        raise ctx.error(f"key 'Better': expected \"Output1\" or \"Output2\", got {better!r}", "bad_value", key="Better")
    category = need(row, "Category", ctx)
    if not category.strip():
        raise ctx.error("key 'Category': empty category", "bad_value", key="Category")
    images = resolve_images(need(row, "Image", ctx, (str, dict)), ctx, "Image")
    prompt = chat.build_prompt([("user", text)], len(images), False, ctx, "Text")
    first_better = better == "Output1"
    responses = [Response(answers[0], rank=1 if first_better else 2), Response(answers[1], rank=2 if first_better else 1)]
    meta = {"benchmark": MM_REWARDBENCH, "row_id": str(row["ID"])}
    return PreferenceGroup(id=gid, prompt=prompt, responses=responses, images=images, category=category.strip(),
                           source=ctx.source, meta=meta)
