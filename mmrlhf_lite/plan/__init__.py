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

Parts: `counters` (per-group token counts: exact, or offline estimates), `tokens` (statistics, the memo,
the pre-run length check), `fit` (memory estimates and the overrides that fit), `format` (terminal text).
Each family's image-token rule lives in models/image_tokens.py, named by the families table.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ..data.groups import PreferenceGroup
from ..models.image_tokens import (IMAGE_COUNTERS, SizedImage, count_idefics3, count_llava_onevision,  # noqa: F401
                                   count_qwen, image_counter, image_size)
from ..recipe import Recipe, TrainConfig
from ..runs import RunDir, cache_dir_of, changed_message, redo_for
from .counters import (CRITIQUE_STAGES, POLICY_STAGES, PROCESSOR_DEFAULTS, CountingProcessor,  # noqa: F401
                       GroupTokens, _chars_counter, _CharsTokenizer, _Counter, _formula_counter, _processor_counter,
                       _size_only_encoder_class, _too_long, model_config, offline_processor)
from .fit import (_fit_search, _max_pixels_for, _packed, _shrink, _with, memory_plan, micro_batches,  # noqa: F401
                  proposals, stage_estimates)
from .format import TOO_LONG_SHOWN, format_plan  # noqa: F401
from .tokens import (COUNTER_VERSION, TOKENS_CACHE, _counter, _media_stamp, longest, memoize_counter,  # noqa: F401
                     percentiles, preflight_too_long, token_stats)

# the per-family image-token rules under their former names
_count_qwen, _count_llava_onevision, _count_idefics3 = count_qwen, count_llava_onevision, count_idefics3

TRAINER_STAGES = {"reward": "reward.train", "dpo": "dpo.train"}


# --------------------------------------------------------------------------------------------------
# counts

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
    stale = run.stale_stages()
    changed = {s: keys for s, keys in run.changed_stages(recipe).items() if s not in stale}  # as check_recipe
    rows = [{"stage": s, "status": "changed" if s in changed else "stale" if s in stale
             else "done" if run.is_done(s) else "run"} for s in stages]
    return rows, [changed_message(run.path, s, keys, redo_for(changed)) for s, keys in changed.items()]


def rounds_plan(recipe: Recipe, stages: Sequence[str], train_groups, eval_groups, prompts) -> dict | None:
    """What the online rounds will do (None when they do not run)."""
    rc = recipe.rounds
    if "rounds" not in stages or rc.n <= 0:
        return None
    train_prompts, eval_prompts = prompts
    n = len(train_prompts) + (len(train_groups) if rc.prompts == "all" else 0)
    one_pass = dataclasses.replace(recipe.dpo.train, max_steps=0, epochs=1.0)
    steps = rc.steps or f"up to {optimizer_steps(one_pass, min(n, rc.max_prompts or n))['steps']}"
    out = {"n": rc.n, "samples": rc.samples, "prompts": n, "which": rc.prompts, "max_prompts": rc.max_prompts,
           "steps": steps, "reference": recipe.dpo.reference, "held_out": len(eval_groups),
           "held_out_prompts": len(eval_prompts), "ranker": rc.ranker}
    if rc.ranker == "answer":   # how many of the sampled prompts the data can judge (the round refuses at 0)
        from ..data.demo import answer_correct
        from ..rounds.ranking import judged_prompts, no_answer_error
        sampled = list(train_prompts) + (list(train_groups) if rc.prompts == "all" else [])
        out["answer_known"] = judged_prompts(sampled, answer_correct)
        if sampled and not out["answer_known"]:
            out["error"] = no_answer_error(f"the {len(sampled)} prompts the rounds sample")
    return out


# --------------------------------------------------------------------------------------------------
# the plan

def make_plan(recipe: Recipe, stages: Sequence[str], train_groups: Sequence[PreferenceGroup],
              eval_groups: Sequence[PreferenceGroup], gpu_mem: str | None = None,
              prompts: tuple[Sequence[PreferenceGroup], Sequence[PreferenceGroup]] = ((), ())) -> dict[str, Any]:
    """Everything the dry run reports, as data. `errors` is non-empty when a real run would fail. `prompts`: the
    training and held-out prompts without a ranking (what online rounds also sample for)."""
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
    rounds = rounds_plan(recipe, stages, train_groups, eval_groups, prompts)
    if rounds and rounds.get("error"):
        errors.append(rounds["error"])
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
        "rounds": rounds,
        "notes": notes,
        "warnings": warnings,
        "errors": errors,
    }
