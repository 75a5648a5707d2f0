"""Memory fit of the pre-flight: per-stage peak estimates for the longest micro-batch the data can form
(mmrlhf_lite/memory.py, docs/memory.md), the budget, and the overrides that fit when it is exceeded.

    python -m mmrlhf_lite.train recipes/qwen2_vl_7b-24gb.yaml --dry-run --gpu-mem 16GB
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

from ..recipe import Recipe
from .counters import GroupTokens
from .tokens import longest


def _packed(recipe: Recipe, family) -> bool:
    m = recipe.model
    return m.packing != "unpacked" and (family is None or family.packing) and m.attn_implementation in ("sdpa", "eager")


def micro_batches(recipe: Recipe, longest: dict[str, int], packed: bool) -> dict[str, "Any"]:
    """Per trainer stage, the largest micro-batch the data can produce (every group of it as long as the
    longest one): rows x padded row length, target tokens, images through the vision tower."""
    from ..memory import MicroBatch

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
    from ..memory import MicroBatch, estimate_forward, estimate_generation, estimate_training

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
    from ..memory import GIB

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

    from ..recipe import parse_override
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
    from ..memory import GIB, architecture_from_config, detect_gpu, parse_memory, settings_from_recipe
    from ..models.families import FAMILIES, family_of_model_type

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
               weight_bytes=settings.weight_bytes, load_in_4bit=settings.load_in_4bit,
               approximate_tokens=tokens["method"] != "processor",
               architecture={"params": arch.params, "params_b": round(arch.params / 1e9, 2), "hidden": arch.hidden,
                             "layers": arch.layers, "vocab": arch.vocab,
                             "largest_linear": max((i * o for i, o, _ in arch.text_linears.values()), default=0),
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
