"""What each VLM family needs, in one table (no `if family == ...` chains elsewhere).

    python -c "from mmrlhf_lite.models.families import FAMILIES; print(sorted(FAMILIES))"

Per family: the processor classes (with the torchvision-free image processor used when torchvision is
missing), where the language model and the vision tower live (LoRA targets only the former by default,
4-bit skips the latter), whether positions are M-RoPE (3-D, from the model's own rope-index function),
which processor outputs the forward takes, where a reply starts after the chat template's generation
prompt (`reply_boundary`), and how many tokens an image becomes (`image_tokens.IMAGE_COUNTERS`).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    processor_class: str
    image_processor_class: str                  # torchvision-free (PIL) image processor
    image_processor_module: str                 # the module defining it (see `image_processor_type`)
    text_prefix: str                            # module path of the language model decoder
    vision_prefixes: tuple[str, ...]            # vision tower + projector modules
    mrope: bool = False                         # 3-D M-RoPE positions from `get_rope_index`
    forward_keys: tuple[str, ...] = ("pixel_values",)
    unsloth: bool = True                        # FastVisionModel supports this family
    packing: bool = True                        # attention takes a 4-D mask + explicit positions
    pixel_limits: str = "pixels"                # how model.max/min_pixels apply: see `apply_pixel_limits`
    image_tokens: str = "qwen"                  # image-token counting rule: a key of image_tokens.IMAGE_COUNTERS
    # The released template writes a reply's header unlike its generation prompt (LLaVA-OneVision:
    # `<|im_start|>assistant \n` in a rendered conversation, `<|im_start|>assistant\n` to generate): the
    # reply is what follows the generation prompt, as the model was trained and generates (see `reply_boundary`).
    reply_header_differs: bool = False
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def skip_4bit(self) -> tuple[str, ...]:
        """Module-path prefixes bitsandbytes leaves unquantised: the vision side and the LM head."""
        return self.vision_prefixes + ("lm_head",)

    def image_processor_type(self) -> type:
        """The PIL image processor class, imported from its defining module: the package-level name
        of some (Idefics3's) is a placeholder that demands torchvision although the class never uses it."""
        return getattr(importlib.import_module(self.image_processor_module), self.image_processor_class)


_QWEN2_VL_PIL = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec for spec in (
        FamilySpec(
            name="qwen2_vl", model_types=("qwen2_vl",),
            processor_class="Qwen2VLProcessor", image_processor_class="Qwen2VLImageProcessorPil",
            image_processor_module=_QWEN2_VL_PIL,
            text_prefix="model.language_model", vision_prefixes=("model.visual",), mrope=True,
            forward_keys=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
        ),
        FamilySpec(
            name="qwen2_5_vl", model_types=("qwen2_5_vl",),
            processor_class="Qwen2_5_VLProcessor", image_processor_class="Qwen2VLImageProcessorPil",
            image_processor_module=_QWEN2_VL_PIL,
            text_prefix="model.language_model", vision_prefixes=("model.visual",), mrope=True,
            forward_keys=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
            notes="The vision MLP reuses gate/up/down_proj names: LoRA targets are anchored to the language model.",
        ),
        FamilySpec(
            name="qwen3_vl", model_types=("qwen3_vl",),
            processor_class="Qwen3VLProcessor", image_processor_class="Qwen2VLImageProcessorPil",
            image_processor_module=_QWEN2_VL_PIL,
            text_prefix="model.language_model", vision_prefixes=("model.visual",), mrope=True,
            forward_keys=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
            notes="Qwen2-VL's image processor with patch 16; interleaved M-RoPE from the model's get_rope_index "
                  "(needs mm_token_type_ids); DeepStack adds vision features at image positions of the first "
                  "decoder layers, which a packed row keeps in the prefix.",
        ),
        FamilySpec(
            name="llava_onevision", model_types=("llava_onevision",),
            processor_class="LlavaOnevisionProcessor", image_processor_class="LlavaOnevisionImageProcessorPil",
            image_processor_module="transformers.models.llava_onevision.image_processing_pil_llava_onevision",
            text_prefix="model.language_model",
            vision_prefixes=("model.vision_tower", "model.multi_modal_projector"),
            forward_keys=("pixel_values", "image_sizes", "batch_num_images"), pixel_limits="anyres",
            image_tokens="llava_onevision", reply_header_differs=True,
            notes="pixel_values is (images, anyres tiles, 3, H, W), padded to the most tiles in a batch; "
                  "1-D positions (Qwen2 decoder).",
        ),
        FamilySpec(
            name="idefics3", model_types=("idefics3",),
            processor_class="Idefics3Processor", image_processor_class="Idefics3ImageProcessorPil",
            image_processor_module="transformers.models.idefics3.image_processing_pil_idefics3",
            text_prefix="model.text_model", vision_prefixes=("model.vision_model", "model.connector"),
            forward_keys=("pixel_values", "pixel_attention_mask"), pixel_limits="longest_edge",
            image_tokens="idefics3",
            notes="SmolVLM v1 checkpoints are this model type. pixel_values is (rows, images, 3, H, W): all-zero "
                  "images are padding the model drops; 1-D positions (Llama decoder).",
        ),
    )
}


_MARK = "\x1eMMRLHF_REPLY\x1e"


def reply_boundary(processor, spec: FamilySpec) -> tuple[str, str]:
    """(reply prefix, end of turn): what the chat template writes between the generation prompt and a
    reply's text, and after the text to end the turn. The tokens a packed branch scores are
    `prefix + text + end of turn`, the response part of the template's own rendering of the conversation.

    Found by rendering a user turn twice, with the generation prompt and with a marker reply:
    Qwen2/2.5/3-VL write nothing between (prefix ""), Idefics3/SmolVLM write `Assistant: ` where the
    generation prompt ends at `Assistant:` (prefix " ": the reply's first token carries the space).
    Where the family's template writes a reply header unlike its generation prompt
    (`reply_header_differs`, LLaVA-OneVision), both must end alike and the reply starts there (prefix "").
    The end of turn is the text after the reply up to trailing whitespace (the line break between turns
    is not generated), else the tokenizer's EOS.
    """
    user = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    reply = {"role": "assistant", "content": [{"type": "text", "text": _MARK}]}
    gen = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(user + [reply], tokenize=False)
    if _MARK not in full:
        raise ValueError(f"{spec.name}: the chat template drops assistant text; cannot locate response boundaries")
    head, tail = full.split(_MARK, 1)
    if head.startswith(gen):
        prefix = head[len(gen):]
    else:
        common = len(_common_prefix(head, gen))
        head_rest, gen_rest = head[common:], gen[common:]
        if not (spec.reply_header_differs and gen_rest and head_rest.endswith(gen_rest)):
            raise ValueError(f"{spec.name}: the chat template's generation prompt ends with {gen[-40:]!r} but a "
                             f"rendered reply follows {head[-40:]!r}; cannot tell where a reply starts")
        prefix = ""
    end = tail.rstrip()
    eos = getattr(processor.tokenizer, "eos_token", None)
    return prefix, end or eos or ""


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _resized(size, **changes):
    """A copy of an image processor's `size` (a dict, or transformers' SizeDict) with `changes`."""
    items = dict(size.items()) if isinstance(size, dict) else dict(iter(size))
    return type(size)(**{**{k: v for k, v in items.items() if v is not None}, **changes})


def apply_pixel_limits(image_processor, spec: FamilySpec, min_pixels: int | None, max_pixels: int | None) -> list[str]:
    """Apply `model.min_pixels` / `model.max_pixels` the way the family's image processor understands them;
    returns notes on what was not applied.

    - `pixels` (Qwen2/2.5/3-VL): the processor's own min/max pixel bounds (its `size` holds them as
      shortest_edge / longest_edge, in pixels); image tokens = pixels / (patch * merge)^2.
    - `longest_edge` (Idefics3/SmolVLM): `size.longest_edge` is an edge length in pixels, split into
      tiles of `max_image_size`; max_pixels becomes the longest edge sqrt(max_pixels) rounded down to
      whole tiles (at least one), so a square image stays within max_pixels. min_pixels does not apply.
    - `anyres` (LLaVA-OneVision): max_pixels keeps the anyres resolutions (`image_grid_pinpoints`) of at
      most max_pixels (the smallest one when none is). The model's config must get the same list
      (`cap_model_grid`), or the forward fails on a feature/token count mismatch. min_pixels does not apply.
    """
    notes = []
    if spec.pixel_limits == "pixels":
        if min_pixels or max_pixels:
            # both bounds, in `size` and as attributes: transformers 5 reads the attributes only when both
            # are set, and `get_number_of_image_patches` reads `size`
            size = image_processor.size
            lo = min_pixels or size["shortest_edge"]
            hi = max_pixels or size["longest_edge"]
            lo = min(lo, hi)
            image_processor.size = _resized(size, shortest_edge=lo, longest_edge=hi)
            image_processor.min_pixels, image_processor.max_pixels = lo, hi
    elif spec.pixel_limits == "longest_edge":
        if max_pixels:
            tile = image_processor.max_image_size["longest_edge"]
            edge = max(tile, int(max_pixels ** 0.5) // tile * tile)
            size = image_processor.size
            image_processor.size = _resized(size, longest_edge=edge)
        if min_pixels:
            notes.append(f"{spec.name}: model.min_pixels is not applied (images are only scaled down)")
    elif spec.pixel_limits == "anyres":
        if max_pixels:
            image_processor.image_grid_pinpoints = capped_grid_pinpoints(image_processor.image_grid_pinpoints,
                                                                         max_pixels)
        if min_pixels:
            notes.append(f"{spec.name}: model.min_pixels is not applied (anyres picks the best-fitting resolution)")
    elif max_pixels or min_pixels:
        notes.append(f"{spec.name}: model.max_pixels/min_pixels are not applied")
    return notes


def capped_grid_pinpoints(pinpoints: list, max_pixels: int) -> list:
    """The anyres resolutions [h, w] of at most max_pixels; the smallest one when none is."""
    keep = [list(p) for p in pinpoints if p[0] * p[1] <= max_pixels]
    return keep or [list(min(pinpoints, key=lambda p: p[0] * p[1]))]


def cap_model_grid(model, spec: FamilySpec, max_pixels: int | None) -> None:
    """The model side of `apply_pixel_limits` for `anyres` families: the same capped resolutions in every
    config that carries them (the processor and the model must agree)."""
    if spec.pixel_limits != "anyres" or not max_pixels:
        return
    for module in model.modules():
        config = getattr(module, "config", None)
        pins = getattr(config, "image_grid_pinpoints", None)
        if pins:
            config.image_grid_pinpoints = capped_grid_pinpoints(pins, max_pixels)


def family_of_model_type(model_type: str) -> FamilySpec:
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    raise ValueError(f"model type '{model_type}' is not supported yet; supported families: "
                     f"{', '.join(sorted(FAMILIES))}")


def detect_family(model_path: str | Path, family: str = "auto") -> FamilySpec:
    """The family named in the recipe, else the one of the model's `model_type`: from a local folder's
    config.json, or for a hub id from `AutoConfig` (the hub, or its local cache). Offline with a hub id,
    name the family (`model.family`)."""
    if family != "auto":
        if family not in FAMILIES:
            raise ValueError(f"unknown model.family '{family}'; known: {', '.join(sorted(FAMILIES))}")
        return FAMILIES[family]
    cfg = Path(model_path) / "config.json"
    if cfg.exists():
        return family_of_model_type(json.loads(cfg.read_text()).get("model_type", ""))
    if Path(model_path).exists():
        raise FileNotFoundError(f"{cfg} not found: is '{model_path}' a model folder?")
    try:
        from transformers import AutoConfig
        model_type = AutoConfig.from_pretrained(str(model_path)).model_type
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no access: one actionable message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileNotFoundError(f"'{model_path}' is not a local model folder and its config could not be read "
                                f"from the hub ({reason}); set model.family "
                                f"({', '.join(sorted(FAMILIES))}) or use a local folder") from None
    return family_of_model_type(model_type)


def prompt_positions(model: torch.nn.Module, spec: FamilySpec, inputs: dict) -> torch.Tensor:
    """Position ids of an (unpadded, batch 1) prompt: (3, 1, P) for M-RoPE families, else (1, P).

    Responses packed after the prompt continue from `positions.max() + 1` in every dimension, exactly
    as an unpacked sequence would (text tokens after the image advance all three M-RoPE axes together).
    """
    ids = inputs["input_ids"]
    if not spec.mrope:
        return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    backbone = model.model
    kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    positions, _ = backbone.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"], **kwargs)
    return positions


