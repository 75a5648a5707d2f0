"""One online round, built from the stages' own functions: sample -> score -> reference -> dpo -> eval.

Round r starts from policy pi_{r-1} (pi_0: the offline `dpo` stage's policy, or the base model when the run has no
human-ranked data) and writes into `rounds/<r>/`:

    cache/samples.jsonl     K answers per prompt sampled from pi_{r-1}          (rounds/sampling.py)
    cache/reward.jsonl      each distinct answer's critique and score           (reward.scorer.score_into_cache)
    cache/reference.jsonl   each answer's log-prob under the reference policy  (cache.reference.fill_reference)
    score/margins.jsonl     the round's MM-DPO groups: scores, critiques, pairs (reward.scorer.write_margins)
    groups.jsonl            the same groups as `ranked` data rows: answers, scores, critiques, pairs (write_groups)
    dpo/final/              pi_r, MM-DPO continued from pi_{r-1}               (dpo.trainer.train_policy)
    eval/report.json        pi_r's held-out policy metrics                      (evaluate.pipeline.eval_policy)
    round.json              the round's summary, written last: the round is done

The reference is pi_{r-1} (`dpo.reference: previous`) or pi_0 (`initial`). Every cache is keyed by content, so a
killed round resumes where it stopped (the same command), and the MM-DPO step resumes from its last checkpoint.

    python -m mmrlhf_lite.train recipes/demo.yaml --rounds 2
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Sequence

from .. import distributed
from ..cache.reference import REFERENCE_CACHE, REFERENCE_FIELDS, fill_reference, load_reference
from ..cache.sharded import open_shared_store
from ..data.groups import PreferenceGroup
from ..runs import write_atomic
from .guard import PromptSamples, sampled_metrics
from .ranking import answer_group, answer_records, check_answer_ranker, distinct_answers, rank_answers
from .sampling import sample_answers

ROUND_FILE = "round.json"
GROUPS_FILE = "groups.jsonl"


def round_dir(ctx, r: int) -> Path:
    return ctx.run.stage_dir("rounds") / str(r)


def policy_of(ctx, r: int) -> Path:
    """pi_r's adapter folder, r >= 1."""
    return round_dir(ctx, r) / "dpo" / "final"


def pick_prompts(prompts: Sequence[PreferenceGroup], max_prompts: int | None, seed: int, r: int) -> list:
    """All prompts, or a seeded subset of `max_prompts` (another one each round), in their data order."""
    if not max_prompts or max_prompts >= len(prompts):
        return list(prompts)
    keep = set(random.Random(f"rounds:{seed}:{r}").sample(range(len(prompts)), max_prompts))
    return [g for i, g in enumerate(prompts) if i in keep]


def round_training(recipe):
    """dpo.train with the round's steps: `rounds.steps`, or one pass over the round's groups when it is 0."""
    return dataclasses.replace(recipe.dpo.train, max_steps=recipe.rounds.steps, epochs=1.0)


def score_mode(critique_mode: str) -> str:
    """Sampled answers have no dataset critique: mode `given` generates one, as the eval stage does."""
    return "generate" if critique_mode == "given" else critique_mode


def score_answers(ctx, groups: list[PreferenceGroup], cache_dir: Path) -> list[list[dict]]:
    """The reward model's record (score, critiques) of every answer of `groups`, through the score stage's cache
    fill (split over the ranks; the model loads only when an entry is missing)."""
    from ..reward.scorer import REWARD_CACHE, REWARD_FIELDS, RewardScorer, score_into_cache

    recipe = ctx.recipe
    store = open_shared_store(cache_dir / REWARD_CACHE, REWARD_FIELDS)
    loaded: list = []

    def factory():
        if not loaded:
            loaded.append(RewardScorer.from_adapter(ctx.reward_model_dir(), recipe.model,
                                                    max_length=recipe.reward.train.max_length,
                                                    max_frames=recipe.data.max_frames))
        return loaded[0]

    records, _ = score_into_cache(ctx, groups, score_mode(recipe.reward.critique_mode), store, factory)
    return records


def reference_of(ctx, groups: list[PreferenceGroup], cache_dir: Path, policy: Path | None) -> list[list[float]]:
    """Log-probs of every answer of `groups` under `policy` (None = the base model), through the reference
    stage's cache fill."""
    recipe = ctx.recipe
    store = open_shared_store(cache_dir / REFERENCE_CACHE, REFERENCE_FIELDS)
    fill_reference(ctx, groups, store, policy)
    return load_reference(cache_dir, groups, recipe.model, recipe.data.max_frames, policy)


def run_round(ctx, r: int, start: Path | None, initial: Path | None, prompts: list[PreferenceGroup],
              held_out: list[PreferenceGroup], held_out_prompts: list[PreferenceGroup],
              known: set[str] | None = None) -> dict:
    """Round `r` from policy `start` (None = base); `initial` is pi_0; `known`: the words of the data's human-ranked
    responses (the well-formed check of the samples; None: not measured). Returns the round's summary."""
    from ..dpo.trainer import margins_for, train_policy
    from ..reward.scorer import write_margins

    folder = round_dir(ctx, r)
    if (folder / ROUND_FILE).exists():
        return json.loads((folder / ROUND_FILE).read_text())
    recipe, rc, dc = ctx.recipe, ctx.recipe.rounds, ctx.recipe.dpo
    events = ctx.events
    cache = folder / "cache"
    chosen = pick_prompts(prompts, rc.max_prompts, recipe.run.seed, r)
    from ..data.demo import answer_correct   # what the data calls right (rounds.ranker answer)
    if rc.ranker == "answer":
        check_answer_ranker(chosen, answer_correct, r)
    events.info(f"round {r}: {len(chosen)} prompts x {rc.samples} answers from "
                f"{start if start is not None else 'the base model'}", part="sample")
    answers = sample_answers(ctx.with_events(events.tagged(part="sample")), chosen, start, cache, r)
    distinct = distinct_answers(chosen, answers)
    scored = [d for d in distinct if d.texts]
    answer_groups = [answer_group(d) for d in scored]
    records = score_answers(ctx.with_events(events.tagged(part="score")), answer_groups, cache)
    by_prompt = {id(d): rec for d, rec in zip(scored, records)}
    # every sampled answer's log-prob under the sampling policy and under pi_0: the KL guard, and the reference of
    # the round's MM-DPO (the same cache entries)
    ref_events = ctx.with_events(events.tagged(part="reference"))
    policy_logps = reference_of(ref_events, answer_groups, cache, start)
    initial_logps = policy_logps if start == initial else reference_of(ref_events, answer_groups, cache, initial)
    ranking = [by_prompt.get(id(d)) for d in distinct]
    if rc.ranker == "answer":
        ranking = answer_records(distinct, ranking, answer_correct)
    ranked = rank_answers(distinct, ranking, rc.min_gap)

    def write_ranked() -> None:  # rank 0 writes, every rank goes on once it has
        write_margins(folder / "score" / "margins.jsonl", ranked.groups, ranked.records, {},
                      splits=["train"] * len(ranked.groups))
        write_groups(folder / GROUPS_FILE, ranked.groups)
    distributed.on_main(f"round {r}: its groups", write_ranked)
    summary: dict = {"round": r, "prompts": len(chosen), "samples": sum(len(a) for a in answers),
                     "dropped": ranked.dropped, "groups": len(ranked.groups),
                     "pairs": sum(len(g.pairs()) for g in ranked.groups),
                     "start_policy": str(start) if start is not None else "base",
                     "sampled": sampled_metrics(guard_view(distinct, by_prompt, scored, policy_logps, initial_logps),
                                                known)}
    check = summary["sampled"]
    if check["ranker_pairs"]:
        events.info(f"round {r}: where the data knows the right answer, the reward model scores it above a wrong one in "
                    f"{100 * check['ranker_right']:.1f}% of {check['ranker_pairs']} such pairs of sampled answers, and "
                    f"its top answer is right for {100 * check['best_right']:.1f}% of the {check['best_prompts']} "
                    "prompts with both (the pairs and best answers this round trains on)", part="score")
    if any(ranked.dropped.values()):
        unknown = (f", {ranked.dropped['unknown']} whose right answer the data does not know (rounds.ranker answer)"
                   if ranked.dropped["unknown"] else "")
        tied = "every answer right or every answer wrong" if rc.ranker == "answer" else "every answer tied"
        events.info(f"round {r}: {ranked.dropped['degenerate']} prompt(s) dropped with fewer than 2 distinct non-empty "
                    f"answers, {ranked.dropped['tied']} with {tied} (rounds.min_gap {rc.min_gap}){unknown}; "
                    f"{len(ranked.groups)} groups, {summary['pairs']} pairs left")
    if not ranked.groups:
        raise ValueError(f"round {r}: every prompt's answers are degenerate or tied ({ranked.dropped}); nothing to "
                         "train on: sample more answers (rounds.samples), at a higher rounds.temperature, or lower "
                         "rounds.min_gap" + (" (with rounds.ranker answer a prompt needs both a right and a wrong "
                                             "answer)" if rc.ranker == "answer" else ""))
    reference_policy = start if dc.reference == "previous" else initial
    reference = reference_of(ref_events, ranked.groups, cache, reference_policy)   # cached above
    deltas = margins_for(ranked.groups, dc.margin_source if dc.w > 0 else "none", folder)
    result = train_policy(ctx.with_events(events.tagged(part="dpo")), ranked.groups,
                          {g.id: ref for g, ref in zip(ranked.groups, reference)}, deltas, folder / "dpo",
                          policy_of(ctx, r), start_from=start, train=round_training(recipe))
    summary["steps"] = result.get("steps")
    summary["held_out"] = evaluate_policy(ctx.with_events(events.tagged(part="eval")), folder, held_out,
                                          held_out_prompts, policy_of(ctx, r))
    distributed.on_main(f"round {r}: done", lambda: write_atomic(folder / ROUND_FILE, json.dumps(summary, indent=2)))
    return summary


def guard_view(distinct, records_by_prompt: dict, scored, policy_logps, initial_logps) -> list[PromptSamples]:
    """The round's samples as the guard's metrics read them (rounds/guard.py)."""
    from ..data.demo import answer_correct

    logps = {id(d): (p, i) for d, p, i in zip(scored, policy_logps, initial_logps)}
    out = []
    for d in distinct:
        recs = records_by_prompt.get(id(d))
        lp = logps.get(id(d))
        out.append(PromptSamples(right=[answer_correct(d.prompt, t) for t in d.texts], texts=d.texts,
                                 counts=d.counts, empty=d.empty,
                                 scores=[float(x["score"]) for x in recs] if recs else None,
                                 policy_logps=lp[0] if lp else None, initial_logps=lp[1] if lp else None))
    return out


def write_groups(path: Path, groups: list[PreferenceGroup]) -> int:
    """The round's MM-DPO groups as native `ranked` rows (prompt, images, each answer with its score and critique,
    the pairs): a preference data set of the policy's own answers that the data tools and the UI's data browser
    read. Groups whose images are inline bytes (not files) are left out. Returns the rows written."""
    rows = []
    for g in groups:
        if any(isinstance(m, bytes) for m in list(g.images) + list(g.video or [])):
            continue
        rows.append(json.dumps(g.to_record(), ensure_ascii=False))
    write_atomic(path, "\n".join(rows) + ("\n" if rows else ""))
    return len(rows)


def evaluate_policy(ctx, folder: Path, held_out: list[PreferenceGroup], held_out_prompts: list[PreferenceGroup],
                    policy: Path | None) -> dict:
    """The eval stage's policy metrics of `policy` (None = the base model) on the held-out groups and prompts,
    written to `folder/eval/report.json`; returns the flat numbers a round reports."""
    from ..evaluate.pipeline import eval_policy

    report = eval_policy(ctx, held_out, adapter=policy, base=policy is None, before=False,
                         prompts=held_out_prompts) or {}
    distributed.on_main("round eval report", lambda: write_atomic(folder / "eval" / "report.json",
                                                                  json.dumps(report, indent=2)))
    return held_out_numbers(report)


def held_out_numbers(report: dict) -> dict:
    """The numbers of an eval_policy report that a round's table shows (None where the data cannot tell)."""
    def get(key, side="after"):
        value = report.get(key)
        return value.get(side) if isinstance(value, dict) else None

    return {"right_answers": get("right_answers"), "well_formed": get("well_formed"),
            "reward_rank": get("reward_rank"), "reward_score": get("reward_score"),
            "implicit_accuracy": report.get("implicit_accuracy")}


def start_round(ctx, initial: Path | None, held_out: list[PreferenceGroup],
                held_out_prompts: list[PreferenceGroup]) -> dict:
    """Round 0: the held-out metrics of the policy the rounds start from (`rounds/0/round.json`)."""
    folder = round_dir(ctx, 0)
    if (folder / ROUND_FILE).exists():
        return json.loads((folder / ROUND_FILE).read_text())
    events = ctx.events.tagged(round=0, part="eval")
    summary = {"round": 0, "start_policy": str(initial) if initial is not None else "base",
               "held_out": evaluate_policy(ctx.with_events(events), folder, held_out, held_out_prompts, initial)}
    distributed.on_main("round 0: done", lambda: write_atomic(folder / ROUND_FILE, json.dumps(summary, indent=2)))
    return summary
