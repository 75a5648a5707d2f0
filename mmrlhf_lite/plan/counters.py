"""Per-group token counts for the pre-flight: the stages' own encoders fed a counting processor (exact), or
offline estimates (a family's image formula + characters/4, or characters/4 alone).

    python -m mmrlhf_lite.train recipes/demo.yaml --dry-run
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from ..data.groups import PreferenceGroup
from ..models.image_tokens import SizedImage, image_counter, image_size
from ..recipe import Recipe

# which sequence each stage feeds the model, and the max_length that bounds it
POLICY_STAGES = ("reference", "dpo", "eval")
CRITIQUE_STAGES = ("reward",)

# Lengths come from the same encoders the stages use (GroupEncoder, CritiqueEncoder), fed a processor
# stand-in that expands each image placeholder by the number the model's processor would produce for an
# image of that size, computed by the processor's own counting functions from the image header alone. So
# the plan reads no pixels and runs no image processing (a 20k-group dataset is counted in seconds), and
# its lengths equal the real encoding (tests/test_preflight.py checks it on every family's tiny twin).

# The image-processor settings of the released checkpoints where the config does not give them
# (their preprocessor_config.json); used only offline, when a hub id's processor cannot be read.
PROCESSOR_DEFAULTS = {
    "qwen2_vl": {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384},
    "qwen2_5_vl": {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384},
    "qwen3_vl": {"min_pixels": 256 * 256, "max_pixels": 4096 * 4096},
}


class _CharsTokenizer:
    """Offline text estimate: characters / 4 (rounded up), a placeholder string counting as one token."""

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": [0] * math.ceil(len(text) / 4)}


def offline_processor(family, config: dict, model_cfg):
    """A stand-in for the processor of a model known only by its config: the family's own image processor
    class built with the settings the released checkpoints use, and the processor attributes its
    token-counting functions read. Raises when the config lacks what the family needs."""
    import transformers

    from ..models.families import apply_pixel_limits

    vision = config.get("vision_config") or {}
    cls = getattr(transformers, family.processor_class)
    proc = object.__new__(cls)
    ip_cls = family.image_processor_type()
    if family.name in PROCESSOR_DEFAULTS:
        ip = ip_cls(**PROCESSOR_DEFAULTS[family.name], patch_size=vision.get("patch_size", 14),
                    merge_size=vision.get("spatial_merge_size", 2),
                    temporal_patch_size=vision.get("temporal_patch_size", 2))
    elif family.name == "llava_onevision":
        tile = vision["image_size"]
        ip = ip_cls(size={"height": tile, "width": tile}, image_grid_pinpoints=config["image_grid_pinpoints"])
        proc.num_image_tokens = (tile // vision["patch_size"]) ** 2
        proc.vision_feature_select_strategy = config.get("vision_feature_select_strategy", "full")
        proc.vision_aspect_ratio = config.get("vision_aspect_ratio", "anyres_max_9")
    elif family.name == "idefics3":
        tile = (vision.get("max_image_size") or {}).get("longest_edge", vision["image_size"])
        ip = ip_cls(do_image_splitting=True, size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile})
        proc.image_seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // config.get("scale_factor", 2) ** 2
        proc.tokenizer = _CharsTokenizer()
    else:
        raise ValueError(f"no offline image-token formula for family {family.name}")
    apply_pixel_limits(ip, family, model_cfg.min_pixels, model_cfg.max_pixels)
    proc.image_processor = ip
    return proc


class CountingProcessor:
    """The processor interface the encoders use, counting instead of processing: the real tokenizer and
    chat template; each image placeholder expanded by count. Returns input_ids of the right length (ids
    are placeholders) and `mm_token_type_ids` marking as many image tokens as the model would see."""

    def __init__(self, processor, family, config: dict | None):
        self.processor, self.family, self.config = processor, family, config
        self.tokenizer = processor.tokenizer
        self.count = image_counter(family)
        self.last_patches: list[int] = []

    def apply_chat_template(self, *args, **kwargs):
        return self.processor.apply_chat_template(*args, **kwargs)

    def __call__(self, text=None, images=None, return_tensors=None, **kwargs):
        import torch

        nested = bool(images) and isinstance(images[0], (list, tuple))
        flat = [im for sample in images for im in sample] if nested else list(images or [])
        counts = self.count(self.processor, [im.size for im in flat], nested, self.config) if flat else []
        n = len(self.tokenizer(text[0], add_special_tokens=False)["input_ids"])
        n += sum(c[0] - 1 for c in counts)
        image_tokens = sum(c[1] for c in counts)
        self.last_patches = [c[2] for c in counts]
        self.last_image_tokens = [c[1] for c in counts]
        mm = torch.zeros((1, n), dtype=torch.long)
        mm[0, :image_tokens] = 1
        return {"input_ids": torch.zeros((1, n), dtype=torch.long), "mm_token_type_ids": mm}


def _size_only_encoder_class():
    from ..models.encoding import GroupEncoder

    class SizeOnlyEncoder(GroupEncoder):
        """GroupEncoder whose media are image sizes read from headers (see `CountingProcessor`)."""

        def open_media(self, media):
            return SizedImage(*image_size(media))

    return SizeOnlyEncoder


@dataclasses.dataclass
class GroupTokens:
    """One group's lengths as the stages will see them."""
    prompt: int
    image: int
    responses: list[int]
    images: int = 0                   # images + video frames the vision tower encodes
    patches: int = 0                  # vision-tower positions of all of them
    largest_image: int = 0            # image tokens of its largest image (or frame)
    critique_prompt: int = 0
    critique_branches: list[int] = dataclasses.field(default_factory=list)
    critique_targets: int = 0         # critique tokens (the reward model's LM loss), all responses
    critiques: list[int] = dataclasses.field(default_factory=list)

    @property
    def packed(self) -> int:
        return self.prompt + sum(self.responses)

    @property
    def critique_packed(self) -> int:
        return self.critique_prompt + sum(self.critique_branches)


@dataclasses.dataclass
class _Counter:
    """How groups become token counts, and which limits they are checked against."""
    method: str                                   # "processor", "formula" or "chars/4"
    count: Callable[[PreferenceGroup, bool], tuple[GroupTokens, list[dict]]]
    note: str = ""
    family: str | None = None
    config: dict | None = None
    config_source: str | None = None


def model_config(recipe: Recipe) -> tuple[dict | None, str]:
    """(config.json content or None, where it came from or why it was not found)."""
    from ..memory import find_model_config
    try:
        return find_model_config(recipe.model.path)
    except Exception as exc:  # noqa: BLE001 - reported in the plan
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _too_long(kind: str, group: PreferenceGroup, message: str) -> dict:
    return {"limit": kind, "source": group.source or group.id, "message": message}



def _processor_counter(recipe: Recipe, stages: Sequence[str], family, processor, config: dict | None) -> _Counter:
    """Exact: the model's tokenizer and chat template through the stages' own encoders; image tokens from
    image sizes (or, for a family without a counter, the processor itself)."""
    from ..models.encoding import GroupEncoder, SequenceTooLong
    from ..reward.prompt import CritiqueEncoder

    exact = image_counter(family) is None
    proc = processor if exact else CountingProcessor(processor, family, config)
    enc_cls = GroupEncoder if exact else _size_only_encoder_class()
    unlimited = enc_cls(proc, family, max_length=10 ** 9, max_frames=recipe.data.max_frames)
    dpo_limit = dataclasses.replace(unlimited, max_length=recipe.dpo.train.max_length)
    reward_limit = dataclasses.replace(unlimited, max_length=recipe.reward.train.max_length)
    critique = CritiqueEncoder(unlimited) if any(s in stages for s in CRITIQUE_STAGES + ("score", "eval")) else None
    check_policy = any(s in stages for s in POLICY_STAGES)
    check_critique = any(s in stages for s in CRITIQUE_STAGES)

    def count(g: PreferenceGroup, with_critique: bool) -> tuple[GroupTokens, list[dict]]:
        problems = []
        e = unlimited.encode_policy(g)
        patches = list(getattr(proc, "last_patches", []))
        t = GroupTokens(prompt=e.prefix_len, image=unlimited.image_token_count(e.prefix),
                        responses=[len(b.ids) for b in e.branches], images=len(patches),
                        patches=sum(patches), largest_image=max(getattr(proc, "last_image_tokens", []), default=0),
                        critiques=[len(unlimited.tokens(r.critique)) for r in g.responses if r.critique])
        if check_policy:
            try:
                dpo_limit.check_length(g, e, "prompt + response")
            except SequenceTooLong as exc:
                problems.append(_too_long("dpo.train.max_length", g, str(exc)))
        if critique is not None and with_critique:
            ce, parts = critique.encode(g)
            t.critique_prompt = ce.prefix_len
            t.critique_branches = [len(b.ids) for b in ce.branches]
            t.critique_targets = sum(len(p.critique) for p in parts)
            if check_critique and any(r.critique for r in g.responses):
                try:
                    reward_limit.check_length(g, ce, "critique prompt + response + critique")
                except SequenceTooLong as exc:
                    problems.append(_too_long("reward.train.max_length", g, str(exc)))
        return t, problems

    return _Counter(method="processor", count=count, family=family.name, config=config)


def _formula_counter(recipe: Recipe, family, config: dict, reason: str) -> _Counter:
    """Offline: text as characters/4, images by the family's formula from the config."""
    from ..models.reward_score import INSTRUCTION

    proc = offline_processor(family, config, recipe.model)
    count_images = image_counter(family)
    chars = _CharsTokenizer()
    text = lambda s: len(chars(s or "")["input_ids"])  # noqa: E731
    max_frames = recipe.data.max_frames

    def count(g: PreferenceGroup, with_critique: bool) -> tuple[GroupTokens, list[dict]]:
        from ..data.media import list_frames, sample_frames

        sizes = [image_size(m) for m in g.images]
        if g.video is not None:
            paths = g.video if isinstance(g.video, list) else list_frames(g.video)
            sizes += [image_size(f) for f in sample_frames(list(paths), max_frames)]
        counts = count_images(proc, sizes, True, config) if sizes else []
        placeholders = sum(c[0] for c in counts)
        prompt = sum(text(p.get("text")) for turn in g.prompt for p in turn["content"]) + placeholders
        responses = [text(r.text) for r in g.responses]
        t = GroupTokens(prompt=prompt, image=sum(c[1] for c in counts), responses=responses, images=len(counts),
                        patches=sum(c[2] for c in counts), largest_image=max((c[1] for c in counts), default=0),
                        critiques=[text(r.critique) for r in g.responses if r.critique])
        t.critique_prompt = text(INSTRUCTION) + text(g.question_text()) + 8 + placeholders
        t.critique_branches = [n + 4 + text(r.critique) for n, r in zip(responses, g.responses)]
        t.critique_targets = sum(t.critiques)
        problems = []
        for limit, lengths, what in (("dpo.train.max_length", [prompt + n for n in responses], "prompt + response"),
                                     ("reward.train.max_length", [t.critique_prompt + n for n in t.critique_branches],
                                      "critique prompt + response + critique")):
            cap = recipe.dpo.train.max_length if limit.startswith("dpo") else recipe.reward.train.max_length
            for i, n in enumerate(lengths):
                if n > cap:
                    problems.append(_too_long(limit, g, f"{g.source or g.id}: {what} of response {i + 1} is about {n} "
                                                        f"tokens (estimated; image tokens {t.image}) > max_length "
                                                        f"{cap}"))
                    break
        return t, problems

    return _Counter(method="formula", count=count, family=family.name, config=config,
                    note=f"processor of '{recipe.model.path}' not loadable ({reason}); text is estimated as "
                         f"characters/4, image tokens by the {family.name} processor's formula with the "
                         "released checkpoints' settings")


def _chars_counter(recipe: Recipe, reason: str) -> _Counter:
    chars = _CharsTokenizer()
    text = lambda s: len(chars(s or "")["input_ids"])  # noqa: E731

    def count(g: PreferenceGroup, with_critique: bool) -> tuple[GroupTokens, list[dict]]:
        prompt = sum(text(p.get("text")) for t in g.prompt for p in t["content"])
        responses = [text(r.text) for r in g.responses]
        t = GroupTokens(prompt=prompt, image=0, responses=responses,
                        critiques=[text(r.critique) for r in g.responses if r.critique])
        problems = []
        if prompt + max(responses) > recipe.dpo.train.max_length:
            problems.append(_too_long("dpo.train.max_length", g,
                                      f"{g.source or g.id}: about {prompt + max(responses)} tokens (estimated) "
                                      f"> max_length {recipe.dpo.train.max_length}"))
        return t, problems

    return _Counter(method="chars/4", count=count,
                    note=f"processor of '{recipe.model.path}' not loadable ({reason}); lengths are estimated as "
                         "characters/4 and image tokens are not counted")
