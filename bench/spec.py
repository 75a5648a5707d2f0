"""What one benchmark measurement is (`RunSpec`), the systems it can name, and the result row every system
returns (bench/README.md, "Result rows"): its status, and the throughput fields computed from the token
layout the same way for every system (bench/flops.py).

    python -m pytest tests/test_bench.py -q
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from . import flops as F
from .configs import get_shape
from .data import SyntheticSpec
from .measure import peak_rss_gib

OURS = {
    "ours": dict(packed=True, backend="transformers", vision_cache=False, layout="packed"),
    "ours-unpacked": dict(packed=False, backend="transformers", vision_cache=False, layout="unpacked"),
    "ours-vcache": dict(packed=True, backend="transformers", vision_cache=True, layout="packed-vision-cached"),
    "ours-unsloth": dict(packed=True, backend="unsloth", vision_cache=False, layout="packed"),
}
TRL_SYSTEMS = {"trl": dict(unsloth=False, layout="pairs"), "unsloth-trl": dict(unsloth=True, layout="pairs")}
SYSTEMS = tuple(OURS) + tuple(TRL_SYSTEMS)
LORA_R, LORA_ALPHA, LEARNING_RATE, BETA = 16, 32.0, 5e-5, 0.1


@dataclass
class RunSpec:
    system: str
    model: str                    # shape name (bench/configs.py)
    model_dir: str
    batch: int                    # groups per step (ours*) or pairs per step (trl, unsloth-trl)
    image_tokens: int = 1024
    response_tokens: int = 186
    question_tokens: int = 12
    k: int = 4
    steps: int = 20
    warmup: int = 3
    seed: int = 0
    mem_cap_gb: float | None = None
    peak_tflops: float = F.H100_SXM_BF16_DENSE_TFLOPS
    w: float = 0.1                # MM-DPO dynamic beta weight (ours); 0 = plain DPO

    def synthetic(self) -> SyntheticSpec:
        return SyntheticSpec(image_tokens=self.image_tokens, k=self.k, response_tokens=self.response_tokens,
                             question_tokens=self.question_tokens, seed=self.seed)

    @property
    def unit(self) -> str:
        return "pairs" if self.system in TRL_SYSTEMS else "groups"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def result_row(spec: RunSpec, status: str, **fields) -> dict:
    fields.setdefault("peak_rss_gib", peak_rss_gib())
    return {"kind": "run", "system": spec.system, "status": status, "model": spec.model,
            "batch_unit": spec.unit, "batch": spec.batch, "image_tokens_target": spec.image_tokens,
            "response_tokens_target": spec.response_tokens, "k": spec.k, "steps": spec.steps,
            "warmup": spec.warmup, "mem_cap_gb": spec.mem_cap_gb, **fields}


def skipped(spec: RunSpec, reason: str) -> dict:
    return result_row(spec, "skipped", reason=reason)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return "out of memory" in str(exc).lower()


def group_tokens(encoded) -> list[F.GroupTokens]:
    out = []
    for e in encoded:
        thw = e.prefix.get("image_grid_thw")
        patches = tuple(int(t * h * w) for t, h, w in thw.tolist()) if thw is not None else ()
        out.append(F.GroupTokens(prompt=e.prefix_len, responses=tuple(len(b.ids) for b in e.branches),
                                 image_patches=patches, targets=tuple(sum(b.target) for b in e.branches)))
    return out


def throughput_fields(spec: RunSpec, layout: str, tokens: list[F.GroupTokens], pairs_per_step: float,
                      seconds_per_step: float | None) -> dict[str, Any]:
    """pairs/s, unique tokens/s, useful FLOPs and MFU from the median seconds per step (reference included
    for ours). Each pair is credited with its group's unique tokens / pairs, the same for every system."""
    shape = get_shape(spec.model)
    n_pairs = sum(g.n_pairs for g in tokens)
    useful = sum(F.useful_group_flops(shape, g, LORA_R)["total"].total for g in tokens) / n_pairs
    executed = sum(F.executed_group_flops(shape, g, layout, LORA_R)["total"].total for g in tokens) / n_pairs
    unique = sum(g.unique_tokens for g in tokens) / n_pairs
    out = {"pairs_per_step": pairs_per_step, "layout": layout,
           "prompt_tokens_mean": sum(g.prompt for g in tokens) / len(tokens),
           "response_tokens_mean": sum(sum(g.responses) for g in tokens) / sum(len(g.responses) for g in tokens),
           "image_patches_mean": sum(sum(g.image_patches) for g in tokens) / len(tokens),
           "unique_tokens_per_pair": unique, "useful_tflop_per_pair": useful / 1e12,
           "executed_tflop_per_pair": executed / 1e12, "peak_tflops": spec.peak_tflops}
    if seconds_per_step:
        pairs_per_s = pairs_per_step / seconds_per_step
        out.update(pairs_per_s=pairs_per_s, unique_tokens_per_s=pairs_per_s * unique,
                   useful_tflops=pairs_per_s * useful / 1e12, mfu=F.mfu(pairs_per_s * useful, spec.peak_tflops))
    return out
