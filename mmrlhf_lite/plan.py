"""The dry-run plan (the pre-flight): what a recipe would do, counted before any model weight is loaded.

    python -m mmrlhf_lite.train recipes/demo.yaml --dry-run
    python -m mmrlhf_lite.train recipes/qwen2_vl_7b-24gb.yaml --dry-run --gpu-mem 16GB

Token counts go through the stages' own encoders (chat template, tokenizer, critique prompt), with image
placeholders expanded by the number of tokens the model's processor gives an image of that size, computed by
the processor's own counting functions from the image header: no pixels are decoded or processed, and the
lengths equal the real encoding (tests/test_preflight.py). A sample longer than `max_length` is reported by
file:line here, and `run_pipeline` refuses to start on it (`preflight_too_long`). When the processor cannot
be loaded (a hub id offline), a known family and config give text as characters/4 + the family's image-token
formula; with neither, characters/4 alone. The plan says which.

`plan["memory"]` is the peak-memory estimate per stage for the longest micro-batch (mmrlhf_lite/memory.py,
docs/memory.md), checked against `--gpu-mem` or the GPU found, with overrides that fit when it does not.
The plan is a JSON-able dict (the UI shows the same facts); `format_plan` renders it for the terminal.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from .data.groups import PreferenceGroup
from .recipe import Recipe, TrainConfig
from .runs import RunDir, cache_dir_of, changed_message

TRAINER_STAGES = {"reward": "reward.train", "dpo": "dpo.train"}
# which sequence each stage feeds the model, and the max_length that bounds it
POLICY_STAGES = ("reference", "dpo", "eval")
CRITIQUE_STAGES = ("reward",)
TOO_LONG_SHOWN = 20


# --------------------------------------------------------------------------------------------------
# counts

def percentiles(values: Sequence[int]) -> dict[str, int] | None:
    """p50 / p95 / max by the nearest-rank rule (an observed value, never interpolated)."""
    if not values:
        return None
    s = sorted(values)
    rank = lambda q: s[max(1, math.ceil(q * len(s))) - 1]  # noqa: E731
    return {"p50": rank(0.50), "p95": rank(0.95), "max": s[-1]}


def split_counts(groups: Sequence[PreferenceGroup], dpo_pairs: str = "all") -> dict[str, Any]:
    """Groups, ranked pairs, ties and DPO pairs, overall and per category, plus responses per group."""
    def count(gs):
        pairs = sum(len(g.pairs()) for g in gs)
        ties = sum(len(g.ties()) for g in gs)
        dpo = sum(len(g.pairs() if dpo_pairs == "all" else g.best_vs_worst()) for g in gs)
        return {"groups": len(gs), "pairs": pairs, "ties": ties, "dpo_pairs": dpo,
                "dpo_groups": sum(1 for g in gs if g.pairs())}
    by_cat: dict[str, list[PreferenceGroup]] = {}
    for g in groups:
        by_cat.setdefault(g.category, []).append(g)
    out = count(groups)
    out["responses"] = dict(sorted(Counter(len(g.responses) for g in groups).items()))
    out["categories"] = {c: count(gs) for c, gs in sorted(by_cat.items())}
    return out


def optimizer_steps(cfg: TrainConfig, n_groups: int) -> dict[str, Any]:
    """Optimizer steps as `transformers.Trainer` counts them: ceil(groups / groups_per_step) micro-batches,
    ceil(micro-batches / grad_accum) steps per epoch (at least 1), times epochs unless max_steps > 0."""
    batches = math.ceil(n_groups / cfg.groups_per_step)
    per_epoch = max(math.ceil(batches / cfg.grad_accum), 1)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * per_epoch)
    return {"groups": n_groups, "groups_per_step": cfg.groups_per_step, "grad_accum": cfg.grad_accum,
            "groups_per_optimizer_step": cfg.groups_per_step * cfg.grad_accum, "steps_per_epoch": per_epoch,
            "epochs": cfg.epochs, "max_steps": cfg.max_steps, "steps": total,
            "warmup_steps": math.ceil(cfg.warmup_ratio * total), "max_length": cfg.max_length}


def stage_status(recipe: Recipe, stages: Sequence[str]) -> tuple[list[dict], list[str]]:
    """Per requested stage: `run`, `done` (skipped), `stale` (an input stage was recomputed since: it runs
    again) or `changed` (its recipe inputs changed: a real run refuses, `RunDir.check_recipe`), and the
    errors for the changed ones."""
    run = RunDir(recipe.run.dir)
    changed, stale = run.changed_stages(recipe), run.stale_stages()
    rows = [{"stage": s, "status": "changed" if s in changed else "stale" if s in stale
             else "done" if run.is_done(s) else "run"} for s in stages]
    return rows, [changed_message(run.path, s, keys) for s, keys in changed.items()]


# --------------------------------------------------------------------------------------------------
# tokens
#
# Lengths come from the same encoders the stages use (GroupEncoder, CritiqueEncoder), fed a processor
# stand-in that expands each image placeholder by the number the model's processor would produce for an
# image of that size, computed by the processor's own counting functions from the image header alone. So
# the plan reads no pixels and runs no image processing (a 20k-group dataset is counted in seconds), and
# its lengths equal the real encoding (tests/test_preflight.py checks it on every family's tiny twin).

class _SizedImage:
    """Stands in for a decoded image: only its size is read."""

    def __init__(self, width: int, height: int):
        self.size = (width, height)
        self.width, self.height = width, height


def image_size(media) -> tuple[int, int]:
    """(width, height) from the file header (no decoding), as `load_image` would see it."""
    import io
    import os

    from PIL import Image, UnidentifiedImageError

    from .data.media import MediaError

    try:
        if isinstance(media, bytes):
            with Image.open(io.BytesIO(media)) as img:
                return img.size
        if not os.path.exists(media):
            raise MediaError(f"image not found: {media}")
        with Image.open(media) as img:
            return img.size
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        where = "inline image bytes" if isinstance(media, bytes) else media
        raise MediaError(f"corrupt or unreadable image: {where} ({exc})") from None


def _count_qwen(proc, sizes: list[tuple[int, int]], nested: bool, config: dict | None) -> list[tuple[int, int, int]]:
    """Qwen2/2.5/3-VL: one <|image_pad|> becomes grid_h * grid_w / merge^2 tokens; the vision tower sees
    grid_h * grid_w patches (grid_t = 1 for an image)."""
    ip = proc.image_processor
    out = []
    for w, h in sizes:
        patches = ip.get_number_of_image_patches(h, w, {})
        n = patches // ip.merge_size ** 2
        out.append((n, n, patches))
    return out


def _count_llava_onevision(proc, sizes, nested, config) -> list[tuple[int, int, int]]:
    """LLaVA-OneVision: a prompt's only image gets anyres tiles (base tile + the unpadded grid, newline
    tokens, downscaled above anyres_max_N); images of a multi-image sample get the base tile + 1."""
    from transformers.image_processing_utils import select_best_resolution

    ip = proc.image_processor
    tile = ip.size["height"]
    per_tile = proc.num_image_tokens
    multi = nested and len(sizes) > 1
    out = []
    for w, h in sizes:
        if multi:
            n, tiles = per_tile + 1, 1
        else:
            n = proc._get_number_of_features(h, w, tile, tile)
            bh, bw = select_best_resolution([h, w], ip.image_grid_pinpoints)
            tiles = 1 + (bh // tile) * (bw // tile)
        if proc.vision_feature_select_strategy == "default":
            n -= 1
        out.append((n, n, tiles * per_tile))
    return out


def _count_idefics3(proc, sizes, nested, config) -> list[tuple[int, int, int]]:
    """Idefics3/SmolVLM: `<image>` becomes the tile grid's text (fake/row tokens, `image_seq_len` image
    tokens per tile, plus the global image); the vision tower sees scale^2 patches per image token."""
    data = proc._get_num_multimodal_tokens(image_sizes=[[h, w] for w, h in sizes])
    scale = (config or {}).get("scale_factor", 2)
    out = []
    for n, tiles in zip(data.num_image_tokens, data.num_image_patches):
        image_tokens = proc.image_seq_len * max(1, tiles)
        out.append((n, image_tokens, image_tokens * scale ** 2))
    return out


IMAGE_COUNTERS = {"qwen2_vl": _count_qwen, "qwen2_5_vl": _count_qwen, "qwen3_vl": _count_qwen,
                  "llava_onevision": _count_llava_onevision, "idefics3": _count_idefics3}

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

    from .models.families import apply_pixel_limits

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
        self.count = IMAGE_COUNTERS[family.name]
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
    from .models.encoding import GroupEncoder

    class SizeOnlyEncoder(GroupEncoder):
        """GroupEncoder whose media are image sizes read from headers (see `CountingProcessor`)."""

        def open_media(self, media):
            return _SizedImage(*image_size(media))

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
    from .memory import find_model_config
    try:
        return find_model_config(recipe.model.path)
    except Exception as exc:  # noqa: BLE001 - reported in the plan
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _too_long(kind: str, group: PreferenceGroup, message: str) -> dict:
    return {"limit": kind, "source": group.source or group.id, "message": message}


TOKENS_CACHE = "tokens.jsonl"
COUNTER_VERSION = 1


def _media_stamp(media) -> Any:
    """A cheap identity for token counting: path + size + mtime (image sizes come from headers), or the
    digest of inline bytes."""
    import hashlib
    import os

    if isinstance(media, bytes):
        return hashlib.sha256(media).hexdigest()
    try:
        st = os.stat(media)
        return [str(media), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(media), None]


def memoize_counter(count: Callable, cache_dir: Path, salt: Any) -> Callable:
    """Per-group counts kept in `<cache_dir>/tokens.jsonl`, keyed by everything the count reads (model
    files, lengths and pixel settings via `salt`; the group's text, media stamps and source): a resumed
    run or a second dry run counts only new or changed groups. Written in batches; `count.flush()` at the
    end."""
    from .cache.store import JsonlStore, content_key

    store = JsonlStore(Path(cache_dir) / TOKENS_CACHE, {"tokens": dict, "problems": list})
    pending: list[dict] = []

    def flush() -> None:
        if pending:
            try:
                store.put_many(pending)
            except OSError:  # a full or read-only disk only costs the next run the recount
                pass
            pending.clear()

    def memo(g: PreferenceGroup, with_critique: bool) -> tuple["GroupTokens", list[dict]]:
        video = None
        if g.video is not None:
            video = [_media_stamp(f) for f in g.video] if isinstance(g.video, list) else _media_stamp(g.video)
        key = content_key("tokens", COUNTER_VERSION, salt, with_critique, g.source or g.id, g.prompt,
                          [_media_stamp(m) for m in g.images], video,
                          [(r.text, r.critique) for r in g.responses])
        rec = store.get(key)
        if rec is not None:
            try:
                return GroupTokens(**rec["tokens"]), rec["problems"]
            except TypeError:  # a memo line of another shape (an edited file): count again
                pass
        t, problems = count(g, with_critique)
        pending.append({"key": key, "tokens": dataclasses.asdict(t), "problems": problems})
        if len(pending) >= 2000:
            flush()
        return t, problems

    memo.flush = flush
    return memo


def _processor_counter(recipe: Recipe, stages: Sequence[str], family, processor, config: dict | None) -> _Counter:
    """Exact: the model's tokenizer and chat template through the stages' own encoders; image tokens from
    image sizes (or, for a family without a counter, the processor itself)."""
    from .models.encoding import GroupEncoder, SequenceTooLong
    from .reward.prompt import CritiqueEncoder

    exact = family.name not in IMAGE_COUNTERS
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
    from .reward.prompt import INSTRUCTION

    proc = offline_processor(family, config, recipe.model)
    count_images = IMAGE_COUNTERS[family.name]
    chars = _CharsTokenizer()
    text = lambda s: len(chars(s or "")["input_ids"])  # noqa: E731
    max_frames = recipe.data.max_frames

    def count(g: PreferenceGroup, with_critique: bool) -> tuple[GroupTokens, list[dict]]:
        from .data.media import list_frames, sample_frames

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


def _counter(recipe: Recipe, stages: Sequence[str], config: dict | None = None,
             config_source: str | None = None, memo_dir: Path | None = None) -> _Counter:
    """The exact counter when the processor loads (memoized in `memo_dir` when given); offline, the family
    formula when the family and a config are known; else characters/4."""
    from .models.families import FAMILIES, detect_family, family_of_model_type
    from .models.loading import load_processor, resolve_model_path

    try:
        path = resolve_model_path(recipe.model.path)
        family = detect_family(path, recipe.model.family)
        processor = load_processor(path, family, recipe.model)
    except Exception as exc:  # noqa: BLE001 - any failure here only costs accuracy, and is reported
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        family = FAMILIES.get(recipe.model.family)
        if family is None and config is not None:
            try:
                family = family_of_model_type(config.get("model_type", ""))
            except ValueError:
                family = None
        if family is not None and config is not None and family.name in IMAGE_COUNTERS:
            try:
                c = _formula_counter(recipe, family, config, reason)
                c.config_source = config_source
                return c
            except (KeyError, ValueError, TypeError) as exc2:
                reason = f"{reason}; no offline formula: {exc2}"
        return _chars_counter(recipe, reason)
    c = _processor_counter(recipe, stages, family, processor, config)
    c.config_source = config_source
    if memo_dir is not None:
        from .cache.store import model_fingerprint
        from .reward.prompt import TEMPLATE_VERSION

        m = recipe.model
        salt = [model_fingerprint(m.path), family.name, TEMPLATE_VERSION, m.min_pixels, m.max_pixels,
                recipe.data.max_frames, recipe.dpo.train.max_length, recipe.reward.train.max_length,
                sorted(set(stages) & set(POLICY_STAGES + CRITIQUE_STAGES + ("score", "eval")))]
        c.count = memoize_counter(c.count, memo_dir, salt)
    return c


def token_stats(recipe: Recipe, stages: Sequence[str], groups: Sequence[PreferenceGroup],
                train_ids: set[str], config: dict | None = None, config_source: str | None = None,
                memo_dir: Path | None = None) -> tuple[dict[str, Any], list[dict], list[GroupTokens]]:
    """Token counts (percentiles, the longest micro-batch), the samples over max_length (all groups, train and
    eval) and each group's counts. `config` is the model's config.json content when known (it fixes the
    offline image-token formula and the vision patches per image token)."""
    counter = _counter(recipe, stages, config, config_source, memo_dir)
    per_group: list[GroupTokens] = []
    too_long: list[dict] = []
    train_packed = train_unpacked = 0
    with_critique = any(s in stages for s in CRITIQUE_STAGES + ("score", "eval"))
    for g in groups:
        t, problems = counter.count(g, with_critique)
        per_group.append(t)
        too_long.extend(problems)
        if g.id in train_ids:
            train_packed += t.packed
            train_unpacked += sum(t.prompt + n for n in t.responses)
    getattr(counter.count, "flush", lambda: None)()
    images = [t.image for t in per_group]
    splits = {}
    for split, keep in (("train", lambda g: g.id in train_ids), ("eval", lambda g: g.id not in train_ids)):
        chosen = [t for g, t in zip(groups, per_group) if keep(g)]
        splits[split] = {"image": percentiles([t.image for t in chosen]),
                         "packed": percentiles([t.packed for t in chosen])}
    crit_seq = [t.critique_prompt + n for t in per_group for n in t.critique_branches]
    stats = {"method": counter.method, "note": counter.note, "family": counter.family, "groups": len(groups),
             "config": counter.config_source,
             "prompt": percentiles([t.prompt for t in per_group]),
             "image": percentiles(images) if counter.method != "chars/4" else None,
             "response": percentiles([n for t in per_group for n in t.responses]),
             "sequence": percentiles([t.prompt + n for t in per_group for n in t.responses]),
             "packed": percentiles([t.packed for t in per_group]),
             "critique": percentiles([n for t in per_group for n in t.critiques]),
             "critique_sequence": percentiles(crit_seq) if counter.method != "chars/4" else None,
             "train_tokens_packed": train_packed, "train_tokens_unpacked": train_unpacked,
             "splits": splits if counter.method != "chars/4" else None}
    if not any(s in stages for s in CRITIQUE_STAGES):
        stats["critique_sequence"] = None
    stats["longest"] = longest(per_group) if per_group else None
    return stats, too_long, per_group


def preflight_too_long(recipe: Recipe, stages: Sequence[str], groups: Sequence[PreferenceGroup],
                       memo_dir: Path | None = None) -> list[dict]:
    """The samples a run of `stages` would find longer than max_length, counted exactly with the model's own
    tokenizer, template and image-token rules before any weight is loaded (what `run_pipeline` refuses to
    start on). [] when nothing to check or the processor cannot be loaded (the stage then reports that).
    With `memo_dir`, counts are kept there and a later call recounts only new or changed groups."""
    if not any(s in stages for s in POLICY_STAGES + CRITIQUE_STAGES):
        return []
    counter = _counter(recipe, stages, memo_dir=memo_dir)
    if counter.method != "processor":
        return []
    with_critique = any(s in stages for s in CRITIQUE_STAGES)
    out = [p for g in groups for p in counter.count(g, with_critique)[1]]
    getattr(counter.count, "flush", lambda: None)()
    return out


def longest(per_group: Sequence[GroupTokens]) -> dict[str, int]:
    """The worst case a micro-batch can meet, per quantity (each from its own longest group)."""
    return {
        "packed": max(t.packed for t in per_group),
        "prompt": max(t.prompt for t in per_group),
        "sequence": max(t.prompt + max(t.responses) for t in per_group),
        "response_tokens": max(sum(t.responses) for t in per_group),
        "responses": max(len(t.responses) for t in per_group),
        "images": max(t.images for t in per_group),
        "patches": max(t.patches for t in per_group),
        "image_tokens": max(t.image for t in per_group),
        "largest_image": max(t.largest_image for t in per_group),
        "critique_packed": max(t.critique_packed for t in per_group),
        "critique_prompt": max(t.critique_prompt for t in per_group),
        "critique_sequence": max((t.critique_prompt + n for t in per_group for n in t.critique_branches), default=0),
        "critique_targets": max(t.critique_targets for t in per_group),
        "critique_context": max((n for t in per_group for n in t.critique_branches), default=0),
    }


# --------------------------------------------------------------------------------------------------
# memory

def _packed(recipe: Recipe, family) -> bool:
    m = recipe.model
    return m.packing != "unpacked" and (family is None or family.packing) and m.attn_implementation in ("sdpa", "eager")


def micro_batches(recipe: Recipe, longest: dict[str, int], packed: bool) -> dict[str, "Any"]:
    """Per trainer stage, the largest micro-batch the data can produce (every group of it as long as the
    longest one): rows x padded row length, target tokens, images through the vision tower."""
    from .memory import MicroBatch

    L = longest
    out = {}
    for stage, cfg, prefix, seq, targets in (
            ("dpo", recipe.dpo.train, "packed", "sequence", "response_tokens"),
            ("reward", recipe.reward.train, "critique_packed", "critique_sequence", "critique_targets")):
        g = cfg.groups_per_step
        if packed:
            out[stage] = MicroBatch(rows=g, row_tokens=L[prefix], target_tokens=g * L[targets],
                                    vision_samples=g if L["patches"] else 0, patches_per_sample=L["patches"])
        else:
            rows = g * L["responses"]
            out[stage] = MicroBatch(rows=rows, row_tokens=L[seq], target_tokens=g * L[targets],
                                    vision_samples=rows if L["patches"] else 0, patches_per_sample=L["patches"])
    out["reference"] = out["dpo"]
    return out


def stage_estimates(arch, settings, recipe: Recipe, stages: Sequence[str], longest: dict[str, int],
                    packed: bool, dpo_groups_per_step: int | None = None) -> dict[str, Any]:
    """Estimate per requested stage (memory.Estimate); `score` and `eval` take their larger of generating
    (KV cache) and scoring (a forward over 4 critique groups)."""
    from .memory import MicroBatch, estimate_forward, estimate_generation, estimate_training

    mbs = micro_batches(recipe, longest, packed)
    L = longest
    rc = recipe.reward
    out = {}
    score_forward = MicroBatch(rows=4 if packed else 4 * L["responses"],
                               row_tokens=(L["critique_prompt"] + L["responses"] * (L["critique_context"]
                                                                                    + rc.max_new_tokens))
                               if packed else L["critique_prompt"] + L["critique_context"] + rc.max_new_tokens,
                               target_tokens=0, vision_samples=4 if L["patches"] else 0,
                               patches_per_sample=L["patches"])
    critique_gen = estimate_generation(arch, settings, rc.generation_batch_size,
                                       L["critique_prompt"] + L["critique_context"], rc.max_new_tokens, "score",
                                       vision_samples=rc.generation_batch_size if L["patches"] else 0,
                                       patches_per_sample=L["patches"])
    for stage in stages:
        if stage in ("reward", "dpo"):
            out[stage] = estimate_training(arch, settings, mbs[stage], stage,
                                           reward_head=rc.head if stage == "reward" else None)
        elif stage == "reference":
            out[stage] = estimate_forward(arch, settings, mbs["reference"], stage)
        elif stage in ("score", "eval"):
            cands = [critique_gen, estimate_forward(arch, settings, score_forward, stage, reward_head=rc.head)]
            if stage == "eval":
                cands.append(estimate_generation(arch, settings, 8, L["prompt"], recipe.eval.max_new_tokens, stage,
                                                 vision_samples=8 if L["patches"] else 0,
                                                 patches_per_sample=L["patches"]))
            best = max(cands, key=lambda e: e.needed)
            best.stage = stage
            out[stage] = best
    return out


def _fit_search(fits_at: Callable[[float], bool], lo: float = 0.02) -> float | None:
    """The largest scale s in [lo, 1] with fits_at(s) (monotone), to 2%; None if even lo does not fit."""
    if not fits_at(lo):
        return None
    a, b = lo, 1.0
    while b - a > 0.02:
        mid = (a + b) / 2
        a, b = (mid, b) if fits_at(mid) else (a, mid)
    return a


def _shrink(t: GroupTokens, factor: float) -> GroupTokens:
    """The group with its image tokens (and vision patches) scaled by `factor` <= 1."""
    if factor >= 1 or not t.image:
        return t
    cut = t.image - int(t.image * factor)
    return dataclasses.replace(t, prompt=t.prompt - cut, image=t.image - cut, patches=int(t.patches * factor),
                               largest_image=int(t.largest_image * factor),
                               critique_prompt=max(0, t.critique_prompt - cut))


def proposals(arch, settings, recipe: Recipe, stages: Sequence[str], per_group: Sequence[GroupTokens],
              packed: bool, budget: int, family, config: dict | None) -> list[dict]:
    """Settings that make every requested stage fit `budget`, tried in this order: one group per micro-batch
    (the same groups per optimizer step), fewer image tokens (model.max_pixels), fewer video frames /
    images per sample (data.max_frames), 4-bit weights and checkpointing. Each is re-estimated on the
    groups as the setting would change them."""
    from .memory import GIB

    def worst(rec: Recipe, groups: Sequence[GroupTokens]) -> int:
        return max(e.needed for e in stage_estimates(arch, settings, rec, stages, longest(groups), packed).values())

    def entry(overrides, need, why):
        return {"overrides": list(overrides), "needed_gib": round(need / GIB, 2), "fits": need <= budget, "why": why}

    out = []
    base, overrides = recipe, []
    for section, cfg in (("reward.train", recipe.reward.train), ("dpo.train", recipe.dpo.train)):
        if cfg.groups_per_step > 1:
            overrides += [f"{section}.groups_per_step=1", f"{section}.grad_accum={cfg.groups_per_step * cfg.grad_accum}"]
    if overrides:
        base = _with(recipe, overrides)
        out.append(entry(overrides, worst(base, per_group), "one group per micro-batch, the same groups per step"))
        if out[-1]["fits"]:
            return out
    largest_image = max(t.largest_image for t in per_group)
    if largest_image and family is not None and family.pixel_limits in ("pixels", "longest_edge", "anyres"):
        def capped(s: float) -> list[GroupTokens]:
            cap = largest_image * s
            return [_shrink(t, cap / t.largest_image) if t.largest_image > cap else t for t in per_group]
        s = _fit_search(lambda s: worst(base, capped(s)) <= budget)
        cap = _max_pixels_for(family, config, largest_image, s) if s is not None else None
        if cap:
            pixels, tokens = cap
            # estimated at the cap max_pixels really gives (whole tiles can keep it above the searched one)
            groups_capped = capped(min(1.0, tokens / largest_image))
            out.append(entry(overrides + [f"model.max_pixels={pixels}"], worst(base, groups_capped),
                             f"images capped at {tokens} tokens (now up to {largest_image})"))
            if out[-1]["fits"]:
                return out
            overrides = overrides + [f"model.max_pixels={pixels}"]  # the next levers start from the cap
            per_group = groups_capped
    most = max(t.images for t in per_group)
    if most > 1:
        for n in range(min(recipe.data.max_frames, most) - 1, 0, -1):
            groups = [_shrink(t, n / t.images) if t.images > n else t for t in per_group]
            need = worst(base, groups)
            if need <= budget:
                out.append(entry(overrides + [f"data.max_frames={n}"], need,
                                 f"at most {n} frames per video (now up to {most} images or frames per sample)"))
                return out
    extra = [o for o, off in (("model.gradient_checkpointing=true", not recipe.model.gradient_checkpointing),
                              ("model.load_in_4bit=true", not recipe.model.load_in_4bit)) if off]
    if extra:
        out.append(entry(overrides + extra, worst(_with(base, extra), per_group),
                         "4-bit weights and gradient checkpointing"))
        if out[-1]["fits"]:
            return out
    out.append({"overrides": [], "needed_gib": None, "fits": False,
                "why": "no setting found that fits: lower max_length (and drop the samples it reports), use a "
                       "smaller model or a larger GPU"})
    return out


def _with(recipe: Recipe, overrides: list[str]) -> Recipe:
    import copy

    from .recipe import parse_override
    r = copy.deepcopy(recipe)
    for text in overrides:
        key, value = parse_override(text)
        node = r
        *parents, leaf = key.split(".")
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return r


def _max_pixels_for(family, config: dict | None, largest_image: int, scale: float) -> tuple[int, int] | None:
    """(model.max_pixels, image tokens under it) capping the largest image at about `scale` of its tokens."""
    vision = (config or {}).get("vision_config") or {}
    if family.pixel_limits == "pixels":
        merge_px = vision.get("patch_size", 14) * vision.get("spatial_merge_size", 2)
        tokens = max(1, int(largest_image * scale))
        return tokens * merge_px ** 2, tokens
    if family.pixel_limits == "longest_edge":
        # Idefics3: image tokens = image_seq_len x (rows x cols tiles + the global image); under
        # max_pixels = (k x tile)^2 an image gets at most k x k tiles
        tile = (vision.get("max_image_size") or {}).get("longest_edge", vision.get("image_size", 384))
        seq = (vision.get("image_size", 384) // vision.get("patch_size", 14)) ** 2 // (config or {}).get(
            "scale_factor", 2) ** 2
        tiles = largest_image * scale / max(1, seq)
        k = max(1, int(math.sqrt(max(1.0, tiles - 1))))
        return (k * tile) ** 2, seq * (k * k + 1 if k > 1 else 1)
    if family.pixel_limits == "anyres":
        # LLaVA-OneVision: the base tile + a grid of at most k tiles (max_pixels = k tiles' area keeps the
        # resolutions with rows x cols <= k), with a newline token per row of image tokens
        tile = vision.get("image_size", 384)
        side = tile // vision.get("patch_size", 14)
        k = max(1, int(largest_image * scale / (side * side)) - 1)
        return k * tile * tile, side * side * (k + 1) + side * k
    return None


def memory_plan(recipe: Recipe, stages: Sequence[str], tokens: dict, per_group: Sequence[GroupTokens],
                config: dict | None, config_source: str, gpu_mem: str | None) -> dict[str, Any]:
    """plan["memory"]: per-stage peak estimates for the longest micro-batch, the budget (--gpu-mem or the GPU
    found) and, when over it, the overrides that fit."""
    from .memory import GIB, architecture_from_config, detect_gpu, parse_memory, settings_from_recipe
    from .models.families import FAMILIES, family_of_model_type

    out: dict[str, Any] = {"available": False, "budget": None}
    if gpu_mem:
        out["budget"] = {"bytes": parse_memory(gpu_mem), "source": f"--gpu-mem {gpu_mem}"}
    else:
        gpu = detect_gpu()
        if gpu:
            out["budget"] = {"bytes": gpu[1], "source": f"{gpu[0]} (found)"}
    if out["budget"]:
        out["budget"]["gib"] = round(out["budget"]["bytes"] / GIB, 2)
    if config is None:
        out["note"] = f"no estimate: the model's config was not found ({config_source})"
        return out
    if not tokens.get("longest"):
        out["note"] = "no estimate: no data"
        return out
    try:
        family = FAMILIES.get(tokens.get("family") or recipe.model.family) or \
            family_of_model_type(config.get("model_type", ""))
        arch = architecture_from_config(config, family.name, recipe.model.path)
    except Exception as exc:  # noqa: BLE001 - an unknown architecture only costs the estimate
        out["note"] = f"no estimate: cannot build the architecture from its config ({exc})"
        return out
    settings = settings_from_recipe(recipe)
    packed = _packed(recipe, family)
    L = tokens["longest"]
    estimates = stage_estimates(arch, settings, recipe, stages, L, packed)
    mbs = micro_batches(recipe, L, packed)
    out.update(available=True, config=config_source, family=family.name, packed=packed,
               approximate_tokens=tokens["method"] != "processor",
               architecture={"params": arch.params, "params_b": round(arch.params / 1e9, 2), "hidden": arch.hidden,
                             "layers": arch.layers, "vocab": arch.vocab,
                             "lora_params": arch.lora_params(settings.lora_r, settings.lora_targets,
                                                             settings.lora_vision)},
               stages={s: {**e.to_dict(), "micro_batch": dataclasses.asdict(mbs[s]) if s in mbs else None}
                       for s, e in estimates.items()})
    if estimates:
        peak = max(estimates.values(), key=lambda e: e.needed)
        out["peak"] = {"stage": peak.stage, "allocated_gib": round(peak.allocated / GIB, 2),
                       "needed_gib": round(peak.needed / GIB, 2)}
        if out["budget"]:
            out["fits"] = peak.needed <= out["budget"]["bytes"]
            if not out["fits"]:
                out["proposals"] = proposals(arch, settings, recipe, stages, per_group, packed,
                                             out["budget"]["bytes"], family, config)
    return out


# --------------------------------------------------------------------------------------------------
# the plan

def make_plan(recipe: Recipe, stages: Sequence[str], train_groups: Sequence[PreferenceGroup],
              eval_groups: Sequence[PreferenceGroup], gpu_mem: str | None = None) -> dict[str, Any]:
    """Everything the dry run reports, as data. `errors` is non-empty when a real run would fail."""
    stage_rows, errors = stage_status(recipe, stages)
    config, config_source = model_config(recipe)
    memo = cache_dir_of(recipe)  # a dry run reuses (and adds to) the counts of a run folder that exists
    tokens, too_long, per_group = token_stats(recipe, stages, list(train_groups) + list(eval_groups),
                                              {g.id for g in train_groups}, config, config_source,
                                              memo_dir=memo if memo.exists() else None)
    steps = {}
    for stage, section in TRAINER_STAGES.items():
        if stage in stages:
            cfg = recipe.reward.train if stage == "reward" else recipe.dpo.train
            n = len(train_groups) if stage == "reward" else sum(1 for g in train_groups if g.pairs())
            steps[stage] = {"section": section, **optimizer_steps(cfg, n)}
    if too_long:
        errors.append(f"{len(too_long)} sequence(s) longer than max_length (listed above)")
    notes, warnings = [], []
    memory = memory_plan(recipe, stages, tokens, per_group, config, config_source, gpu_mem)
    if memory.get("fits") is False:
        warnings.append(f"estimated peak {memory['peak']['needed_gib']} GiB ({memory['peak']['stage']}) exceeds the "
                        f"budget of {memory['budget']['gib']} GiB ({memory['budget']['source']}); "
                        "see 'to fit' above")
    elif gpu_mem and not memory["available"]:
        notes.append(f"--gpu-mem {gpu_mem}: {memory.get('note', 'no memory estimate')}; nothing was checked")
    return {
        "recipe": recipe.source, "run_dir": str(Path(recipe.run.dir)),
        "model": {"path": recipe.model.path, "family": tokens["family"] or recipe.model.family,
                  "load_in_4bit": recipe.model.load_in_4bit,
                  "packing": recipe.model.packing},
        "stages": stage_rows,
        "data": {"path": recipe.data.path, "train": split_counts(train_groups, recipe.dpo.pairs),
                 "eval": split_counts(eval_groups, recipe.dpo.pairs)},
        "tokens": tokens,
        "steps": steps,
        "memory": memory,
        "too_long": too_long,
        "notes": notes,
        "warnings": warnings,
        "errors": errors,
    }


# --------------------------------------------------------------------------------------------------
# rendering

def _pct(p: dict | None) -> str:
    return "-" if not p else f"p50 {p['p50']}, p95 {p['p95']}, max {p['max']}"


def _format_data(plan: dict) -> list[str]:
    lines = ["data:", f"  source: {plan['data']['path']}"]
    header = f"  {'split / category':<22}{'groups':>8}{'pairs':>8}{'ties':>7}{'dpo pairs':>11}"
    lines.append(header)
    for split in ("train", "eval"):
        c = plan["data"][split]
        lines.append(f"  {split:<22}{c['groups']:>8}{c['pairs']:>8}{c['ties']:>7}{c['dpo_pairs']:>11}")
        for cat, cc in c["categories"].items():
            lines.append(f"    {cat:<20}{cc['groups']:>8}{cc['pairs']:>8}{cc['ties']:>7}{cc['dpo_pairs']:>11}")
    for split in ("train", "eval"):
        resp = plan["data"][split]["responses"]
        if resp:
            lines.append(f"  responses per group ({split}): "
                         + ", ".join(f"{k} x {v} groups" for k, v in resp.items()))
    return lines


def _format_tokens(t: dict) -> list[str]:
    how = {"processor": "model processor", "formula": "estimate: text characters/4, image tokens by formula",
           "chars/4": "estimate, characters/4"}[t["method"]]
    lines = [f"tokens per group ({t['groups']} groups, {how}):"]
    if t["note"]:
        lines.append(f"  note: {t['note']}")
    label = "prompt (text only):  " if t["method"] == "chars/4" else "prompt (incl. image):"
    lines.append(f"  {label}   {_pct(t['prompt'])}")
    if t["image"] is not None:
        lines.append(f"    of which image:       {_pct(t['image'])}")
        for split, st in (t.get("splits") or {}).items():
            if st["image"]:
                lines.append(f"      {split + ':':<20}{_pct(st['image'])}  (packed group {_pct(st['packed'])})")
    lines += [f"  response:               {_pct(t['response'])}",
              f"  prompt + one response:  {_pct(t['sequence'])}",
              f"  packed group:           {_pct(t['packed'])}"]
    if t["critique"]:
        lines.append(f"  critique:               {_pct(t['critique'])}")
    if t["critique_sequence"]:
        lines.append(f"  reward sequence:        {_pct(t['critique_sequence'])}  (critique prompt + response + "
                     "critique)")
    if t["train_tokens_unpacked"]:
        saved = 1 - t["train_tokens_packed"] / t["train_tokens_unpacked"]
        lines.append(f"  one pass over train:    {t['train_tokens_packed']} tokens packed vs "
                     f"{t['train_tokens_unpacked']} as separate rows ({saved:.0%} fewer)")
    return lines


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _format_micro(mb: dict | None, packed: bool) -> str:
    if not mb:
        return ""
    rows = f"{mb['rows']} {'group' if packed else 'row'}{'s' if mb['rows'] != 1 else ''} x {mb['row_tokens']} tokens"
    img = f", media of {mb['vision_samples']} x {mb['patches_per_sample']} patches" if mb["vision_samples"] else ""
    return f"{rows}, {mb['target_tokens']} target tokens{img}"


def _format_memory(m: dict) -> list[str]:
    if not m:
        return []
    if not m.get("available"):
        return ["", f"memory: {m.get('note', 'no estimate')}"] if m.get("note") else []
    a = m["architecture"]
    approx = "; token counts estimated" if m.get("approximate_tokens") else ""
    lines = ["", f"memory (estimate for one GPU, transformers backend; docs/memory.md{approx}):",
             f"  architecture: {_params(a['params'])} params, hidden {a['hidden']}, {a['layers']} layers, vocab "
             f"{a['vocab']}; LoRA {a['lora_params'] / 1e6:.1f}M params (config: {m['config']})",
             f"  {'stage':<10}{'allocated':>10}{'needed':>9}   longest micro-batch"]
    for stage, e in m["stages"].items():
        lines.append(f"  {stage:<10}{e['allocated_gib']:>6.1f} GiB{e['needed_gib']:>5.1f} GiB   "
                     f"{_format_micro(e.get('micro_batch'), m['packed']) or 'generation / scoring'}")
    if m.get("peak"):
        peak = m["stages"][m["peak"]["stage"]]
        lines.append(f"  peak: {m['peak']['stage']}, {m['peak']['needed_gib']} GiB needed = "
                     + " + ".join(f"{k} {v:.2f}" for k, v in peak["components_gib"].items() if v >= 0.005)
                     + " GiB + CUDA context and allocator slack")
    if m.get("budget"):
        b = m["budget"]
        verdict = "fits" if m.get("fits") else "does NOT fit"
        lines.append(f"  budget: {b['gib']} GiB ({b['source']}): {verdict}")
    else:
        lines.append("  budget: no GPU found and no --gpu-mem given; nothing checked")
    for prop in m.get("proposals", []):
        if prop["overrides"]:
            lines.append(f"  to fit: {' '.join(prop['overrides'])}  -> {prop['needed_gib']} GiB"
                         f"{'' if prop['fits'] else ' (still over)'}  ({prop['why']})")
        else:
            lines.append(f"  to fit: {prop['why']}")
    return lines


def format_plan(plan: dict) -> str:
    """The plan as terminal text (stdout of `--dry-run`)."""
    m = plan["model"]
    lines = [f"recipe: {plan['recipe']}", f"run dir: {plan['run_dir']}",
             f"model: {m['path']} (family {m['family']}, 4-bit {'on' if m['load_in_4bit'] else 'off'}, "
             f"packing {m['packing']})", "",
             "stages: " + ", ".join(
                 s["stage"] + {"run": "", "done": " (done, skipped)", "changed": " (done with other settings)",
                                 "stale": " (done, but an input stage was recomputed since: runs again)"}[
                     s["status"]] for s in plan["stages"]), ""]
    lines += _format_data(plan) + [""] + _format_tokens(plan["tokens"])
    if plan["steps"]:
        lines += ["", "optimizer steps:"]
        for stage, s in plan["steps"].items():
            budget = f"max_steps {s['max_steps']}" if s["max_steps"] > 0 else f"{s['epochs']:g} epoch(s)"
            lines.append(f"  {stage:<7} {s['steps']} steps ({budget}; {s['groups']} groups, "
                         f"{s['groups_per_step']} per micro-batch x {s['grad_accum']} accumulated = "
                         f"{s['groups_per_optimizer_step']} per step, {s['steps_per_epoch']} steps per epoch; "
                         f"warm-up {s['warmup_steps']}; max_length {s['max_length']})")
    if plan["too_long"]:
        lines += ["", f"too long ({len(plan['too_long'])}):"]
        lines += [f"  [{x['limit']}] {x['message']}" for x in plan["too_long"][:TOO_LONG_SHOWN]]
        if len(plan["too_long"]) > TOO_LONG_SHOWN:
            lines.append(f"  ... and {len(plan['too_long']) - TOO_LONG_SHOWN} more")
    lines += _format_memory(plan.get("memory") or {})
    for note in plan["notes"]:
        lines += ["", f"note: {note}"]
    for warning in plan.get("warnings", []):
        lines += ["", f"WARNING: {warning}"]
    if plan["errors"]:
        lines += [""] + [f"ERROR: {e}" for e in plan["errors"]]
    else:
        n = len(plan.get("warnings", []))
        lines += ["", f"plan OK, {n} warning{'s' if n > 1 else ''}" if n else "plan OK"]
    return "\n".join(lines)
