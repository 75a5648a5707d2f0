"""PreferenceGroup -> EncodedGroup: the chat template + processor for the shared prefix (image included)
and the tokenizer for each branch.

The prefix is rendered with the model's own chat template (`add_generation_prompt=True`) and processed
with its images, so image tokens are expanded exactly as in inference. Each response is tokenised on
its own and followed by the template's end-of-turn text, found once by rendering a marker reply.
A sequence longer than `max_length` is an error naming the group's file:line: nothing is truncated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.groups import PreferenceGroup
from ..data.media import list_frames, load_image, sample_frames
from .families import FamilySpec
from .packing import Branch, EncodedGroup

_MARK = "\x1eMMRLHF_MARK\x1e"


class SequenceTooLong(ValueError):
    """A prompt + response (+ critique) that does not fit max_length; names the sample."""


@dataclass
class GroupEncoder:
    processor: Any
    spec: FamilySpec
    max_length: int = 4096
    max_frames: int = 8

    def __post_init__(self):
        self.tokenizer = self.processor.tokenizer
        self.end_of_turn = self._find_end_of_turn()

    # ----- template facts
    def _find_end_of_turn(self) -> str:
        msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        full = self.processor.apply_chat_template(
            msgs + [{"role": "assistant", "content": [{"type": "text", "text": _MARK}]}], tokenize=False)
        if _MARK not in full:
            raise ValueError("the chat template drops assistant text; cannot locate response boundaries")
        tail = full.split(_MARK, 1)[1].rstrip()
        if not tail and self.tokenizer.eos_token:
            tail = self.tokenizer.eos_token
        return tail

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ----- media
    def open_media(self, media):
        """One image or frame as the processor takes it (the pre-flight's counting encoder reads sizes only)."""
        return load_image(media)

    def media(self, group: PreferenceGroup) -> tuple[list[dict], list]:
        """Messages with a video part expanded to its sampled frames, and the images in order."""
        images = [self.open_media(m) for m in group.images]
        frames = []
        if group.video is not None:
            paths = group.video if isinstance(group.video, list) else list_frames(group.video)
            frames = [self.open_media(f) for f in sample_frames(list(paths), self.max_frames)]
        messages, ordered, img_iter = [], [], iter(images)
        for turn in group.prompt:
            parts = []
            for part in turn["content"]:
                if part.get("type") == "image":
                    parts.append({"type": "image"})
                    ordered.append(next(img_iter))
                elif part.get("type") == "video":
                    for f in frames:
                        parts.append({"type": "image"})
                        ordered.append(f)
                else:
                    parts.append({"type": "text", "text": part.get("text") or ""})
            messages.append({"role": turn["role"], "content": parts})
        return messages, ordered

    def encode_prefix(self, messages: list[dict], images: list, text_after: str = "") -> dict[str, torch.Tensor]:
        """Processor outputs (batch 1) for the generation prompt, optionally followed by `text_after`."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + text_after
        # images nested per sample: LLaVA-OV encodes the images of a multi-image prompt (and video
        # frames) without anyres tiles, as in its training, only when it sees them as one sample's
        out = self.processor(text=[text], images=[images] if images else None, return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k != "attention_mask"}

    def check_length(self, group: PreferenceGroup, enc: EncodedGroup, what: str) -> None:
        for i, n in enumerate(enc.lengths()):
            if n > self.max_length:
                raise SequenceTooLong(
                    f"{group.source or group.id}: {what} of response {i + 1} is {n} tokens "
                    f"(prompt {enc.prefix_len}, of which image tokens {self.image_token_count(enc.prefix)}) "
                    f"> max_length {self.max_length}; raise max_length or lower model.max_pixels "
                    "(never truncated: cutting through image tokens breaks the sample)")

    def image_token_count(self, prefix: dict) -> int:
        if "mm_token_type_ids" in prefix:
            return int((prefix["mm_token_type_ids"] != 0).sum())
        image_id = getattr(self.processor, "image_token_id", None)
        if image_id is None:
            return 0
        return int((prefix["input_ids"] == image_id).sum())

    # ----- policy view (reference pass, DPO)
    def response_branch(self, text: str) -> Branch:
        ids = self.tokens(text + self.end_of_turn)
        return Branch(ids=ids, target=[True] * len(ids))

    def encode_policy(self, group: PreferenceGroup) -> EncodedGroup:
        messages, images = self.media(group)
        enc = EncodedGroup(prefix=self.encode_prefix(messages, images),
                           branches=[self.response_branch(r.text) for r in group.responses],
                           group_id=group.id, source=group.source)
        self.check_length(group, enc, "prompt + response")
        return enc

    def policy_prompt(self, group: PreferenceGroup) -> dict[str, torch.Tensor]:
        """Prefix inputs for sampling an answer from the policy."""
        messages, images = self.media(group)
        return self.encode_prefix(messages, images)
