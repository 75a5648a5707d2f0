"""Stage `reference`: summed log-prob of every response under the frozen starting policy, once.

REFERENCE.md ("MM-DPO"): reference log-probs are precomputed so that DPO training runs no reference
forward pass. The starting policy is the base model (a fresh LoRA starts at zero, so "adapter off" and
"base" agree); each group is one packed forward without gradients. Entries are keyed by content
(base-model fingerprint, prompt turns, media bytes, response text, processor settings), written as
produced, and reused by any later run that points `cache.dir` at the same folder.

    python -m mmrlhf_lite.train recipes/demo.yaml --stages reference
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..data.groups import PreferenceGroup
from ..models.encoding import GroupEncoder
from ..models.loading import load_model
from ..models.packing import group_forward, use_packing
from ..recipe import ModelConfig
from .sharded import fill_missing_sharded, open_shared_store
from .store import JsonlStore, content_key, group_content, model_fingerprint

REFERENCE_CACHE = "reference.jsonl"
POLICY_TEMPLATE = "policy-v1"


def policy_settings(model_cfg: ModelConfig) -> dict:
    """Settings that change a response's tokens or image tokens (hence its log-prob)."""
    return {"max_pixels": model_cfg.max_pixels, "min_pixels": model_cfg.min_pixels,
            "load_in_4bit": model_cfg.load_in_4bit, "compute_dtype": model_cfg.compute_dtype}


def reference_keys(groups: Sequence[PreferenceGroup], model_cfg: ModelConfig, max_frames: int) -> list[list[str]]:
    fp = model_fingerprint(model_cfg.path)
    settings = policy_settings(model_cfg)
    keys = []
    for g in groups:
        content = group_content(g)
        keys.append([content_key("reference", fp, POLICY_TEMPLATE, settings, max_frames, content, r.text)
                     for r in g.responses])
    return keys


@torch.no_grad()
def compute_reference(model, spec, encoder: GroupEncoder, groups: Sequence[PreferenceGroup], packed: bool,
                      max_row_tokens: int | None = None) -> list[list[tuple[float, int]]]:
    """[(summed log-prob, n_tokens)] per response of each group."""
    encoded = [encoder.encode_policy(g) for g in groups]
    out = group_forward(model, spec, encoded, packed=packed, logps=True, max_row_tokens=max_row_tokens)
    res, k = [], 0
    for g in groups:
        res.append([(float(out.logps[k + i]), out.n_tokens[k + i]) for i in range(len(g.responses))])
        k += len(g.responses)
    return res


def load_reference(cache_dir: Path, groups: Sequence[PreferenceGroup], model_cfg: ModelConfig,
                   max_frames: int) -> list[list[float]]:
    """Reference log-probs for every response; a clear error if the cache lacks any."""
    store = JsonlStore(Path(cache_dir) / REFERENCE_CACHE)
    keys = reference_keys(groups, model_cfg, max_frames)
    out, missing = [], 0
    for g, ks in zip(groups, keys):
        row = []
        for k in ks:
            rec = store.get(k)
            if rec is None:
                missing += 1
                row.append(float("nan"))
            else:
                row.append(rec["logp"])
        out.append(row)
    if missing:
        raise FileNotFoundError(f"{missing} response(s) have no reference log-prob in {store.path}: run the "
                                "`reference` stage first (it computes only what is missing)")
    return out


def run_stage(ctx) -> dict:
    recipe, events = ctx.recipe, ctx.events
    train, evals = ctx.data()
    groups = train + evals
    store = open_shared_store(ctx.cache_dir / REFERENCE_CACHE)
    if store.torn_lines:
        events.warning(f"reference cache: ignored {store.torn_lines} torn line(s) from an interrupted run")
    keys = reference_keys(groups, recipe.model, recipe.data.max_frames)
    loaded: dict = {}

    def compute(batch: list[PreferenceGroup]) -> list[list[dict]]:
        if not loaded:  # the model is loaded only when something is missing
            model, processor = load_model(recipe.model, trainable=False, lora=False)
            spec = model.mmrlhf.family
            loaded.update(model=model, spec=spec,
                          packed=use_packing(spec, recipe.model.packing, recipe.model.attn_implementation),
                          encoder=GroupEncoder(processor, spec, max_length=recipe.dpo.train.max_length,
                                               max_frames=recipe.data.max_frames))
        results = compute_reference(loaded["model"], loaded["spec"], loaded["encoder"], batch, loaded["packed"])
        return [[{"logp": lp, "n_tokens": n} for lp, n in res] for res in results]

    store, computed = fill_missing_sharded(groups, keys, store, compute,
                                           per_batch=max(1, recipe.dpo.train.groups_per_step), events=events,
                                           stop_requested=ctx.stop_requested)
    n = sum(len(g.responses) for g in groups)
    events.info(f"reference log-probs: {n} responses ({computed} computed, {n - computed} from cache)")
    return {"responses": n, "computed": computed, "reused": n - computed}
