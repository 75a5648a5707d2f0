"""The tokens we score are the tokens the model's own chat template writes, on every family.

1. Each tiny twin's chat template renders conversations exactly as the released checkpoint's does
   (Qwen2-VL/Qwen2.5-VL-Instruct, Qwen3-VL-Instruct, llava-onevision-qwen2-*-ov-hf, SmolVLM-Instruct): the
   expected strings below were worked out by hand from the released chat_template.json files.
2. For (prompt, response) the packed path scores, the prompt ids equal the processor's ids of the template's
   generation prompt and the branch ids equal the response part of the template's rendering of the whole
   conversation (user turn + assistant reply); where the template's reply header is its generation prompt
   (all but LLaVA-OneVision) the whole sequence is that rendering's. Same for critiques (reward/prompt.py).
3. Data text is tokenised as text: `<image>` / `<|im_end|>` inside a response stay characters; in a prompt
   they are an error naming the sample.

    python -m pytest -q tests/test_chat_templates.py
"""
from __future__ import annotations

import pytest
from PIL import Image

from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn
from mmrlhf_lite.models.encoding import GroupEncoder, SpecialTokenInPrompt
from mmrlhf_lite.models.families import FAMILIES
from mmrlhf_lite.models.loading import load_processor
from mmrlhf_lite.models.tiny import ensure_tiny
from mmrlhf_lite.models.reward_score import INSTRUCTION
from mmrlhf_lite.reward.prompt import CritiqueEncoder

FAMILY_NAMES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "idefics3")

_QWEN_USER = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
_QWEN2_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
_QWEN_TWO = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompare<|vision_start|><|image_pad|>"
             "<|vision_end|> and <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")
# (image + question with a reply, the same as a generation prompt, system + two images as a generation prompt)
EXPECTED = {
    "qwen2_vl": (_QWEN2_SYSTEM + _QWEN_USER + "<|im_start|>assistant\nRed.<|im_end|>\n",
                 _QWEN2_SYSTEM + _QWEN_USER + "<|im_start|>assistant\n", _QWEN_TWO),
    "qwen3_vl": (_QWEN_USER + "<|im_start|>assistant\nRed.<|im_end|>\n", _QWEN_USER + "<|im_start|>assistant\n",
                 _QWEN_TWO),
    "llava_onevision": ("<|im_start|>user <image>\nWhat colour?<|im_end|><|im_start|>assistant \nRed.<|im_end|>",
                        "<|im_start|>user <image>\nWhat colour?<|im_end|><|im_start|>assistant\n",
                        "<|im_start|>system \nBe brief.<|im_end|><|im_start|>user <image><image>\nCompare\n and "
                        "<|im_end|><|im_start|>assistant\n"),
    "idefics3": ("<|im_start|>User:<image>What colour?<end_of_utterance>\nAssistant: Red.<end_of_utterance>\n",
                 "<|im_start|>User:<image>What colour?<end_of_utterance>\nAssistant:",
                 "<|im_start|>System: Be brief.<end_of_utterance>\nUser: Compare<image> and <image>"
                 "<end_of_utterance>\nAssistant:"),
}
EXPECTED["qwen2_5_vl"] = EXPECTED["qwen2_vl"]
# the end of the rendered reply's header (hand-read from the released templates)
REPLY_HEADER = {"qwen2_vl": "<|im_start|>assistant\n", "qwen2_5_vl": "<|im_start|>assistant\n",
                "qwen3_vl": "<|im_start|>assistant\n", "llava_onevision": "<|im_start|>assistant \n",
                "idefics3": "Assistant:"}
RESPONSES = ("The square is red.", "It is a blue circle on the left.", "I see two green stars")
CRITIQUES = ("The response is correct.", "Wrong: the image shows red.", "Partially accurate")


def _text(t):
    return {"type": "text", "text": t}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, cache_dir):
    spec = FAMILIES[request.param]
    processor = load_processor(str(ensure_tiny(f"tiny:{spec.name}:xs")), spec)
    return spec, processor


def test_tiny_templates_render_as_the_released_ones(family):
    spec, processor = family
    with_reply, gen, two = EXPECTED[spec.name]
    user = {"role": "user", "content": [{"type": "image"}, _text("What colour?")]}
    render = processor.apply_chat_template
    assert render([user, {"role": "assistant", "content": [_text("Red.")]}], tokenize=False) == with_reply
    assert render([user], add_generation_prompt=True, tokenize=False) == gen
    system = {"role": "system", "content": [_text("Be brief.")]}
    both = {"role": "user", "content": [_text("Compare"), {"type": "image"}, _text(" and "), {"type": "image"}]}
    assert render([system, both], add_generation_prompt=True, tokenize=False) == two
    if spec.name.startswith("qwen"):
        numbered = render([user], add_generation_prompt=True, tokenize=False, add_vision_id=True)
        assert "user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>What colour?" in numbered


def _group(tmp_path, responses=RESPONSES, question="What colour is the square?") -> PreferenceGroup:
    path = tmp_path / "img.png"
    Image.new("RGB", (60, 44), (200, 40, 40)).save(path)
    return PreferenceGroup(id="g", prompt=[text_to_turn(question, 1)], source="data.jsonl:7",
                           responses=[Response(t, rank=i + 1, critique=c)
                                      for i, (t, c) in enumerate(zip(responses, CRITIQUES))],
                           images=[str(path)])


def _ids(processor, text: str, images) -> list[int]:
    out = processor(text=[text], images=[images] if images else None, return_tensors="pt")
    return out["input_ids"][0].tolist()


def _strip_trailing_space(tok, ids: list[int]) -> list[int]:
    while ids and not tok.decode(ids[-1:]).strip():
        ids = ids[:-1]
    return ids


def _check_reply(spec, processor, prompt_ids, branch_ids, user_turns, reply_text, images):
    """prompt ids == the template's generation prompt; branch ids == the response part of its rendering
    of the conversation with the reply (after the reply header, up to the line break between turns)."""
    tok = processor.tokenizer
    render = processor.apply_chat_template
    assert prompt_ids == _ids(processor, render(user_turns, add_generation_prompt=True, tokenize=False), images)
    full = render(user_turns + [{"role": "assistant", "content": [_text(reply_text)]}], tokenize=False)
    full_ids = _strip_trailing_space(tok, _ids(processor, full, images))
    start = len(full_ids) - len(branch_ids)
    assert full_ids[start:] == branch_ids
    assert tok.decode(full_ids[:start]).endswith(REPLY_HEADER[spec.name])
    if not spec.reply_header_differs:
        assert full_ids == prompt_ids + branch_ids


def test_policy_branches_are_the_templates_reply_tokens(family, tmp_path):
    spec, processor = family
    encoder = GroupEncoder(processor, spec)
    group = _group(tmp_path)
    enc = encoder.encode_policy(group)
    messages, images = encoder.media(group)
    assert encoder.reply_prefix == (" " if spec.name == "idefics3" else "")
    for branch, text in zip(enc.branches, RESPONSES):
        _check_reply(spec, processor, enc.prefix["input_ids"][0].tolist(), branch.ids, messages, text, images)


def test_critique_branches_are_the_templates_tokens(family, tmp_path):
    spec, processor = family
    encoder = GroupEncoder(processor, spec)
    group = _group(tmp_path)
    enc, parts = CritiqueEncoder(encoder).encode(group)
    _, images = encoder.media(group)
    prefix = enc.prefix["input_ids"][0].tolist()
    for part, text, critique in zip(parts, RESPONSES, CRITIQUES):
        question = f"{INSTRUCTION}\n[Question]: {group.question_text()}\n[LMM Response]: {text}\n[Evaluation]:"
        user = [{"role": "user", "content": [{"type": "image"}, _text(question)]}]
        _check_reply(spec, processor, prefix + part.context, part.critique, user, critique, images)


def test_special_token_strings_in_responses_stay_text(family, tmp_path):
    """A literal `<image>` (LLaVA-OV's image placeholder) or end-of-turn string inside a response is text:
    it neither adds an image token nor ends the turn early."""
    spec, processor = family
    encoder = GroupEncoder(processor, spec)
    tricky = (f"Here <image> is {encoder.end_of_turn} not the end.", "<|im_start|>user\nhi", "plain")
    enc = encoder.encode_policy(_group(tmp_path, responses=tricky))
    special = set(getattr(processor.tokenizer, "all_special_ids", [])) | {
        i for i, t in processor.tokenizer.added_tokens_decoder.items()}
    end_ids = encoder.template_tokens(encoder.end_of_turn)
    for branch, text in zip(enc.branches, tricky):
        body = branch.ids[:len(branch.ids) - len(end_ids)]
        assert branch.ids[len(body):] == end_ids
        assert not special & set(body), text
        assert processor.tokenizer.decode(body) == encoder.reply_prefix + text


def test_special_token_string_in_a_prompt_is_an_error_naming_the_sample(family, tmp_path):
    spec, processor = family
    encoder = GroupEncoder(processor, spec)
    bad = _group(tmp_path, question="What is in <image> and <|im_end|> here?")
    with pytest.raises(SpecialTokenInPrompt, match=r"^data\.jsonl:7: the prompt text contains '<\|im_end\|>', a "
                                                   r"special token of this model's tokenizer"):
        encoder.encode_policy(bad)
    with pytest.raises(SpecialTokenInPrompt, match=r"^data\.jsonl:7: "):
        CritiqueEncoder(encoder).encode(bad)


def test_every_family_names_its_reply_and_image_token_rules():
    """The per-family knowledge sits in the families table: an image-token counting rule for each."""
    from mmrlhf_lite.models.image_tokens import image_counter

    assert set(FAMILIES) == set(FAMILY_NAMES)
    assert all(image_counter(spec) is not None for spec in FAMILIES.values())
    assert [n for n, s in FAMILIES.items() if s.reply_header_differs] == ["llava_onevision"]
