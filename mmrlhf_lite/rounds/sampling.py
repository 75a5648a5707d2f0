"""A round's answers: the current policy samples K answers per prompt, into a content-keyed cache.

Entries of `rounds/<r>/cache/samples.jsonl` are keyed by what produced them: the base model and the policy adapter
(its weights hashed), the processor settings, the prompt's turns and media bytes, the sampling settings and the
round, so a killed round resumes with the answers it had (the `JsonlStore` appends each batch as it is made) and a
changed policy or setting samples again. Under a launcher each rank samples its share of the prompts
(`cache.sharded.fill_missing_sharded`, the split the score and reference stages use); the sampled text of a batch
follows its batch (left padding, the batch's seed), so N ranks may sample other answers than one process.

    python -m mmrlhf_lite.train recipes/demo.yaml --rounds 2
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from ..cache.reference import policy_settings
from ..cache.sharded import fill_missing_sharded, open_shared_store
from ..cache.store import content_key, directory_fingerprint, group_content, model_fingerprint
from ..data.groups import PreferenceGroup, Response
from ..models.encoding import GroupEncoder
from ..models.generation import generate_after
from ..models.loading import load_model

SAMPLES_CACHE = "samples.jsonl"
SAMPLES_FIELDS = {"answers": list}
SAMPLING_VERSION = "rounds-sample-v1"


def policy_fingerprint(model_path: str, adapter: Path | None) -> str:
    """The base model's fingerprint, and the adapter's (its weights hashed) when the policy has one."""
    base = model_fingerprint(model_path)
    if adapter is None:
        return base
    return content_key(base, "adapter", directory_fingerprint(adapter, hash_files=("adapter_model.safetensors",)))


def sample_keys(recipe, prompts: Sequence[PreferenceGroup], policy: Path | None, round_index: int) -> list[str]:
    rc = recipe.rounds
    settings = {"samples": rc.samples, "temperature": rc.temperature, "top_p": rc.top_p,
                "max_new_tokens": rc.max_new_tokens, "seed": recipe.run.seed, "round": round_index}
    fp = policy_fingerprint(recipe.model.path, policy)
    common = (SAMPLING_VERSION, fp, policy_settings(recipe.model), recipe.data.max_frames, settings)
    return [content_key("sample", *common, group_content(g)) for g in prompts]


def batch_seed(key: str) -> int:
    """The sampling seed of a batch, from its first entry's key: the same batch samples the same answers
    wherever and whenever it runs."""
    return int(key[:8], 16) & 0x7FFFFFFF


def sample_answers(ctx, prompts: Sequence[PreferenceGroup], policy: Path | None, cache_dir: Path,
                   round_index: int) -> list[list[str]]:
    """`rounds.samples` answers per prompt from `policy` (a saved adapter; None = the base model), sampled at
    `rounds.temperature` / `rounds.top_p`, cut at the end of turn (an answer may be empty). The model loads only
    when an entry is missing."""
    recipe = ctx.recipe
    rc = recipe.rounds
    store = open_shared_store(Path(cache_dir) / SAMPLES_CACHE, SAMPLES_FIELDS)
    if store.problems:
        ctx.events.warning(store.warning("samples cache"))
    keys = sample_keys(recipe, prompts, policy, round_index)
    # one entry per prompt: the group stands for its prompt, its one "response" for the K answers
    slots = [dataclasses.replace(g, responses=[Response("answers")], explicit_pairs=None, explicit_ties=None)
             for g in prompts]
    loaded: dict = {}
    gbs = recipe.reward.generation_batch_size

    def compute(batch: list[PreferenceGroup]) -> list[list[dict]]:
        if not loaded:
            model, processor = load_model(recipe.model, adapter=policy, trainable=False, lora=False)
            spec = model.mmrlhf.family
            loaded.update(model=model, processor=processor, spec=spec,
                          encoder=GroupEncoder(processor, spec, max_length=recipe.dpo.train.max_length,
                                               max_frames=recipe.data.max_frames))
        enc = loaded["encoder"]
        requests = [(enc.policy_prompt(g), []) for g in batch for _ in range(rc.samples)]
        seed = batch_seed(keys[slot_index[id(batch[0])]]) if batch else 0
        texts = generate_after(loaded["model"], loaded["spec"], loaded["processor"], requests,
                               end_of_turn=enc.end_of_turn, max_new_tokens=rc.max_new_tokens, do_sample=True,
                               temperature=rc.temperature, top_p=rc.top_p, batch_size=gbs, seed=seed)
        k = rc.samples
        return [[{"answers": texts[i * k:(i + 1) * k]}] for i in range(len(batch))]

    # fill_missing passes the groups themselves when none of their entries is cached (subset() of all = the group)
    slot_index = {id(g): i for i, g in enumerate(slots)}
    store, _ = fill_missing_sharded(slots, [[k] for k in keys], store, compute,
                                    per_batch=max(1, gbs // rc.samples), events=ctx.events,
                                    stop_requested=ctx.stop_requested)
    return [list(store.get(k)["answers"]) for k in keys]
