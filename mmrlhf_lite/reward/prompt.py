"""The critique prompt and its encoding as one packed group.

REFERENCE.md ("Critique-based reward model"): the image, an "unbiased and fair evaluator" instruction,
then `[Question]: {question}` `[LMM Response]: {answer}` `[Evaluation]:`; the model's reply is the
critique; the scalar head reads the last token of [prompt + response + critique]. The template, the
branch tokens and the score are the score function's (`models/reward_score.py`, which an export carries);
this module lays them out as one packed group.

Packing: the text before the response (image + instruction + question) is the shared prefix of the
K responses; each branch is `response + [Evaluation]: + assistant header` (context) followed by
`reply prefix + critique + end of turn` (target tokens of the critique LM loss, masked by position). The
split falls where the tokenizer splits the template's own rendering of the whole conversation (the space
after `[LMM Response]:` goes with the response's first word), and response and critique texts are
tokenised as text (TemplateText.join), so the ids equal that rendering's (tests/test_chat_templates.py).

    python -m pytest tests/test_chat_templates.py -q
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.groups import PreferenceGroup
from ..models.encoding import GroupEncoder
from ..models.packing import Branch, EncodedGroup
from ..models.reward_score import critique_branch, critique_turn, split_at_response


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

    def encode(self, group: PreferenceGroup, critiques: list[str | None] | None = None,
               with_critique: bool = True, response_targets: bool = False,
               generated: bool = False) -> tuple[EncodedGroup, list[CritiqueParts]]:
        """One EncodedGroup whose branch i scores response i (with critique i when given).

        The prompt and each branch come from the score function (`reward_score.critique_turn`,
        `split_at_response`, `critique_branch`), the code an exported reward model scores with.
        `response_targets`: also mark the response's tokens as targets (before the critique's), so that the
        forward returns their log-probs (`reward.response_logp_weight`).
        `generated`: the critiques are the model's own; an empty one (the model ended its turn at once) is
        the end-of-turn token alone, as generated, so the head reads the end-of-turn position as for every
        other critique, not the no-critique position."""
        ge = self.encoder
        messages, images = ge.media(group)
        n_images = sum(1 for t in messages for p in t["content"] if p["type"] == "image")
        before, lead, after = split_at_response(ge.processor, critique_turn(n_images, group.question_text()))
        # images nested per sample, as GroupEncoder.encode_prefix does (LLaVA-OV multi-image rules)
        full = ge.processor(text=[before], images=[images] if images else None, return_tensors="pt")
        prefix = {k: v for k, v in full.items() if hasattr(v, "shape") and k != "attention_mask"}
        if critiques is None:
            critiques = [r.critique for r in group.responses]
        parts, branches = [], []
        for r, crit in zip(group.responses, critiques):
            b = critique_branch(ge.text, lead, after, r.text, crit, reply_prefix=ge.reply_prefix,
                                end_of_turn=ge.end_of_turn, with_critique=with_critique, generated=generated,
                                response_targets=response_targets)
            parts.append(CritiqueParts(b.context, b.critique))
            branches.append(CritiqueBranch(ids=b.ids, target=b.target, n_response=b.n_response))
        enc = EncodedGroup(prefix=prefix, branches=branches, group_id=group.id, source=group.source)
        ge.check_length(group, enc, "critique prompt + response + critique")
        return enc, parts

    def generation_inputs(self, group: PreferenceGroup) -> tuple[dict, list[list[int]]]:
        """(prefix inputs, per-response context ids): the prompt for generating each critique is
        prefix + context_i (the model continues after the assistant header)."""
        enc, parts = self.encode(group, with_critique=False)
        return enc.prefix, [p.context for p in parts]
