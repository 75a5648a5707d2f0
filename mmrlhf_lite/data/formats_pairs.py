"""Parsers of the pair formats: one row = one (chosen, rejected) comparison -> `PairRow`.

    mmrlhf        {id?, prompt | conversations, chosen, rejected, image | video, chosen_reason?, rejected_reason?,
                   is_tie?}                                                   (MM-RLHF, its RewardBench)
    trl           {prompt?, chosen, rejected, images | image}: strings, messages, or templated strings
    swift         {messages, rejected_response | rejected_messages, images}  (ms-swift 3.x)
                  {query|question|..., response, rejected_response, history?, system?, images | image}  (2.x)
    llamafactory  {conversations | messages, chosen: {...}, rejected: {...}, images?, videos?}  (sharegpt)
                  {chosen_messages, rejected_messages}                        (v1)
    rlaifv        {question, chosen, rejected, image: path | {bytes, path}, idx?}
    rlhfv         {image, conversations: [human, gpt = chosen], rejected: str, idx?}

Every format also honours an optional `id` (rows sharing it form one group) and `category`.
docs/data-formats.md shows an example row of each.

When online rounds are asked for (`rounds.n > 0`, `RowContext.prompts`), a `trl`, `swift` or `llamafactory` row
whose response fields are absent is a prompt (`prompt_group`): TRL prompt-only rows `{prompt, images}` (a
`completion` is kept as an unranked answer), ms-swift `{messages, images}` or `{query, images}` and LLaMA-Factory
`{conversations, images}` (a final assistant turn, as in SFT rows, is kept as an unranked answer).

    python -m pytest -q tests/test_data_formats.py
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from . import chat
from .groups import PreferenceGroup, Response
from .rows import (PairRow, RowContext, as_list, category_from_media, get, need, optional_text, parse_bool,
                   parse_json_text, parse_listish, present, resolve_images, resolve_video, single_video)
from .templated import template_style, untemplate_prompt, untemplate_response
from .validate import check_distinct, check_response_text

SWIFT_QUERY_KEYS = ("query", "prompt", "input", "instruction", "question", "problem")
SWIFT_RESPONSE_KEYS = ("response", "answer", "output", "targets", "target", "answer_key", "answers", "solution",
                       "text", "completion", "content")


def _row_media(ctx: RowContext, images: Any, images_key: str, inline: list | None, prompt_key: str) -> list:
    """The row's images, resolved and checked: its image field, else the sources its image parts name."""
    if not as_list(images) and inline and any(s is not None for s in inline):
        if any(s is None for s in inline):
            raise ctx.error(f"key '{prompt_key}': some image parts name their image and some do not", "media_mismatch",
                            key=prompt_key)
        images, images_key = inline, f"{prompt_key} image parts"
    return resolve_images(images, ctx, images_key)


def prompt_group(ctx: RowContext, row: dict, *, turns: list, prompt_key: str, images: Any, images_key: str,
                 inline: list | None = None, video: list | None = None, answers: tuple[str, ...] = (),
                 category: str = "general") -> PreferenceGroup:
    """A row without ranked responses, read as a prompt for online rounds: its media and turns checked like a
    pair's, its id the row's `id` or a hash of its content, `answers` kept unranked (rounds do not use them)."""
    resolved = _row_media(ctx, images, images_key, inline, prompt_key)
    prompt = chat.build_prompt(turns, len(resolved), video is not None, ctx, prompt_key)
    gid = get(row, "id")
    if gid is None:
        media = [m if isinstance(m, str) else hashlib.sha1(m).hexdigest() for m in resolved + list(video or [])]
        gid = "p" + hashlib.sha1(json.dumps([prompt, media], sort_keys=True).encode()).hexdigest()[:12]
    kept = [a for a in answers if isinstance(a, str) and a.strip()]
    return PreferenceGroup(id=str(gid), prompt=prompt, responses=[Response(a) for a in kept], images=resolved,
                           video=video, category=str(row["category"]) if present(row, "category") else category,
                           source=ctx.source, meta=row["meta"] if isinstance(row.get("meta"), dict) else {})


def make_pair(ctx: RowContext, row: dict, *, turns: list, prompt_key: str, images: Any, images_key: str,
              inline: list | None = None, video: list | None = None, chosen: str, rejected: str,
              keys: tuple[str, str] = ("chosen", "rejected"), critiques: tuple = (None, None), tie: bool = False,
              category: str = "general", fallback_id: Any = None, meta: dict | None = None) -> PairRow:
    """The checks and resolution every pair format ends with."""
    check_response_text(chosen, ctx.source, keys[0])
    check_response_text(rejected, ctx.source, keys[1])
    if chosen.strip() == rejected.strip():
        check_distinct([chosen, rejected], ctx.source, list(keys))
    resolved = _row_media(ctx, images, images_key, inline, prompt_key)
    prompt = _prompt(turns, len(resolved), video is not None, ctx, prompt_key)
    gid = get(row, "id")
    return PairRow(source=ctx.source, group_id=None if gid is None else str(gid), prompt=prompt, images=resolved,
                   video=video, chosen=chosen, rejected=rejected, chosen_critique=critiques[0],
                   rejected_critique=critiques[1], tie=tie,
                   category=str(row["category"]) if present(row, "category") else category,
                   fallback_id=None if fallback_id is None else str(fallback_id), meta=meta or {})


def _prompt(turns: list, n_images: int, has_video: bool, ctx: RowContext, key: str) -> list[dict]:
    """`chat.build_prompt`, memoised for string turns: the pairs of one prompt repeat it row after row."""
    if not all(isinstance(c, str) for _, c in turns):
        return chat.build_prompt(turns, n_images, has_video, ctx, key)
    memo_key = ("prompt", tuple(turns), n_images, has_video)
    built = ctx.memo.get(memo_key)
    if built is None:
        built = ctx.remember(memo_key, chat.build_prompt(turns, n_images, has_video, ctx, key))
    return built  # shared between rows; `merge` copies it once per group


# ------------------------------------------------------------------------------------------- MM-RLHF

def parse_mmrlhf(row: dict, ctx: RowContext, require_id: bool = False) -> PairRow:
    if require_id:
        need(row, "id", ctx, (str, int))
    prompt = row.get("prompt")
    if prompt is not None:
        prompt_key = "prompt"
        turns = [("user", prompt)] if isinstance(prompt, str) else chat.messages(prompt, ctx, "prompt")[0]
    elif present(row, "conversations"):  # train_dpo.py reads `conversations` when there is no `prompt`
        prompt_key = "conversations"
        turns = chat.messages(row["conversations"], ctx, prompt_key)[0]
        while turns and turns[-1][0] == "assistant":
            turns = turns[:-1]
    else:
        raise ctx.error(f"missing field 'prompt' (format {ctx.fmt})", "missing_field", key="prompt")
    video_raw, image_raw = row.get("video"), row.get("image")
    video = None if video_raw is None else resolve_video(video_raw, ctx, "video")
    return make_pair(ctx, row, turns=turns, prompt_key=prompt_key, images=image_raw, images_key="image",
                     video=video, chosen=need(row, "chosen", ctx), rejected=need(row, "rejected", ctx),
                     critiques=(optional_text(row.get("chosen_reason")), optional_text(row.get("rejected_reason"))),
                     tie=parse_bool(row.get("is_tie"), ctx, "is_tie"),
                     category=category_from_media(image_raw if video is None else video_raw, video is not None))


def parse_mmrlhf_bench(row: dict, ctx: RowContext) -> PairRow:
    """MM-RLHF-RewardBench: the same rows, several per `id`, and the `id` is required (Acc+ groups by it)."""
    return parse_mmrlhf(row, ctx, require_id=True)


# ----------------------------------------------------------------------------------------------- TRL

def parse_trl(row: dict, ctx: RowContext) -> PairRow | PreferenceGroup:
    images_key = "images" if present(row, "images") else "image"
    inline: list = []
    if ctx.prompts and not present(row, "chosen") and not present(row, "rejected"):
        return _trl_prompt(row, ctx, images_key)
    if present(row, "prompt"):
        prompt = row["prompt"]
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if isinstance(prompt, str):
            style = template_style(prompt)
            turns = untemplate_prompt(prompt, style) if style else []
            if turns:
                ctx.warn("templated", f"{ctx.source}: prompt/chosen/rejected are already chat-templated ({style}); the "
                                      "template markers were removed so the model's own template applies")
                chosen = untemplate_response(chosen, style) if isinstance(chosen, str) else chosen
                rejected = untemplate_response(rejected, style) if isinstance(rejected, str) else rejected
            else:
                turns = [("user", prompt)]
        else:
            turns, inline = chat.messages(prompt, ctx, "prompt")
        chosen = chat.response_text(chosen, ctx, "chosen")
        rejected = chat.response_text(rejected, ctx, "rejected")
        prompt_key = "prompt"
    else:  # implicit prompt: chosen / rejected are whole conversations sharing their first turns
        c_turns, c_src = chat.messages(need(row, "chosen", ctx, list), ctx, "chosen")
        r_turns, _ = chat.messages(need(row, "rejected", ctx, list), ctx, "rejected")
        n = min(chat.common_prefix(c_turns, r_turns), len(c_turns) - 1)  # identical -> caught as chosen == rejected
        if n <= 0:
            raise ctx.error(f"missing field 'prompt' (format {ctx.fmt}; chosen and rejected share no leading turns "
                            "to take it from)", "missing_field", key="prompt")
        if len(c_turns) != n + 1 or len(r_turns) != n + 1:
            raise ctx.error("key 'chosen': after the turns chosen and rejected share, each must hold exactly one "
                            "assistant message", "bad_value", key="chosen")
        turns, chosen = chat.split_conversation(c_turns, ctx, "chosen")
        _, rejected = chat.split_conversation(r_turns, ctx, "rejected")
        inline = c_src
        prompt_key = "chosen"
    return make_pair(ctx, row, turns=turns, prompt_key=prompt_key, images=row.get(images_key), images_key=images_key,
                     inline=inline, chosen=chosen, rejected=rejected)


def _trl_prompt(row: dict, ctx: RowContext, images_key: str) -> PreferenceGroup:
    """TRL's prompt-only rows ({prompt, images}) and prompt-completion rows (the completion kept unranked)."""
    prompt = row.get("prompt")
    inline: list = []
    if prompt is None:
        raise ctx.error(f"missing field 'prompt' (format {ctx.fmt}, a prompt-only row)", "missing_field", key="prompt")
    completion = row.get("completion")
    if isinstance(prompt, str):
        style = template_style(prompt)
        turns = (untemplate_prompt(prompt, style) if style else []) or [("user", prompt)]
        if style and isinstance(completion, str):
            completion = untemplate_response(completion, style)
    else:
        turns, inline = chat.messages(prompt, ctx, "prompt")
    answer = chat.response_text(completion, ctx, "completion") if completion is not None else None
    return prompt_group(ctx, row, turns=turns, prompt_key="prompt", images=row.get(images_key), images_key=images_key,
                        inline=inline, answers=(answer,) if answer else ())


# -------------------------------------------------------------------------------------------- ms-swift

def parse_swift(row: dict, ctx: RowContext) -> PairRow | PreferenceGroup:
    images_key = "images" if present(row, "images") else "image"
    images = row.get(images_key)
    if ctx.prompts and not any(present(row, k) for k in ("rejected_response", "rejected_messages")):
        return _swift_prompt(row, ctx, images_key)
    if present(row, "rejected_images") and _media_names(row["rejected_images"]) != _media_names(images):
        raise ctx.error("key 'rejected_images': it differs from 'images', so this pair contrasts two images rather "
                        "than two responses; a preference group shares one prompt and its media across responses, "
                        "so image-contrast pairs are not supported", "unsupported", key="rejected_images")
    inline: list = []
    if present(row, "messages"):
        all_turns, inline = chat.messages(row["messages"], ctx, "messages")
        turns, chosen = chat.split_conversation(all_turns, ctx, "messages")
        if present(row, "rejected_messages"):
            r_turns, _ = chat.messages(row["rejected_messages"], ctx, "rejected_messages")
            r_prompt, rejected = chat.split_conversation(r_turns, ctx, "rejected_messages")
            if not chat.same_turns(r_prompt, turns):
                raise ctx.error("key 'rejected_messages': its prompt turns differ from those of 'messages'; only the "
                                "final answer may differ", "unsupported", key="rejected_messages")
            r_key = "rejected_messages"
        elif present(row, "rejected_response"):
            rejected, r_key = chat.response_text(row["rejected_response"], ctx, "rejected_response"), "rejected_response"
        else:
            raise ctx.error(f"missing field 'rejected_response' (or 'rejected_messages') (format {ctx.fmt})",
                            "missing_field", key="rejected_response")
        prompt_key, keys = "messages", ("messages", r_key)
    else:
        q_key = next((k for k in SWIFT_QUERY_KEYS if present(row, k)), None)
        a_key = next((k for k in SWIFT_RESPONSE_KEYS if present(row, k)), None)
        if q_key is None:
            raise ctx.error(f"missing field 'messages' (or 'query') (format {ctx.fmt})", "missing_field", key="query")
        if a_key is None:
            raise ctx.error(f"missing field 'response' (format {ctx.fmt})", "missing_field", key="response")
        turns = [("system", need(row, "system", ctx))] if present(row, "system") else []
        history = parse_listish(row.get("history"), ctx, "history") or []
        for i, item in enumerate(history):
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise ctx.error(f"key 'history[{i}]': expected a [query, response] pair", "bad_value", key="history")
            turns += [("user", str(item[0])), ("assistant", str(item[1]))]
        turns.append(("user", need(row, q_key, ctx)))
        chosen = need(row, a_key, ctx)
        rejected = chat.response_text(row.get("rejected_response"), ctx, "rejected_response")
        prompt_key, keys = q_key, (a_key, "rejected_response")
    video_key = "videos" if present(row, "videos") else "video"
    video = single_video(row.get(video_key), ctx, video_key)
    media = row.get(video_key) if video is not None else images
    return make_pair(ctx, row, turns=turns, prompt_key=prompt_key, images=images, images_key=images_key,
                     inline=inline, video=video, chosen=chosen, rejected=rejected, keys=keys,
                     category=category_from_media(media, video is not None))


def _swift_prompt(row: dict, ctx: RowContext, images_key: str) -> PreferenceGroup:
    """ms-swift rows without a rejected response: SFT rows (the answer kept unranked) or bare prompts."""
    inline: list = []
    answers: tuple[str, ...] = ()
    if present(row, "messages"):
        turns, inline = chat.messages(row["messages"], ctx, "messages")
        if turns and turns[-1][0] == "assistant":
            turns, answer = chat.split_conversation(turns, ctx, "messages")
            answers = (answer,)
        prompt_key = "messages"
    else:
        prompt_key = next((k for k in SWIFT_QUERY_KEYS if present(row, k)), None)
        if prompt_key is None:
            raise ctx.error(f"missing field 'messages' (or 'query') (format {ctx.fmt})", "missing_field", key="query")
        turns = [("system", need(row, "system", ctx))] if present(row, "system") else []
        turns.append(("user", need(row, prompt_key, ctx)))
        a_key = next((k for k in SWIFT_RESPONSE_KEYS if present(row, k)), None)
        if a_key is not None and isinstance(row[a_key], str):
            answers = (row[a_key],)
    video_key = "videos" if present(row, "videos") else "video"
    video = single_video(row.get(video_key), ctx, video_key)
    media = row.get(video_key) if video is not None else row.get(images_key)
    return prompt_group(ctx, row, turns=turns, prompt_key=prompt_key, images=row.get(images_key), images_key=images_key,
                        inline=inline, video=video, answers=answers,
                        category=category_from_media(media, video is not None))


def _media_names(value: Any) -> list:
    return [v.get("path") or v.get("bytes") if isinstance(v, dict) else v for v in as_list(value)]


# --------------------------------------------------------------------------------------- LLaMA-Factory

def parse_llamafactory(row: dict, ctx: RowContext) -> PairRow | PreferenceGroup:
    if ctx.prompts and not any(present(row, k) for k in ("chosen", "rejected", "chosen_messages",
                                                         "rejected_messages")):
        return _llamafactory_prompt(row, ctx)
    if present(row, "chosen_messages"):  # v1: two whole conversations
        c_turns, inline = chat.messages(need(row, "chosen_messages", ctx, list), ctx, "chosen_messages")
        r_turns, _ = chat.messages(need(row, "rejected_messages", ctx, list), ctx, "rejected_messages")
        turns, chosen = chat.split_conversation(c_turns, ctx, "chosen_messages")
        r_prompt, rejected = chat.split_conversation(r_turns, ctx, "rejected_messages")
        if not chat.same_turns(r_prompt, turns):
            raise ctx.error("key 'rejected_messages': its prompt turns differ from those of 'chosen_messages'",
                            "unsupported", key="rejected_messages")
        prompt_key, keys = "chosen_messages", ("chosen_messages", "rejected_messages")
    else:
        prompt_key = "conversations" if present(row, "conversations") else "messages"
        turns, inline = chat.messages(need(row, prompt_key, ctx, list), ctx, prompt_key)
        if present(row, "system"):
            turns = [("system", need(row, "system", ctx))] + turns
        chosen = chat.response_text(row.get("chosen"), ctx, "chosen")
        rejected = chat.response_text(row.get("rejected"), ctx, "rejected")
        keys = ("chosen", "rejected")
    video = single_video(row.get("videos"), ctx, "videos")
    return make_pair(ctx, row, turns=turns, prompt_key=prompt_key, images=row.get("images"), images_key="images",
                     inline=inline, video=video, chosen=chosen, rejected=rejected, keys=keys)


def _llamafactory_prompt(row: dict, ctx: RowContext) -> PreferenceGroup:
    """A sharegpt conversation without chosen/rejected: an SFT row (its final answer kept unranked) or a prompt."""
    prompt_key = "conversations" if present(row, "conversations") else "messages"
    turns, inline = chat.messages(need(row, prompt_key, ctx, list), ctx, prompt_key)
    if present(row, "system"):
        turns = [("system", need(row, "system", ctx))] + turns
    answers: tuple[str, ...] = ()
    if turns and turns[-1][0] == "assistant":
        turns, answer = chat.split_conversation(turns, ctx, prompt_key)
        answers = (answer,)
    video = single_video(row.get("videos"), ctx, "videos")
    return prompt_group(ctx, row, turns=turns, prompt_key=prompt_key, images=row.get("images"), images_key="images",
                        inline=inline, video=video, answers=answers)


# ------------------------------------------------------------------------------------ RLAIF-V, RLHF-V

def parse_rlaifv(row: dict, ctx: RowContext) -> PairRow:
    """RLAIF-V raw columns; `idx` is per pair, so pairs group by question + image and the first idx names it."""
    image_key = "image" if present(row, "image") else "image_path"
    meta = {k: parse_json_text(row[k]) for k in ("ds_name", "origin_dataset", "origin_split") if present(row, k)}
    return make_pair(ctx, row, turns=[("user", need(row, "question", ctx))], prompt_key="question",
                     images=row.get(image_key), images_key=image_key, chosen=need(row, "chosen", ctx),
                     rejected=need(row, "rejected", ctx), fallback_id=row.get("idx"), meta=meta)


def parse_rlhfv(row: dict, ctx: RowContext) -> PairRow:
    """RLHF-V (LLaVA style): the last `gpt` turn of `conversations` is the chosen answer."""
    turns, inline = chat.messages(need(row, "conversations", ctx, list), ctx, "conversations")
    turns, chosen = chat.split_conversation(turns, ctx, "conversations")
    meta = {k: parse_json_text(row[k]) for k in ("origin_dataset", "origin_split") if present(row, k)}
    return make_pair(ctx, row, turns=turns, prompt_key="conversations", images=row.get("image"), images_key="image",
                     inline=inline, chosen=chosen, rejected=need(row, "rejected", ctx),
                     keys=("conversations", "rejected"), fallback_id=row.get("idx"), meta=meta)
