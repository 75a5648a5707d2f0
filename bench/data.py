"""Synthetic preference groups with controlled image-token and response lengths.

A group is one image (W x H pixels, multiples of 28, so that a Qwen2-VL processor makes exactly
(W / 28) * (H / 28) image tokens), a short question and K ranked responses of about `response_tokens`
tokens each (lengths spread +-`spread` so that padding shows up as it does on real data). The same
groups feed every system: ours as `PreferenceGroup`s, TRL as one row per ranked pair (K(K-1)/2 rows per
group: the image and prompt repeated in each), its prompt rendered with the same chat template and its
completions ending with the same end-of-turn text, so both see the same tokens.

    python -c "from bench.data import image_size; print(image_size(1024))"   # (896, 896)
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from mmrlhf_lite.data.groups import PreferenceGroup, Response

WORDS = ("the a is are there in of on at to and or but not image picture shows red green blue yellow purple "
         "orange black white circle square triangle star shape top bottom left right center middle corner "
         "above below one two three four five six seven eight nine ten count colour position answer question "
         "response correct wrong it this that see can how many what which where").split()


@dataclass(frozen=True)
class SyntheticSpec:
    image_tokens: int = 1024
    k: int = 4
    response_tokens: int = 186
    question_tokens: int = 24
    spread: float = 0.15
    seed: int = 0


def image_size(image_tokens: int, merge_px: int = 28) -> tuple[int, int]:
    """(width, height) in pixels whose Qwen2-VL token grid (W/28) x (H/28) has exactly `image_tokens` cells,
    as square as the factorisation allows."""
    if image_tokens < 1:
        raise ValueError("image_tokens must be >= 1")
    rows = max(d for d in range(1, int(math.isqrt(image_tokens)) + 1) if image_tokens % d == 0)
    return merge_px * (image_tokens // rows), merge_px * rows


def _image_bytes(size: tuple[int, int], rng: random.Random) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        draw.rectangle((x0, y0, x0 + rng.randrange(8, 200), y0 + rng.randrange(8, 200)),
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def text_of_tokens(tokenizer, n: int, rng: random.Random) -> str:
    """Random words whose tokenisation is `n` tokens (cut at a word boundary; the BPE pre-tokeniser never
    merges across words, so the count is exact unless the last word is several tokens, then slightly more)."""
    words = [rng.choice(WORDS) for _ in range(2 * n + 8)]
    text = " ".join(words)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= n:
        return text
    end = enc["offset_mapping"][n - 1][1]
    nxt = text.find(" ", end)
    return text if nxt < 0 else text[:nxt]


def make_groups(tokenizer, spec: SyntheticSpec, n_groups: int) -> list[PreferenceGroup]:
    """Deterministic in (spec, n_groups): each group's content depends only on the seed and its index."""
    size = image_size(spec.image_tokens)
    groups = []
    for gi in range(n_groups):
        rng = random.Random(f"{spec.seed}-{gi}")
        question = text_of_tokens(tokenizer, spec.question_tokens, rng)
        responses = []
        ranks = list(range(1, spec.k + 1))
        rng.shuffle(ranks)
        for rank in ranks:
            lo, hi = (max(1, round(spec.response_tokens * (1 - spec.spread))),
                      max(1, round(spec.response_tokens * (1 + spec.spread))))
            text = text_of_tokens(tokenizer, rng.randint(lo, hi), rng)
            responses.append(Response(text=text, rank=rank, score=float(spec.k - rank) + rng.random() * 0.5))
        groups.append(PreferenceGroup(
            id=f"bench-{gi}", prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            responses=responses, images=[_image_bytes(size, rng)], source=f"synthetic:{gi}"))
    return groups


def trl_pair_rows(groups: list[PreferenceGroup], encoder) -> list[dict]:
    """TRL's standard (non-conversational) vision preference rows, one per ranked pair:
    `{"images": [PIL], "prompt": rendered prompt text, "chosen": text + end-of-turn, "rejected": ...}`.

    The prompt is rendered by the processor's chat template exactly as `GroupEncoder.encode_prefix` does, and
    completions are the reply prefix, the response text and the template's end-of-turn, as `GroupEncoder.response_branch`
    tokenises them: TRL's collator then produces the same prompt and completion tokens as our encoder.
    """
    rows = []
    for g in groups:
        messages, images = encoder.media(g)
        prompt = encoder.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for b, w in g.pairs():
            rows.append({"images": images, "prompt": prompt,
                         "chosen": encoder.reply_prefix + g.responses[b].text + encoder.end_of_turn,
                         "rejected": encoder.reply_prefix + g.responses[w].text + encoder.end_of_turn,
                         "group_id": g.id, "pair": [b, w]})
    return rows


def group_token_counts(encoded) -> dict:
    """Prompt (incl. image tokens) and response lengths of encoded groups, for the FLOP model and reports."""
    out = {"prompt": [], "responses": [], "image_tokens": []}
    for e in encoded:
        out["prompt"].append(e.prefix_len)
        out["responses"].append([len(b.ids) for b in e.branches])
        mm = e.prefix.get("mm_token_type_ids")
        out["image_tokens"].append(int((mm != 0).sum()) if mm is not None else 0)
    return out
