"""Chat turns in every shape the formats use -> the typed-content prompt of `PreferenceGroup`.

Shapes handled: `{"role", "content"}` (OpenAI / TRL / ms-swift) and `{"from", "value"}` (ShareGPT /
LLaVA / LLaMA-Factory); content as a string with `<image>` / `<video>` tags, or as typed parts
(`{"type": "text", "text"}`, `{"type": "image"}`, Arrow's `{"type": "image", "text": null}`,
LLaMA-Factory v1's `{"type": "text" | "image_url", "value"}`).

Images attach to placeholders in order. A prompt with no placeholder at all gets its images (and
video) at the start of its first user turn, the convention of MM-RLHF, TRL string content and
RLAIF-V; any other mismatch between placeholders and images is an error (`media_mismatch`).

    python -m pytest -q tests/test_data_formats.py -k chat
"""
from __future__ import annotations

from typing import Any

from .groups import text_to_turn
from .rows import RowContext

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
         "tool": "tool", "observation": "tool", "tool_response": "tool", "function_call": "assistant",
         "tool_call": "assistant"}
IMAGE_PART_TYPES = ("image", "image_url")
IMAGE_SOURCE_KEYS = ("image", "image_url", "url", "path", "value")

Turn = tuple[str, Any]  # (role, content: str | list of typed parts)


def message(msg: Any, ctx: RowContext, key: str) -> tuple[Turn, list]:
    """One message -> ((role, content), inline image sources found in its parts)."""
    if isinstance(msg, (list, tuple)) and len(msg) == 2 and all(isinstance(x, str) for x in msg):
        raise ctx.error(f"key '{key}': expected a message object, got a [query, response] pair", "missing_field",
                        key=key)
    if not isinstance(msg, dict):
        raise ctx.error(f"key '{key}': a message must be an object, got {type(msg).__name__}", "missing_field", key=key)
    raw_role = msg.get("role") if msg.get("role") is not None else msg.get("from")
    if raw_role is None:
        raise ctx.error(f"key '{key}': message has no 'role' (or 'from')", "missing_field", key=key)
    role = ROLES.get(str(raw_role).lower())
    if role is None:
        raise ctx.error(f"key '{key}': unknown role '{raw_role}' (known: {', '.join(ROLES)})", "bad_value", key=key)
    content = msg.get("content") if msg.get("content") is not None else msg.get("value")
    if content is None:
        raise ctx.error(f"key '{key}': message has no 'content' (or 'value')", "missing_field", key=key)
    if isinstance(content, str):
        return (role, content), []
    if not isinstance(content, list):
        raise ctx.error(f"key '{key}': content must be a string or a list of parts", "missing_field", key=key)
    parts, sources = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text") if part.get("text") is not None else part.get("value")
            parts.append({"type": "text", "text": text or ""})
        elif kind in IMAGE_PART_TYPES:
            parts.append({"type": "image"})
            src = next((part[k] for k in IMAGE_SOURCE_KEYS if part.get(k) is not None), None)
            if isinstance(src, dict) and "url" in src and "bytes" not in src:
                src = src["url"]
            sources.append(src)
        elif kind == "video":
            parts.append({"type": "video"})
        else:
            raise ctx.error(f"key '{key}.content[{i}]': unknown content part {part!r:.60}", "bad_value", key=key)
    return (role, parts), sources


def messages(value: Any, ctx: RowContext, key: str) -> tuple[list[Turn], list]:
    if not isinstance(value, list):
        raise ctx.error(f"field '{key}' must be a list of messages, got {type(value).__name__}", "missing_field",
                        key=key)
    turns, sources = [], []
    for i, m in enumerate(value):
        turn, src = message(m, ctx, f"{key}[{i}]")
        turns.append(turn)
        sources.extend(src)
    return turns, sources


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def same_turns(a: list[Turn], b: list[Turn]) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and x[1] == y[1] for x, y in zip(a, b))


def _placeholders(content: Any, kind: str) -> int:
    if isinstance(content, str):
        return content.count(f"<{kind}>")
    return sum(1 for p in content if p["type"] == kind)


def build_prompt(turns: list[Turn], n_images: int, has_video: bool, ctx: RowContext, key: str) -> list[dict]:
    """Turns -> typed-content prompt with image / video parts in place (or leading, see module doc)."""
    if not turns:
        raise ctx.error(f"key '{key}': the prompt has no turns", "missing_field", key=key)
    if turns[-1][0] != "user":
        raise ctx.error(f"key '{key}': the prompt must end with a user turn (it ends with '{turns[-1][0]}')",
                        "bad_value", key=key)
    first_user = next(i for i, t in enumerate(turns) if t[0] == "user")
    n_tags = sum(_placeholders(c, "image") for _, c in turns)
    v_tags = sum(_placeholders(c, "video") for _, c in turns)
    if n_tags not in (0, n_images):
        raise ctx.error(f"key '{key}': the prompt has {n_tags} image placeholder(s) (<image> tags or image parts) "
                        f"but the row gives {n_images} image(s)", "media_mismatch", key=key)
    if v_tags > (1 if has_video else 0):
        raise ctx.error(f"key '{key}': the prompt has {v_tags} <video> placeholder(s) but the row gives "
                        f"{1 if has_video else 0} video(s)", "media_mismatch", key=key)
    lead_images = n_images if n_tags == 0 else 0
    lead_video = has_video and v_tags == 0
    out = []
    for i, (role, content) in enumerate(turns):
        lead = i == first_user
        if isinstance(content, str):
            n = _placeholders(content, "image") + (lead_images if lead else 0)
            video = _placeholders(content, "video") > 0 or (lead and lead_video)
            out.append(text_to_turn(content, n, video, role=role))
        else:
            parts = [dict(p) for p in content]
            if lead:
                parts = [{"type": "video"}] * lead_video + [{"type": "image"}] * lead_images + parts
            out.append({"role": role, "content": parts})
    return out


def split_conversation(turns: list[Turn], ctx: RowContext, key: str) -> tuple[list[Turn], str]:
    """A conversation ending with the answer -> (prompt turns, answer text)."""
    if not turns or turns[-1][0] != "assistant":
        raise ctx.error(f"key '{key}': the conversation must end with the assistant's answer", "bad_value", key=key)
    return turns[:-1], _answer_text(turns[-1][1], ctx, key)


def _answer_text(content: Any, ctx: RowContext, key: str) -> str:
    if isinstance(content, list) and any(p["type"] != "text" for p in content):
        raise ctx.error(f"key '{key}': a response cannot contain images or video", "unsupported", key=key)
    return content_text(content)


def response_text(value: Any, ctx: RowContext, key: str) -> str:
    """A response given as a string, one message, or a list holding one assistant message."""
    if value is None:
        raise ctx.error(f"missing field '{key}' (format {ctx.fmt})", "missing_field", key=key)
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        (role, content), _ = message(value, ctx, key)
        return _answer_text(content, ctx, key)
    if isinstance(value, list):
        turns, _ = messages(value, ctx, key)
        if len(turns) != 1 or turns[0][0] != "assistant":
            raise ctx.error(f"key '{key}': expected one assistant message, got "
                            f"{[r for r, _ in turns]}", "bad_value", key=key)
        return _answer_text(turns[0][1], ctx, key)
    raise ctx.error(f"field '{key}' must be a string or an assistant message, got {type(value).__name__}",
                    "missing_field", key=key)


def common_prefix(a: list[Turn], b: list[Turn]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
