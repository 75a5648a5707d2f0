"""PreferenceGroup -> EncodedGroup: the chat template + processor for the shared prefix (image included)
and the tokenizer for each branch.

The prefix is rendered with the model's own chat template (`add_generation_prompt=True`) and processed
with its images, so image tokens are expanded exactly as in inference. Each branch is what the same
template writes for the reply: the reply prefix, the response text and the end of turn
(`families.reply_boundary`), so its ids are the response part of the template's own rendering of the whole
conversation (tests/test_chat_templates.py checks it on every family). Data text (responses, critiques) is
tokenised as text: a literal `<image>` or `<|im_end|>` in a response stays characters, it never becomes the
image placeholder or ends the turn; such a string in a prompt is an error naming the sample.
A sequence longer than `max_length` is an error naming the group's file:line: nothing is truncated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.groups import PreferenceGroup
from ..data.media import list_frames, load_image, sample_frames
from .families import FamilySpec, reply_boundary
from .packing import Branch, EncodedGroup
from .reward_score import TemplateText


class SequenceTooLong(ValueError):
    """A prompt + response (+ critique) that does not fit max_length; names the sample."""


class SpecialTokenInPrompt(ValueError):
    """A prompt's text holds one of the tokenizer's special-token strings; names the sample."""


@dataclass
class GroupEncoder:
    processor: Any
    spec: FamilySpec
    max_length: int = 4096
    max_frames: int = 8

    def __post_init__(self):
        self.tokenizer = self.processor.tokenizer
        self.reply_prefix, self.end_of_turn = reply_boundary(self.processor, self.spec)
        self.text = TemplateText(self.tokenizer)
        self.special_strings = self.text.special_strings

    # ----- tokens (reward_score.TemplateText: the reward model's score function tokenises with the same code)
    def tokens(self, text: str) -> list[int]:
        """Ids of data text: special-token strings in it are tokenised as ordinary characters."""
        return self.text.tokens(text)

    def template_tokens(self, text: str) -> list[int]:
        """Ids of text the chat template wrote: its special tokens are special."""
        return self.text.template_tokens(text)

    def join(self, lead: str, data: str, trail: str) -> list[int]:
        """Ids of template text `lead` + data text + template text `trail`, as the tokenizer splits the
        whole rendering (`TemplateText.join`)."""
        return self.text.join(lead, data, trail)

    def check_prompt_text(self, group: PreferenceGroup, text: str) -> None:
        sp = self.text.special_string_in(text)
        if sp:
            raise SpecialTokenInPrompt(
                f"{group.source or group.id}: the prompt text contains {sp!r}, a special token of this "
                "model's tokenizer: the chat template would read it as that token (an image placeholder, "
                "a turn boundary), not as text; remove or rewrite it in the data")

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
                    self.check_prompt_text(group, part.get("text") or "")
                    parts.append({"type": "text", "text": part.get("text") or ""})
            messages.append({"role": turn["role"], "content": parts})
        return messages, ordered

    def encode_prefix(self, messages: list[dict], images: list) -> dict[str, torch.Tensor]:
        """Processor outputs (batch 1) for the generation prompt."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
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
        """Reply prefix + response + end of turn: what the template writes after the generation prompt."""
        ids = self.join(self.reply_prefix, text, self.end_of_turn)
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
