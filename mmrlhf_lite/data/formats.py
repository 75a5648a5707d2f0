"""The format registry and auto-detection from a row's fields.

`detect(row)` looks at the first readable row of each file (rules in order, first match wins):

    0. `response` + `human_ranking`                      -> vl_rewardbench  (VL-RewardBench)
       `Output1` + `Output2` + `Better`                  -> mm_rewardbench  (Multimodal RewardBench)
    1. `responses`                                       -> ranked       (our native K-response rows)
    2. `completions`                                     -> vlfeedback
    3. `chosen_messages`                                 -> llamafactory (v1)
    4. `rejected_response` | `rejected_messages` | `rejected_images`
                                                         -> swift
    5. `conversations` | `messages`, with `chosen` an object (a single message)
                                                         -> llamafactory (sharegpt)
    6. `conversations` + `rejected` but no `chosen`      -> rlhfv        (LLaVA style)
    7. `question` + `chosen` + `rejected`                -> rlaifv
    8. `chosen` + `rejected`, and chosen/rejected/prompt are chat messages, or `images` (a list) is
       given, or the prompt is a chat-templated string   -> trl
    9. `chosen` + `rejected` as plain strings (with `prompt` or `conversations`)
                                                         -> mmrlhf (also MM-RLHF-RewardBench)

With online rounds asked for (`detect(row, prompts=True)`), a row none of those rules matches may be a prompt
without responses: `conversations` -> llamafactory, `messages` or an ms-swift query key (`query`, `question`, ...)
-> swift, `prompt` -> ranked with an `id`, else trl (docs/data-formats.md, "Prompts for online rounds").

`data.format` forces one (`mmrlhf_bench` = `mmrlhf` with a required `id`). A forced or detected
format then parses every row of the file; a row that lacks its fields is reported by name.

    python -m mmrlhf_lite.data stats path/to/file.jsonl   # prints the detected format
"""
from __future__ import annotations

from typing import Callable

from .formats_bench import parse_mm_rewardbench, parse_vl_rewardbench
from .formats_pairs import (SWIFT_QUERY_KEYS, SWIFT_RESPONSE_KEYS, parse_llamafactory, parse_mmrlhf, parse_mmrlhf_bench, parse_rlaifv, parse_rlhfv,
                            parse_swift, parse_trl)
from .formats_ranked import parse_ranked, parse_vlfeedback
from .rows import present
from .templated import template_style

PARSERS: dict[str, Callable] = {
    "ranked": parse_ranked,
    "mmrlhf": parse_mmrlhf,
    "mmrlhf_bench": parse_mmrlhf_bench,
    "trl": parse_trl,
    "swift": parse_swift,
    "llamafactory": parse_llamafactory,
    "rlaifv": parse_rlaifv,
    "rlhfv": parse_rlhfv,
    "vlfeedback": parse_vlfeedback,
    "vl_rewardbench": parse_vl_rewardbench,
    "mm_rewardbench": parse_mm_rewardbench,
}
FORMATS = ("auto",) + tuple(PARSERS)


def _is_chat(value) -> bool:
    return isinstance(value, (list, dict))


# fields that hold an answer in some format: a row with none of them holds a prompt only
ANSWER_KEYS = ("chosen", "rejected", "responses", "completions", "completion", "chosen_messages", "rejected_messages",
               "rejected_response", "response", "Output1", "Output2") + SWIFT_RESPONSE_KEYS


def detect(row: dict, prompts: bool = False) -> str | None:
    """The format of a row from its fields (None when nothing matches); see the module doc for the rules.
    `prompts`: a row without responses may be a prompt for online rounds (`detect_prompt`)."""
    found = _detect_ranked(row)
    return found if found is not None or not prompts else detect_prompt(row)


def detect_prompt(row: dict) -> str | None:
    """The format a prompt-only row is read in (its response fields absent), or None."""
    has = lambda key: present(row, key)  # noqa: E731
    if has("conversations"):
        return "llamafactory"
    if has("messages") or any(has(k) for k in SWIFT_QUERY_KEYS if k != "prompt"):
        return "swift"
    if has("prompt"):
        return "ranked" if has("id") else "trl"
    return None


def is_prompt_row(row: dict) -> bool:
    """A row that reads as a prompt without any answer field: valid only when online rounds are asked for."""
    return detect_prompt(row) is not None and not any(present(row, k) for k in ANSWER_KEYS)


def _detect_ranked(row: dict) -> str | None:
    has = lambda key: present(row, key)  # noqa: E731 - Arrow fills absent keys with None
    if has("response") and has("human_ranking"):
        return "vl_rewardbench"
    if has("Output1") and has("Output2") and has("Better"):
        return "mm_rewardbench"
    if has("responses"):
        return "ranked"
    if has("completions"):
        return "vlfeedback"
    if has("chosen_messages"):
        return "llamafactory"
    if has("rejected_response") or has("rejected_messages") or has("rejected_images"):
        return "swift"
    if (has("conversations") or has("messages")) and isinstance(row.get("chosen"), dict):
        return "llamafactory"
    if has("conversations") and has("rejected") and not has("chosen"):
        return "rlhfv"
    if not (has("chosen") and has("rejected")):
        return None
    if has("question"):
        return "rlaifv"
    prompt = row.get("prompt")
    if _is_chat(row["chosen"]) or _is_chat(row["rejected"]) or _is_chat(prompt) or has("images") \
            or (isinstance(prompt, str) and template_style(prompt)):
        return "trl"
    if has("prompt") or has("conversations"):
        return "mmrlhf"
    return None
