"""The critique prompt and its encoding as one packed group.

REFERENCE.md ("Critique-based reward model"): the image, an "unbiased and fair evaluator" instruction,
then `[Question]: {question}` `[LMM Response]: {answer}` `[Evaluation]:`; the model's reply is the
critique; the scalar head reads the last token of [prompt + response + critique].

Packing: the text before the response (image + instruction + question) is the shared prefix of the
K responses; each branch is `response + [Evaluation]: + assistant header` (context) followed by
`reply prefix + critique + end of turn` (target tokens of the critique LM loss, masked by position). The
split falls where the tokenizer splits the template's own rendering of the whole conversation (the space
after `[LMM Response]:` goes with the response's first word), and response and critique texts are
tokenised as text (GroupEncoder.join), so the ids equal that rendering's (tests/test_chat_templates.py).

    python -m pytest tests/test_reward.py -q
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.groups import PreferenceGroup
from ..models.encoding import GroupEncoder
from ..models.packing import Branch, EncodedGroup

TEMPLATE_VERSION = "critique-v2"  # v2: template-exact token boundaries, data text never parsed for special tokens

INSTRUCTION = (
    "You are an unbiased and fair evaluator tasked with assessing the quality of answers provided by a Large "
    "Multimodal Model (LMM). Given the following question and the LMM's response, please evaluate the "
    "correctness, clarity, and completeness of the answer. Provide a detailed explanation of your assessment, "
    "including specific points of strength and areas for improvement."
)
_MARK = "\x1eMMRLHF_RESPONSE\x1e"


@dataclass
class CritiqueBranch(Branch):
    """A critique-prompt branch; its first `n_response` target tokens (when > 0) are the response's own
    tokens, whose mean log-prob feeds the score when the head has a response log-prob weight."""
    n_response: int = 0


@dataclass
class CritiqueParts:
    """Token pieces of one response's critique sequence (after the shared prefix)."""
    context: list[int]   # response + "[Evaluation]:" + end of user turn + assistant header
    critique: list[int]  # critique text + end of turn ([] when scoring without critique)


class CritiqueEncoder:
    """Builds reward-model inputs from a group: shared prefix + per-response branches."""

    def __init__(self, encoder: GroupEncoder):
        self.encoder = encoder

    def _template_split(self, group: PreferenceGroup) -> tuple[list[dict], list, str, str]:
        """(messages, images, text after the prefix up to the response, text after the response).

        The user turn is rendered once with a marker in place of the response and split there, so the
        chat template decides every separator exactly as in a full rendering.
        """
        messages, images = self.encoder.media(group)
        image_parts = [p for t in messages for p in t["content"] if p["type"] == "image"]
        text = f"{INSTRUCTION}\n[Question]: {group.question_text()}\n[LMM Response]: {_MARK}\n[Evaluation]:"
        user = {"role": "user", "content": image_parts + [{"type": "text", "text": text}]}
        rendered = self.encoder.processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        before, after = rendered.split(_MARK, 1)
        return [user], images, before, after

    def encode(self, group: PreferenceGroup, critiques: list[str | None] | None = None,
               with_critique: bool = True, response_targets: bool = False,
               generated: bool = False) -> tuple[EncodedGroup, list[CritiqueParts]]:
        """One EncodedGroup whose branch i scores response i (with critique i when given).

        `response_targets`: also mark the response's tokens as targets (before the critique's), so that the
        forward returns their log-probs (`reward.response_logp_weight`).
        `generated`: the critiques are the model's own; an empty one (the model ended its turn at once) is
        the end-of-turn token alone, as generated, so the head reads the end-of-turn position as for every
        other critique, not the no-critique position."""
        messages, images, before, after = self._template_split(group)
        proc, ge = self.encoder.processor, self.encoder
        # the whitespace before the response belongs to its first token (`: The` is `:` + ` The`)
        lead = before[len(before.rstrip()):]
        before = before[:len(before) - len(lead)]
        # images nested per sample, as GroupEncoder.encode_prefix does (LLaVA-OV multi-image rules)
        full = proc(text=[before], images=[images] if images else None, return_tensors="pt")
        prefix = {k: v for k, v in full.items() if hasattr(v, "shape") and k != "attention_mask"}
        if critiques is None:
            critiques = [r.critique for r in group.responses]
        parts, branches = [], []
        for r, crit in zip(group.responses, critiques):
            context = ge.join(lead, r.text, after)
            use = with_critique and (bool(crit) or (generated and crit is not None))
            critique = ge.join(ge.reply_prefix, crit, ge.end_of_turn) if use else []
            parts.append(CritiqueParts(context, critique))
            n_resp = self._response_len(lead, r.text, context) if response_targets else 0
            branches.append(CritiqueBranch(ids=context + critique, n_response=n_resp,
                                           target=[True] * n_resp + [False] * (len(context) - n_resp)
                                           + [True] * len(critique)))
        enc = EncodedGroup(prefix=prefix, branches=branches, group_id=group.id, source=group.source)
        self.encoder.check_length(group, enc, "critique prompt + response + critique")
        return enc, parts

    def _response_len(self, lead: str, text: str, context: list[int]) -> int:
        """How many leading context tokens are the response's own: the whitespace before it and its text
        (up to where tokenising it together with the text after it merges differently)."""
        alone = self.encoder.join(lead, text, "")
        n = 0
        while n < min(len(alone), len(context)) and alone[n] == context[n]:
            n += 1
        return n

    def generation_inputs(self, group: PreferenceGroup) -> tuple[dict, list[list[int]]]:
        """(prefix inputs, per-response context ids): the prompt for generating each critique is
        prefix + context_i (the model continues after the assistant header)."""
        enc, parts = self.encode(group, with_critique=False)
        return enc.prefix, [p.context for p in parts]
