"""Offline tiny-model kit: random-init VLMs with a locally trained tokenizer, processor and chat template.

Each model is built from a config, saved with `save_pretrained` into a cache folder and then loaded
back through the normal loader (`load_model`), so tests and the demo exercise the real loading code.
Nothing is downloaded.

    python -m mmrlhf_lite.models.tiny qwen2_vl          # builds (once) and prints the folder
    python -m mmrlhf_lite.models.tiny qwen2_5_vl:xs llava_onevision:xs qwen3_vl:xs idefics3:xs

Model paths in recipes: `tiny:<family>[:<size>]`, e.g. `tiny:qwen2_vl` or `tiny:qwen2_vl:xs`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

KIT_VERSION = 5  # bump when the kit's output changes: cached folders are keyed by it

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<image>", "<video>"]

# Chat templates written for the tiny twins that render every conversation this project builds (system,
# user and assistant turns; text, image and video parts) exactly as the released checkpoints' templates do
# (tests/test_chat_templates.py holds the expected renderings). transformers compiles templates with
# trim_blocks, so every newline here is written as an output expression, never after a block tag.

# One turn's content as the released Qwen2-VL / Qwen3-VL templates write it: a string as is, else its parts in
# order (an image or video part as its vision placeholder, numbered with add_vision_id; text parts as text).
_QWEN_TURN_CONTENT = (
    "{% if turn['content'] is string %}{{ turn['content'] }}{% else %}"
    "{% for part in turn['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set seen.images = seen.images + 1 %}{% if add_vision_id %}{{ 'Picture ' ~ seen.images ~ ': ' }}{% endif %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set seen.videos = seen.videos + 1 %}{% if add_vision_id %}{{ 'Video ' ~ seen.videos ~ ': ' }}{% endif %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)

# Qwen2-VL and Qwen2.5-VL (Qwen2-VL-*-Instruct, Qwen2.5-VL-*-Instruct): a default system turn unless the
# conversation starts with one; an image part is <|vision_start|><|image_pad|><|vision_end|> (the processor
# expands the pad), `add_vision_id` numbers them; every turn ends with <|im_end|> and a line break.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set seen = namespace(images=0, videos=0) %}"
    "{% for turn in messages %}"
    "{% if loop.first and turn['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' ~ turn['role'] ~ '\\n' }}"
    + _QWEN_TURN_CONTENT +
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen3-VL (Qwen3-VL-*-Instruct): no default system turn (a leading system turn renders its text parts
# only; later system turns are dropped); user turns as Qwen2-VL; assistant turns render text parts only.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set seen = namespace(images=0, videos=0) %}"
    "{% macro text_of(content) %}{% if content is string %}{{ content }}{% else %}"
    "{% for part in content %}{% if 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' ~ text_of(messages[0]['content']) ~ '<|im_end|>\\n' }}{% endif %}"
    "{% for turn in messages %}"
    "{% if turn['role'] == 'user' %}"
    "{{ '<|im_start|>user\\n' }}"
    + _QWEN_TURN_CONTENT +
    "{{ '<|im_end|>\\n' }}"
    "{% elif turn['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' ~ text_of(turn['content']) ~ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# LLaVA-OneVision (llava-hf/llava-onevision-qwen2-*-ov-hf): `<|im_start|>role ` (a space), then all image
# parts as <image>, all video parts as <video>, then each text part after a line break, then <|im_end|>
# with no line break between turns. The generation prompt is `<|im_start|>assistant` + line break (no
# space): a rendered reply's header differs from it (see families.FamilySpec.reply_header_differs).
LLAVA_CHAT_TEMPLATE = (
    "{% for turn in messages %}"
    "{{ '<|im_start|>' ~ turn['role'] ~ ' ' }}"
    "{% for part in turn['content'] if part['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for part in turn['content'] if part['type'] == 'video' %}{{ '<video>' }}{% endfor %}"
    "{% for part in turn['content'] if part['type'] == 'text' %}{{ '\\n' ~ part['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Idefics3 / SmolVLM (HuggingFaceTB/SmolVLM-Instruct): `<|im_start|>` once, then per turn the capitalised
# role and a colon, followed by a space unless the turn starts with an image; parts in order (<image> for
# an image); `<end_of_utterance>` and a line break after every turn; the generation prompt is `Assistant:`
# with no space, so a reply renders as `Assistant: ` + text: its first token carries that space.
IDEFICS3_CHAT_TEMPLATE = (
    "{{ '<|im_start|>' }}"
    "{% for turn in messages %}"
    "{{ turn['role'] | capitalize }}{{ ':' if turn['content'][0]['type'] == 'image' else ': ' }}"
    "{% for part in turn['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{{ '<end_of_utterance>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


@dataclass(frozen=True)
class TinySize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int
    vision_dim: int
    vision_heads: int
    image_size: int  # the processor resizes every image to about image_size^2 pixels
    vocab: int
    # Weight init std. transformers' 0.02 suits wide pretrained-size models; at hidden 128 with a frozen
    # random LM head it caps every logit near 2.6 (RMSNorm keeps |h| ~ sqrt(hidden)), so no token can get
    # probability above ~1-2% and LoRA cannot learn even the answer template (measured: NLL stuck at 4.3).
    init_range: float = 0.02


SIZES = {
    # tests: fastest that still exercises every code path
    "xs": TinySize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_depth=1,
                   vision_dim=32, vision_heads=2, image_size=56, vocab=640),
    # the demo recipe: big enough to learn the synthetic image-grounded task on CPU in minutes
    "s": TinySize(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vision_depth=2,
                  vision_dim=128, vision_heads=4, image_size=112, vocab=1024, init_range=0.08),
    # loading tests (tests/test_fsdp_loading.py): ~97M parameters (388 MB in fp32), 94% of them in the decoder
    # layers, so that the weights, not the interpreter, dominate a load's memory
    "m": TinySize(hidden=1024, layers=8, heads=8, kv_heads=4, intermediate=2816, vision_depth=1,
                  vision_dim=64, vision_heads=2, image_size=56, vocab=1024),
}


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: the demo's vocabulary, the critique template, plain English."""
    colours = "red green blue yellow purple orange black white gray pink brown cyan".split()
    shapes = "circle circles square squares triangle triangles star stars shape shapes".split()
    places = "top bottom left right center middle upper lower corner side above below".split()
    numbers = "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9".split()
    words = ("the a an is are there in of on at to and or but not no yes this that it image picture "
             "question answer response evaluation correct incorrect wrong right partially accurate "
             "hallucinated mentions says shows contains describes count colour color position how many "
             "what which where sorry cannot help with request harmful unsafe please assistant user "
             "helpful detailed careful looks like I can see see".split())
    rng = random.Random(0)
    vocab = colours + shapes + places + numbers + words
    lines = [" ".join(rng.choices(vocab, k=rng.randint(4, 16))) for _ in range(4000)]
    lines += [
        "You are an unbiased and fair evaluator tasked with assessing the quality of answers provided by a "
        "Large Multimodal Model (LMM). Given the following question and the LMM's response, please evaluate "
        "the correctness, clarity, and completeness of the answer. Provide a detailed explanation of your "
        "assessment, including specific points of strength and areas for improvement.",
        "[Question]: [LMM Response]: [Evaluation]:",
        "The response correctly identifies the red circle. The response is wrong: the image shows blue.",
        "How many circles are in the image? What colour is the square? Where is the triangle?",
    ]
    return lines


def build_tokenizer(size: TinySize, chat_template: str, extra_special: tuple[str, ...] = (),
                    eos: str = "<|im_end|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size.vocab, special_tokens=SPECIAL_TOKENS + list(extra_special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>",
                                   padding_side="left", model_max_length=32768)
    fast.chat_template = chat_template
    return fast


def _vision_token_ids(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return ids


def _build_qwen(family: str, size: TinySize, out: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, \
        Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(size, QWEN2_VL_CHAT_TEMPLATE)
    ids = _vision_token_ids(tok)
    head_dim = size.hidden // size.heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2 (temporal, height, width)
    text = dict(vocab_size=len(tok), hidden_size=size.hidden, intermediate_size=size.intermediate,
                num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": mrope},
                tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    if family == "qwen2_vl":
        vision = dict(depth=size.vision_depth, embed_dim=size.vision_dim, hidden_size=size.hidden,
                      num_heads=size.vision_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_chans=3)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        model = Qwen2VLForConditionalGeneration(cfg)
    else:
        vision = dict(depth=size.vision_depth, hidden_size=size.vision_dim, out_hidden_size=size.hidden,
                      intermediate_size=size.vision_dim * 2, num_heads=size.vision_heads, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                      fullatt_block_indexes=[size.vision_depth - 1])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    px = size.image_size * size.image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=px, max_pixels=px, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    processor_class = "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"
    _save(out, model, tok, image_processor, processor_class, QWEN2_VL_CHAT_TEMPLATE, init_range=size.init_range)


def _build_qwen3_vl(family: str, size: TinySize, out: Path) -> None:
    """Qwen3-VL: 16 px patches (32 px per merged token), interleaved M-RoPE, DeepStack.

    Interleaved M-RoPE assigns rotary frequency i to height when i % 3 == 1 and width when i % 3 == 2
    (for i < 3 * section), the rest to time: the section sizes below fill head_dim / 2 that way.
    DeepStack adds the vision tower's intermediate features to the first decoder layers' hidden states
    at image positions; every vision block feeds one decoder layer here.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(size, QWEN3_VL_CHAT_TEMPLATE)
    ids = _vision_token_ids(tok)
    head_dim = size.hidden // size.heads
    half = head_dim // 2
    spatial = (half - 2) // 3
    text = dict(vocab_size=len(tok), hidden_size=size.hidden, intermediate_size=size.intermediate,
                num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                head_dim=head_dim, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                 "mrope_section": [half - 2 * spatial, spatial, spatial], "mrope_interleaved": True},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=size.vision_depth, hidden_size=size.vision_dim, out_hidden_size=size.hidden,
                  intermediate_size=size.vision_dim * 2, num_heads=size.vision_heads, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
                  deepstack_visual_indexes=list(range(min(size.vision_depth, size.layers))))
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    model = Qwen3VLForConditionalGeneration(cfg)
    side = max(32, round(size.image_size / 32) * 32)  # a multiple of patch 16 x merge 2
    image_processor = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=16,
                                               merge_size=2, temporal_patch_size=2,
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    _save(out, model, tok, image_processor, "Qwen3VLProcessor", QWEN3_VL_CHAT_TEMPLATE, init_range=size.init_range)


def _build_llava_onevision(family: str, size: TinySize, out: Path) -> None:
    """LLaVA-OneVision: SigLIP tower on `tile` px crops, Qwen2 decoder, anyres up to 2 x 2 tiles.

    An image becomes the base tile's tokens, plus the unpadded tile grid with one newline token per
    row; tile = image_size / 2 keeps the whole grid near `image_size` px like the other families.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil

    tok = build_tokenizer(size, LLAVA_CHAT_TEMPLATE)
    ids = _vision_token_ids(tok)
    tile, patch = size.image_size // 2, 14
    pinpoints = [[tile * rows, tile * cols] for rows in (1, 2) for cols in (1, 2)]
    vision = dict(model_type="siglip_vision_model", hidden_size=size.vision_dim,
                  intermediate_size=size.vision_dim * 2, num_hidden_layers=size.vision_depth,
                  num_attention_heads=size.vision_heads, image_size=tile, patch_size=patch)
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=size.hidden,
                intermediate_size=size.intermediate, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                num_key_value_heads=size.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                               video_token_index=ids["<video>"], image_grid_pinpoints=pinpoints,
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                      image_grid_pinpoints=pinpoints)
    _save(out, model, tok, image_processor, "LlavaOnevisionProcessor", LLAVA_CHAT_TEMPLATE,
          processor_kwargs={"num_image_tokens": (tile // patch) ** 2, "vision_feature_select_strategy": "full",
                            "vision_aspect_ratio": "anyres_max_9"}, init_range=size.init_range)


def _build_idefics3(family: str, size: TinySize, out: Path) -> None:
    """Idefics3 (SmolVLM v1): SigLIP-style tower, pixel-shuffle connector (scale 2), Llama decoder.

    Image splitting is off: each image is resized to one `image_size` square and becomes
    `<fake_token_around_image><global-img>` + (image_size / 14)^2 / 4 `<image>` tokens + `<fake_token_around_image>`.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = build_tokenizer(size, IDEFICS3_CHAT_TEMPLATE, extra_special=tuple(IDEFICS3_TOKENS), eos="<end_of_utterance>")
    eos, pad = tok.convert_tokens_to_ids("<end_of_utterance>"), tok.convert_tokens_to_ids("<|endoftext|>")
    patch, scale = 14, 2
    vision = dict(hidden_size=size.vision_dim, intermediate_size=size.vision_dim * 2,
                  num_hidden_layers=size.vision_depth, num_attention_heads=size.vision_heads,
                  image_size=size.image_size, patch_size=patch)
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=size.hidden,
                intermediate_size=size.intermediate, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                num_key_value_heads=size.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                eos_token_id=eos, pad_token_id=pad)
    cfg = Idefics3Config(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         scale_factor=scale, pad_token_id=pad, tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(cfg)
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": size.image_size},
                                                max_image_size={"longest_edge": size.image_size})
    _save(out, model, tok, image_processor, "Idefics3Processor", IDEFICS3_CHAT_TEMPLATE,
          processor_kwargs={"image_seq_len": (size.image_size // patch) ** 2 // scale ** 2},
          init_range=size.init_range)


def _reinit(model, std: float) -> None:
    """Re-draw every linear/conv/embedding weight from N(0, std) (biases 0, norms stay 1)."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d, nn.Conv3d)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()


def _save(out: Path, model, tok, image_processor, processor_class: str, chat_template: str,
          processor_kwargs: dict | None = None, init_range: float = 0.02) -> None:
    if init_range != 0.02:
        _reinit(model, init_range)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    _write_processor_files(out, processor_class, chat_template, processor_kwargs or {})


def _write_processor_files(out: Path, processor_class: str, chat_template: str, processor_kwargs: dict) -> None:
    """What `processor.save_pretrained` writes, without needing a torchvision video processor here.

    `processor_kwargs` are the processor's own constructor arguments (LLaVA-OV's `num_image_tokens`,
    Idefics3's `image_seq_len`): `load_processor` passes them on, as `AutoProcessor` would.
    """
    (out / "chat_template.jinja").write_text(chat_template)
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": processor_class, **processor_kwargs}, indent=2))
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["processor_class"] = processor_class
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


BUILDERS = {"qwen2_vl": _build_qwen, "qwen2_5_vl": _build_qwen, "qwen3_vl": _build_qwen3_vl,
            "llava_onevision": _build_llava_onevision, "idefics3": _build_idefics3}


def cache_root() -> Path:
    root = os.environ.get("MMRLHF_LITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmrlhf_lite")
    return Path(root)


def parse_spec(spec: str) -> tuple[str, str]:
    """`tiny:qwen2_vl[:xs]` -> ("qwen2_vl", "xs")."""
    body = spec[len("tiny:"):] if spec.startswith("tiny:") else spec
    family, _, size = body.partition(":")
    size = size or "s"
    if family not in BUILDERS:
        raise ValueError(f"no tiny model for family '{family}'; tiny families: {', '.join(sorted(BUILDERS))}")
    if size not in SIZES:
        raise ValueError(f"unknown tiny size '{size}'; sizes: {', '.join(SIZES)}")
    return family, size


def build_once(out: Path, build) -> Path:
    """Run `build(tmp_folder)` once for `out`: into a temp folder renamed into place, so a kill or a
    concurrent builder never leaves a half-written model folder (`config.json` marks a finished one)."""
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_tiny(spec: str, root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Build the tiny model once (atomically) and return its folder."""
    family, size_name = parse_spec(spec)
    size = SIZES[size_name]
    key = hashlib.sha256(json.dumps([KIT_VERSION, family, asdict(size), seed]).encode()).hexdigest()[:10]

    def build(tmp: Path) -> None:
        import torch
        from transformers import logging as hf_logging

        torch.manual_seed(seed)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            BUILDERS[family](family, size, tmp)
        finally:
            hf_logging.set_verbosity(verbosity)
        (tmp / "TINY_MODEL.json").write_text(json.dumps({"family": family, "size": size_name, "seed": seed,
                                                         "kit_version": KIT_VERSION, **asdict(size)}, indent=2))

    return build_once(Path(root or cache_root()) / "tiny" / f"{family}-{size_name}-{key}", build)

if __name__ == "__main__":
    for arg in sys.argv[1:] or ["qwen2_vl"]:
        print(ensure_tiny(arg if arg.startswith("tiny:") else f"tiny:{arg}"))
