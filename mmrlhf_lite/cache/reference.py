"""Stage `reference`: summed log-prob of every response under the frozen starting policy, once.

REFERENCE.md ("MM-DPO"): reference log-probs are precomputed so that DPO training runs no reference
forward pass. The starting policy is the base model (a fresh LoRA starts at zero, so "adapter off" and
"base" agree); each group is one packed forward without gradients. Online rounds (mmrlhf_lite/rounds) refer to
a trained policy instead: `adapter` names its folder, and the keys then hold the adapter's fingerprint too. Entries are keyed by content
(base-model fingerprint, prompt turns, media bytes, response text, processor settings), written as
produced, and reused by any later run that points `cache.dir` at the same folder.

In the run folder it reads the groups (`data.path`, train and eval) and the base model (`model.path`; no
adapter) and writes `<cache>/reference.jsonl` (`cache.dir`, default `cache/`: `{"key", "logp", "n_tokens"}`
per response), its progress in `events.jsonl` and, through train.py, `stages/reference.json`. The dpo and
eval stages read the cache (`reference_logps`), computing first what it lost since.

    python -m mmrlhf_lite.train recipes/demo.yaml --stages reference
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..data.groups import PreferenceGroup
from .. import distributed
from ..models.encoding import GroupEncoder
from ..models.loading import load_model
from ..models.logprobs import group_forward, use_packing
from ..models.precision import policy_forward_context
from ..recipe import ModelConfig
from .sharded import fill_missing_sharded, open_shared_store
from .store import JsonlStore, content_key, directory_fingerprint, group_content, model_fingerprint

REFERENCE_CACHE = "reference.jsonl"
POLICY_TEMPLATE = "policy-v2"  # v2: branch ids = the template's reply tokens (reply prefix), data text never parsed for special tokens
REFERENCE_FIELDS = {"logp": (int, float), "n_tokens": int}  # the shape a cache line must have


def policy_settings(model_cfg: ModelConfig) -> dict:
    """Settings that change a response's tokens, image tokens or numerics (hence its log-prob), as they
    resolve on this machine: `compute_dtype: auto` is float32 on CPU and bfloat16 on a GPU, so the key
    holds the dtype, the backend, the attention kernel and whether groups are packed that a run really
    uses, never `auto`. Reward scores are keyed on the same settings."""
    from ..models.families import detect_family
    from ..models.loading import resolve_backend, resolve_device, resolve_dtype, resolve_model_path

    device = resolve_device(model_cfg.device)
    family = detect_family(resolve_model_path(model_cfg.path), model_cfg.family)
    return {"max_pixels": model_cfg.max_pixels, "min_pixels": model_cfg.min_pixels,
            "load_in_4bit": model_cfg.load_in_4bit,
            "compute_dtype": str(resolve_dtype(model_cfg.compute_dtype, device)).replace("torch.", ""),
            "backend": resolve_backend(model_cfg, device, family),
            "attn_implementation": model_cfg.attn_implementation,
            "packed": use_packing(family, model_cfg.packing, model_cfg.attn_implementation)}


def reference_keys(groups: Sequence[PreferenceGroup], model_cfg: ModelConfig, max_frames: int,
                   adapter: Path | None = None) -> list[list[str]]:
    """One key per response; `adapter`: the log-probs are the policy's with that saved adapter, not the base's."""
    fp = model_fingerprint(model_cfg.path)
    if adapter is not None:
        fp = content_key(fp, "adapter", directory_fingerprint(adapter, hash_files=("adapter_model.safetensors",)))
    settings = policy_settings(model_cfg)
    keys = []
    for g in groups:
        content = group_content(g)
        keys.append([content_key("reference", fp, POLICY_TEMPLATE, settings, max_frames, content, r.text)
                     for r in g.responses])
    return keys


def report_repeats(train: Sequence[PreferenceGroup], evals: Sequence[PreferenceGroup], events,
                   shown: int = 3) -> dict[str, int]:
    """Warn about evaluation groups whose prompt (turns + media bytes) is also a training prompt: they leak
    evaluation data into training. Groups repeating another group's whole content are noted (their
    entries are computed once and shared). Returns the counts."""
    prompt_of = {}
    for g in train:
        prompt_of.setdefault(content_key(group_content(g)), g)
    leaks = [(g, prompt_of[k]) for g in evals if (k := content_key(group_content(g))) in prompt_of]
    if leaks:
        eg = ", ".join(f"eval {e.source or e.id} = train {t.source or t.id}" for e, t in leaks[:shown])
        events.warning(f"{len(leaks)} of {len(evals)} eval groups repeat a training prompt and images ({eg}"
                       f"{', ...' if len(leaks) > shown else ''}): evaluation data leaks into training; "
                       "remove them from one of the files")
    seen: dict[str, PreferenceGroup] = {}
    repeats = []
    for g in list(train) + list(evals):
        k = content_key(group_content(g), [r.text for r in g.responses])
        if k in seen:
            repeats.append((g, seen[k]))
        else:
            seen[k] = g
    if repeats:
        eg = ", ".join(f"{g.source or g.id} = {o.source or o.id}" for g, o in repeats[:shown])
        events.info(f"{len(repeats)} group(s) repeat the whole content of another ({eg}"
                    f"{', ...' if len(repeats) > shown else ''}): their log-probs are computed once")
    return {"eval_repeats_train": len(leaks), "repeated_groups": len(repeats)}


@torch.no_grad()
def compute_reference(model, spec, encoder: GroupEncoder, groups: Sequence[PreferenceGroup], packed: bool,
                      max_row_tokens: int | None = None) -> list[list[tuple[float, int]]]:
    """[(summed log-prob, n_tokens)] per response of each group, in the numerics of the training step
    (`policy_forward_context`, the one both use): at step 0 the policy's log-probs equal these."""
    encoded = [encoder.encode_policy(g) for g in groups]
    with policy_forward_context(model.mmrlhf.device):
        out = group_forward(model, spec, encoded, packed=packed, logps=True, max_row_tokens=max_row_tokens)
    res, k = [], 0
    for g in groups:
        res.append([(float(out.logps[k + i]), out.n_tokens[k + i]) for i in range(len(g.responses))])
        k += len(g.responses)
    return res


def load_reference(cache_dir: Path, groups: Sequence[PreferenceGroup], model_cfg: ModelConfig,
                   max_frames: int, adapter: Path | None = None) -> list[list[float]]:
    """Reference log-probs for every response; a clear error if the cache lacks any."""
    store = JsonlStore(Path(cache_dir) / REFERENCE_CACHE, REFERENCE_FIELDS)
    keys = reference_keys(groups, model_cfg, max_frames, adapter)
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


def fill_reference(ctx, groups: Sequence[PreferenceGroup], store: JsonlStore, adapter: Path | None = None) -> int:
    """Compute the entries `store` lacks for `groups` (the base model, with `adapter` when one is given, loads only
    if one is missing); under several processes each rank computes its share (cache/sharded.py). When the launch
    shards the model (FSDP2) its forwards are collectives: a rank with no batch left in a round runs the forward
    of the first group instead (`idle_forward`, its result discarded)."""
    recipe = ctx.recipe
    keys = reference_keys(groups, recipe.model, recipe.data.max_frames, adapter)
    loaded: dict = {}

    def policy() -> dict:   # loaded on first need
        if not loaded:
            model, processor = load_model(recipe.model, adapter=adapter, trainable=False, lora=False, shard=True)
            distributed.shard(model, ctx.events)
            spec = model.mmrlhf.family
            loaded.update(model=model, spec=spec,
                          packed=use_packing(spec, recipe.model.packing, recipe.model.attn_implementation),
                          encoder=GroupEncoder(processor, spec, max_length=recipe.dpo.train.max_length,
                                               max_frames=recipe.data.max_frames))
        return loaded

    def forward(batch: list[PreferenceGroup]) -> list[list[tuple[float, int]]]:
        p = policy()
        return distributed.forward(p["model"], lambda: compute_reference(p["model"], p["spec"], p["encoder"], batch,
                                                                         p["packed"]))

    def compute(batch: list[PreferenceGroup]) -> list[list[dict]]:
        return [[{"logp": lp, "n_tokens": n} for lp, n in res] for res in forward(batch)]

    _, computed = fill_missing_sharded(groups, keys, store, compute, per_batch=max(1, recipe.dpo.train.groups_per_step),
                                       events=ctx.events, stop_requested=ctx.stop_requested,
                                       idle_forward=lambda: forward(list(groups[:1])))
    return computed


def reference_logps(ctx, groups: Sequence[PreferenceGroup]) -> list[list[float]]:
    """`load_reference` for a later stage (dpo, eval): entries the cache lost since the reference stage
    finished (damaged lines dropped, a shared cache folder cleaned) are computed first, with a warning."""
    store = open_shared_store(ctx.cache_dir / REFERENCE_CACHE, REFERENCE_FIELDS)
    if store.problems:
        ctx.events.warning(store.warning("reference cache"))
    keys = reference_keys(groups, ctx.recipe.model, ctx.recipe.data.max_frames)
    missing = sum(k not in store for ks in keys for k in ks)
    if distributed.any_rank(missing > 0):  # every rank takes the same branch: the fill is collective
        ctx.events.warning(f"reference cache {store.path} lacks {missing} entr{'y' if missing == 1 else 'ies'} "
                           "the reference stage had written: computing them now")
        fill_reference(ctx, groups, store)
    return load_reference(ctx.cache_dir, groups, ctx.recipe.model, ctx.recipe.data.max_frames)


def run_stage(ctx) -> dict:
    events = ctx.events
    train, evals = ctx.data()
    groups = train + evals
    store = open_shared_store(ctx.cache_dir / REFERENCE_CACHE, REFERENCE_FIELDS)
    if store.problems:
        events.warning(store.warning("reference cache"), stage="reference")
    repeats = report_repeats(train, evals, events)
    computed = fill_reference(ctx, groups, store)
    n = sum(len(g.responses) for g in groups)
    events.info(f"reference log-probs: {n} responses ({computed} computed, {n - computed} from cache)")
    return {"responses": n, "computed": computed, "reused": n - computed, **repeats}
