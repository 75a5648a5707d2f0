"""The one model of preference data: a group of K ranked responses to one (media + prompt).

MM-RLHF annotates 3-5 ranked responses per prompt; the pair files expand them to every pair with
different ranks. We keep the group: each response is scored / forwarded once, and every pair is
derived from the K values (REFERENCE.md, "MM-DPO": all comparison pairs).

    python -m mmrlhf_lite.data stats runs/demo/data/demo/demo.jsonl
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

Media = str | bytes  # a resolved file path, or the encoded bytes of an image stored inline

IMAGE_TAG = re.compile(r"<image>\n?")
VIDEO_TAG = re.compile(r"<video>\n?")


@dataclass
class Response:
    text: str
    rank: int | None = None        # 1 = best; equal ranks are ties
    score: float | None = None     # higher = better (human or reward-model score)
    critique: str | None = None    # textual evaluation of this response


@dataclass
class PreferenceGroup:
    """One prompt with its media and K >= 2 ranked responses, or, as a prompt for online rounds
    (`rounds.n > 0`), one without a ranking: no responses, or responses no rank, score or pair compares
    (`is_ranked()` tells them apart).

    `prompt` is a list of chat turns in the typed-content form every chat template takes:
    `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]`; the last turn
    is the user's. `images[i]` belongs to the i-th image part; a `{"type": "video"}` part stands for
    `video` (a list of sampled frames).
    """

    id: str
    prompt: list[dict]
    responses: list[Response]
    images: list[Media] = field(default_factory=list)
    video: list[Media] | None = None
    category: str = "general"
    source: str = ""                                    # "file:line" where the group's first row was read
    explicit_pairs: list[tuple[int, int]] | None = None  # (better, worse), used when no ranking can be recovered
    explicit_ties: list[tuple[int, int]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ----- pairs
    def is_ranked(self) -> bool:
        """Whether the responses can be compared: at least 2, with every rank, every score, or given pairs.
        A group that is not is a prompt only (what online rounds sample answers for)."""
        if len(self.responses) < 2:
            return False
        if self.explicit_pairs is not None:
            return True
        return all(r.rank is not None for r in self.responses) or all(r.score is not None for r in self.responses)

    def pairs(self) -> list[tuple[int, int]]:
        """Every (better, worse) pair of responses with different ranks (or the pairs as given)."""
        if self.explicit_pairs is not None:
            return list(self.explicit_pairs)
        ranks = self.ranks()
        return [(i, j) if ranks[i] < ranks[j] else (j, i)
                for i, j in itertools.combinations(range(len(self.responses)), 2) if ranks[i] != ranks[j]]

    def ties(self) -> list[tuple[int, int]]:
        """Pairs with equal rank: used by the reward model's tie loss, excluded from DPO."""
        if self.explicit_pairs is not None:
            return list(self.explicit_ties or [])
        ranks = self.ranks()
        return [(i, j) for i, j in itertools.combinations(range(len(self.responses)), 2) if ranks[i] == ranks[j]]

    def ranks(self) -> list[int]:
        """Ranks (1 = best), taken as given or derived from scores (equal scores tie)."""
        if all(r.rank is not None for r in self.responses):
            return [int(r.rank) for r in self.responses]
        if all(r.score is not None for r in self.responses):
            ordered = sorted({float(r.score) for r in self.responses}, reverse=True)
            return [ordered.index(float(r.score)) + 1 for r in self.responses]
        raise ValueError(f"group {self.id} ({self.source}): responses need all ranks or all scores")

    def best_vs_worst(self) -> list[tuple[int, int]]:
        """The one pair of the best against the worst response. With pairs as given (no ranking), the
        listed pair whose better side has the most net wins (wins - losses over the listed pairs) and whose
        worse side the fewest (on a tie, the pair of the better best side, then the first listed)."""
        pairs = self.pairs()
        if not pairs:
            return []
        if self.explicit_pairs is not None:
            net = [0] * len(self.responses)
            for b, w in pairs:
                net[b] += 1
                net[w] -= 1
            return [max(pairs, key=lambda p: (net[p[0]] - net[p[1]], net[p[0]]))]
        ranks = self.ranks()
        best = min(range(len(ranks)), key=lambda i: ranks[i])
        worst = max(range(len(ranks)), key=lambda i: ranks[i])
        return [(best, worst)] if ranks[best] != ranks[worst] else []

    def best_index(self) -> int:
        """The most-preferred response: rank 1 (or the most-preferred in the given pairs); the SFT term's
        response for every pair of the group under `dpo.sft_target: best`."""
        if self.explicit_pairs is not None:
            wins = [0] * len(self.responses)
            for b, _ in self.explicit_pairs:
                wins[b] += 1
            return max(range(len(wins)), key=lambda i: wins[i])
        ranks = self.ranks()
        return min(range(len(ranks)), key=lambda i: ranks[i])

    def subset(self, indices: list[int]) -> "PreferenceGroup":
        """The same prompt and media with only some responses (e.g. just the cache entries still missing)."""
        if list(indices) == list(range(len(self.responses))):
            return self
        return dataclasses.replace(self, responses=[self.responses[i] for i in indices], explicit_pairs=None,
                                   explicit_ties=None)

    # ----- prompt views
    @property
    def n_images(self) -> int:
        return len(self.images)

    def question_text(self) -> str:
        """The prompt as plain text (earlier turns as `Role: text` lines) for the critique template."""
        lines = []
        for i, turn in enumerate(self.prompt):
            text = "".join(p.get("text", "") for p in turn["content"] if p.get("type") == "text").strip()
            if i == len(self.prompt) - 1 and turn["role"] == "user":
                lines.append(text)
            elif text:
                lines.append(f"{turn['role'].capitalize()}: {text}")
        return "\n".join(lines)

    def to_record(self) -> dict:
        """The native `ranked` JSONL row (media as paths; inline bytes are not serialisable here)."""
        def media(m: Media) -> str:
            if isinstance(m, bytes):
                raise ValueError(f"group {self.id}: inline image bytes cannot be written to JSONL; save them first")
            return m
        rec: dict[str, Any] = {"id": self.id, "category": self.category, "prompt": self.prompt,
                               "images": [media(m) for m in self.images]}
        if self.video is not None:
            rec["video"] = [media(m) for m in self.video]
        rec["responses"] = [{k: v for k, v in (("text", r.text), ("rank", r.rank), ("score", r.score),
                                               ("critique", r.critique)) if v is not None}
                            for r in self.responses]
        if self.explicit_pairs is not None:
            rec["pairs"] = [list(p) for p in self.explicit_pairs]
            rec["ties"] = [list(p) for p in (self.explicit_ties or [])]
        if self.meta:
            rec["meta"] = self.meta
        return rec

    @classmethod
    def from_record(cls, rec: dict, source: str = "") -> "PreferenceGroup":
        """The inverse of `to_record`, taken as written: no validation, media paths unchanged.

        Files from users go through `readers.load_groups`, which checks every field and resolves paths.
        """
        pairs, ties = rec.get("pairs"), rec.get("ties")
        return cls(id=str(rec["id"]), prompt=rec["prompt"], category=rec.get("category", "general"),
                   images=list(rec.get("images") or []), video=rec.get("video"), source=source,
                   responses=[Response(r["text"], r.get("rank"), r.get("score"), r.get("critique"))
                              for r in rec["responses"]],
                   explicit_pairs=None if pairs is None else [tuple(p) for p in pairs],
                   explicit_ties=None if pairs is None else [tuple(p) for p in (ties or [])],
                   meta=dict(rec.get("meta") or {}))


def text_to_turn(text: str, n_images: int, has_video: bool = False, role: str = "user") -> dict:
    """A prompt string -> one typed-content turn.

    `<image>` / `<video>` tags (LLaVA, ms-swift, MM-RLHF style) become media parts in place; when the
    text has fewer image tags than images, the missing image parts go first (the usual convention).
    """
    parts: list[dict] = []
    pattern = re.compile(r"(<image>|<video>)\n?")
    pos, seen_images, seen_video = 0, 0, False
    for m in pattern.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        if m.group(1) == "<image>":
            if seen_images < n_images:
                parts.append({"type": "image"})
                seen_images += 1
        elif has_video and not seen_video:
            parts.append({"type": "video"})
            seen_video = True
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    lead = [{"type": "image"}] * (n_images - seen_images)
    if has_video and not seen_video:
        lead = [{"type": "video"}] + lead
    parts = lead + parts
    if not any(p["type"] == "text" for p in parts):
        parts.append({"type": "text", "text": ""})
    return {"role": role, "content": parts}


def count_media_parts(prompt: list[dict]) -> tuple[int, int]:
    """(image parts, video parts) across all turns."""
    images = sum(1 for t in prompt for p in t["content"] if p.get("type") == "image")
    videos = sum(1 for t in prompt for p in t["content"] if p.get("type") == "video")
    return images, videos
