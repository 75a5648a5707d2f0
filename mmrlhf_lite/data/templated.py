"""Undo a chat template already applied to TRL string rows (the `vdpo` blog's idefics2 printout).

Training applies the *model's* template to our typed turns, so a pre-templated prompt would be
templated twice. Recognised: idefics2/3 (`User:...<end_of_utterance>`), ChatML (`<|im_start|>role`),
Llama 3 (`<|start_header_id|>role<|end_header_id|>`). Qwen's image markup becomes `<image>` again.

    python -m pytest -q tests/test_data_formats.py -k templated
"""
from __future__ import annotations

import re

STYLES = {
    "chatml": re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\n?|\Z)", re.S),
    "llama3": re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|\Z)", re.S),
    "idefics": re.compile(r"(User|Assistant|System):(.*?)(?:<end_of_utterance>\n?|\Z)", re.S),
}
MARKERS = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>", "idefics": "<end_of_utterance>"}
END_MARKERS = ("<end_of_utterance>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>")
QWEN_IMAGE = re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>")
QWEN_VIDEO = re.compile(r"<\|vision_start\|>(?:<\|video_pad\|>)+<\|vision_end\|>")


def template_style(text: str) -> str | None:
    return next((name for name, marker in MARKERS.items() if marker in text), None)


def _clean(text: str) -> str:
    text = QWEN_VIDEO.sub("<video>", QWEN_IMAGE.sub("<image>", text))
    return text.replace("<|begin_of_text|>", "")


def untemplate_prompt(text: str, style: str) -> list[tuple[str, str]]:
    """A templated prompt -> [(role, text)]; a trailing empty assistant turn (generation prompt) is dropped."""
    turns = []
    for m in STYLES[style].finditer(_clean(text)):
        role, body = m.group(1).lower(), m.group(2)
        if style == "idefics" and body.startswith(" "):
            body = body[1:]
        turns.append((role, body))
    while turns and turns[-1][0] == "assistant" and not turns[-1][1].strip():
        turns.pop()
    return turns


def untemplate_response(text: str, style: str) -> str:
    """`Assistant: answer<end_of_utterance>\\n` -> `answer`."""
    text = _clean(text)
    if style == "idefics" and text.startswith("Assistant:"):
        text = text[len("Assistant:"):]
        text = text[1:] if text.startswith(" ") else text
    elif style == "chatml" and text.startswith("<|im_start|>assistant\n"):
        text = text[len("<|im_start|>assistant\n"):]
    elif style == "llama3":
        text = re.sub(r"^<\|start_header_id\|>assistant<\|end_header_id\|>\n\n", "", text)
    stripped = text.rstrip("\n")
    for end in END_MARKERS:
        if stripped.endswith(end):
            return stripped[: -len(end)]
    return text
