"""Stage `eval`: reward-model bench (Acc / Acc+ per category, per critique mode, before vs after
training), critique quality on the demo set, and the policy: held-out implicit reward accuracy, and of
its own answers before vs after MM-DPO the share that is right (when the data knows the right answer),
the share that is well-formed, the reward model's rank among the group's K responses, and a win rate
(withheld when the starting policy's answers are not well-formed).

In the run folder it reads the held-out groups (`data.eval_fraction` / `data.eval_path`), the reward model
(`reward/final/` or `reward.model_from`'s), the policy (`dpo/final/`), `<cache>/reference.jsonl` (computing
what it lacks) and `stages/*.json` (the training stages' times, the score stage's margins summary); it
writes `eval/report.json` and `eval/report.md`, its progress per part in `events.jsonl` and, through
train.py, `stages/eval.json`. Nothing is cached: a stopped evaluation starts over.

Under a launcher every part that loops over groups (each critique mode before and after training, the
policy's log-probs, its generations, the scoring of its answers) is split over the ranks in chunks whose
size and sampling seed come from the recipe, not from the number of ranks (`distributed.sharded_map`); every
rank gathers the per-group results and runs the one-process aggregation, and rank 0 writes the report,
which is the one a single process writes.

    python -m mmrlhf_lite.train recipes/demo.yaml --stages eval
    python -m mmrlhf_lite.evaluate reward runs/demo --data my_bench.jsonl --critique given
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import distributed
from ..data.groups import PreferenceGroup, Response
from ..events import StageStopped
from ..models.encoding import GroupEncoder
from ..models.generation import generate_after
from ..models.loading import load_model, release_memory
from ..models.logprobs import use_packing
from ..runs import write_atomic
from .margins import delta_rank_correlation
from .metrics import ScoredGroup, implicit_accuracy, merge_by_id, reward_bench, win_rate
from .report import format_report


def scored_groups(groups: list[PreferenceGroup], scores: list[list[float]]) -> list[ScoredGroup]:
    return merge_by_id([ScoredGroup(g.id, g.category, g.pairs(), s, len(g.ties())) for g, s in zip(groups, scores)])


def reward_results(groups: list[PreferenceGroup], scored: list[list], weight: float) -> dict:
    """`reward_bench` of the scores; a hybrid score (weight > 0: head + w x mean log-prob) also gets each part
    ranked alone under `parts` (`head`, `response_logp`), so a report says which part does the ranking."""
    res = reward_bench(scored_groups(groups, [[s.score for s in g] for g in scored]))
    if weight > 0:
        res["response_logp_weight"] = weight
        res["parts"] = {part: reward_bench(scored_groups(groups, [[getattr(s, part) for s in g] for g in scored]))
                        for part in ("head", "response_logp")}
    return res


def split_over_ranks(ctx, part: str, items: list, chunk_size: int, fn) -> list:
    """`fn(chunk, index)` over `items`, chunks dealt to the ranks (one process: all of them), with
    progress and throughput events labelled `part` and the run's stop request agreed between ranks."""
    return distributed.sharded_map(
        items, chunk_size, fn, events=ctx.events, stop_requested=ctx.stop_requested, part=part,
        stopped=lambda done, total: f"stopped during evaluation ({part}: {done} of {total} groups; "
                                    "an evaluation is not kept in parts: it starts over)")


def score_split(ctx, scorer, groups: list[PreferenceGroup], mode: str, part: str) -> list:
    """`scorer.score_groups` over `groups`, split over the ranks; chunk `i` samples with `chunk_seed`."""
    from ..reward.scorer import groups_per_batch

    rc, seed = ctx.recipe.reward, ctx.recipe.run.seed
    return split_over_ranks(ctx, part, groups, groups_per_batch(rc, mode), lambda chunk, i: scorer.score_groups(
        chunk, mode, n_samples=rc.n_samples, temperature=rc.temperature, max_new_tokens=rc.max_new_tokens,
        batch_size=rc.generation_batch_size, seed=distributed.chunk_seed(seed, i)))


def critique_fact_rate(groups: list[PreferenceGroup], critiques: list[list[list[str]]]) -> dict | None:
    """Demo set only: share of generated critiques that name the right value of the asked attribute
    (colour / shape / count / size)."""
    from ..data.demo import KINDS, asked_value
    named = total = 0
    for g, crits in zip(groups, critiques):
        facts = g.meta.get("facts") if g.meta else None
        if not facts or g.category not in KINDS:
            continue
        right = asked_value(g.category, facts)
        for per_sample in crits:
            for c in per_sample:
                total += 1
                named += right in c.lower().split() or f"{right}." in c.lower() or f"{right}," in c.lower()
    return {"rate": named / total, "n": total} if total else None


def eval_reward_model(ctx, groups: list[PreferenceGroup]) -> dict:
    from ..reward.scorer import RewardScorer
    from ..reward.trainer import head_settings

    recipe, events = ctx.recipe, ctx.events
    rc, ec = recipe.reward, recipe.eval
    out: dict = {"modes": {}, "before": {}}
    have_critiques = all(r.critique for g in groups for r in g.responses)
    modes = [m for m in ec.critique_modes if m != "given" or have_critiques]
    for m in ec.critique_modes:
        if m not in modes:
            events.warning(f"eval: critique mode '{m}' skipped: some held-out responses have no critique")
    if not modes:
        return out
    # before training: the base model with a fresh (untrained) head and zero LoRA
    torch.manual_seed(recipe.run.seed)
    base, processor = load_model(recipe.model, reward_head=head_settings(rc),
                                 trainable=False)
    scorer = RewardScorer(base, processor, max_length=rc.train.max_length, max_frames=recipe.data.max_frames,
                          packing=recipe.model.packing, attn_implementation=recipe.model.attn_implementation)
    for m in modes:
        t = time.time()
        # scored exactly as after training (same samples per critique), so before vs after compares models only
        scored = score_split(ctx, scorer, groups, m, f"reward model before training, {m}")
        out["before"][m] = reward_results(groups, scored, scorer.response_logp_weight)
        out["before"][m]["seconds"] = round(time.time() - t, 1)
        if m == "generate":
            out["before"][m]["critique_fact_rate"] = critique_fact_rate(groups, [[s.critiques for s in g] for g in scored])
        events.metrics(**{f"reward_acc_before_{m}": out["before"][m]["overall"]["acc"]})
    del scorer, base   # before the trained model loads: one model in memory at a time
    release_memory()
    if not (ctx.reward_model_dir() / "adapter_config.json").exists():
        events.warning("eval: no trained reward model in this run; reward bench shows the untrained baseline only")
        return out
    scorer = RewardScorer.from_adapter(ctx.reward_model_dir(), recipe.model, max_length=rc.train.max_length,
                                       max_frames=recipe.data.max_frames)
    for m in modes:
        t = time.time()
        scored = score_split(ctx, scorer, groups, m, f"reward model, {m}")
        res = reward_results(groups, scored, scorer.response_logp_weight)
        res["seconds"] = round(time.time() - t, 1)
        res["delta_rank"] = delta_rank_correlation(groups, [[s.score for s in g] for g in scored])
        if m == "generate":
            res["critique_fact_rate"] = critique_fact_rate(groups, [[s.critiques for s in g] for g in scored])
            res["examples"] = [{"group": g.id, "response": g.responses[0].text, "critique": sc[0].critiques[0]}
                               for g, sc in list(zip(groups, scored))[:3]]
        out["modes"][m] = res
        events.metrics(**{f"reward_acc_{m}": res["overall"]["acc"], f"reward_acc_plus_{m}": res["overall"]["acc_plus"],
                          f"delta_rank_spearman_{m}": res["delta_rank"]["spearman"]})
    del scorer
    release_memory()
    return out


@torch.no_grad()
def eval_policy(ctx, groups: list[PreferenceGroup], *, adapter: Path | None = None, base: bool = False,
                before: bool = True, prompts: list[PreferenceGroup] = ()) -> dict | None:
    """The policy's held-out metrics: implicit reward accuracy against the base model's log-probs (the `reference`
    cache of the run), and, with `eval.policy_samples`, the metrics of its own answers (`policy_answer_metrics`).
    `adapter`: the policy to evaluate (default: the run's `dpo` policy; online rounds pass each round's); `base`:
    evaluate the base model instead (a fresh, zero LoRA); `before`: also answer with the adapter off (the base model); `prompts`: held-out prompts without a ranking,
    answered too (right answers where their `meta` knows them, and the reward model's mean score)."""
    from ..cache.reference import reference_logps
    from ..dpo.trainer import policy_dir, policy_forward

    recipe, events = ctx.recipe, ctx.events
    adapter = None if base else Path(adapter) if adapter is not None else policy_dir(ctx.run_dir)
    if adapter is not None and not (adapter / "adapter_config.json").exists():
        return None
    groups = [g for g in groups if g.pairs()]
    reference = reference_logps(ctx, groups) if groups else []
    model, processor = load_model(recipe.model, adapter=adapter, trainable=False)
    spec = model.mmrlhf.family
    packed = use_packing(spec, recipe.model.packing, recipe.model.attn_implementation)
    encoder = GroupEncoder(processor, spec, max_length=recipe.dpo.train.max_length, max_frames=recipe.data.max_frames)

    def forward(chunk: list[PreferenceGroup], _index: int) -> list[list[float]]:
        logps, _ = policy_forward(model, spec, [encoder.encode_policy(g) for g in chunk], packed)
        rows, k = [], 0
        for g in chunk:
            rows.append([float(x) for x in logps[k:k + len(g.responses)]])
            k += len(g.responses)
        return rows

    out: dict = {"implicit_accuracy": None}
    if groups:
        policy = split_over_ranks(ctx, "policy log-probs", groups, 4, forward)
        out = implicit_accuracy(policy, reference, [g.pairs() for g in groups])
        out["logp_accuracy"] = implicit_accuracy(policy, [[0.0] * len(p) for p in policy],
                                                 [g.pairs() for g in groups])["implicit_accuracy"]
        events.metrics(eval_implicit_accuracy=out["implicit_accuracy"])
    ec = recipe.eval
    asked = groups + list(prompts)
    if ec.policy_samples > 0 and asked:
        n = ec.policy_samples
        gbs = recipe.reward.generation_batch_size

        def answer(chunk: list[PreferenceGroup], index: int) -> list[tuple[list[str], list[str]]]:
            prompts_ = [(encoder.policy_prompt(g), []) for g in chunk for _ in range(n)]
            kw = dict(end_of_turn=encoder.end_of_turn, max_new_tokens=ec.max_new_tokens, do_sample=n > 1,
                      temperature=1.0, seed=distributed.chunk_seed(recipe.run.seed, index), batch_size=gbs)
            after = generate_after(model, spec, processor, prompts_, **kw)
            prior = [[] for _ in after]
            if before:
                with model.disable_adapter():
                    prior = generate_after(model, spec, processor, prompts_, **kw)
            # (after samples, before samples) of each group: prompts were laid out group by group
            return [(after[i * n:(i + 1) * n], list(prior[i * n:(i + 1) * n]) if before else [])
                    for i in range(len(chunk))]

        # about generation_batch_size prompts per chunk
        answers = split_over_ranks(ctx, "policy answers", asked, max(1, gbs // n), answer)
        del model   # the reward model scores the answers next: one model in memory at a time
        release_memory()
        out.update(policy_answer_metrics(ctx, asked, answers))
        out["samples"] = [{"group": g.id, "before": b, "after": a} for g, (a, b) in list(zip(asked, answers))[:3]]
    return out


def _share(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def policy_answer_metrics(ctx, groups: list[PreferenceGroup], answers: list[tuple[list[str], list[str]]]) -> dict:
    """Metrics of the policy's own answers before vs after MM-DPO (answers[g] = (after, before) samples; `before`
    may be empty: online rounds answer with the round's policy only): share of right answers (data whose right
    answer is known: the demo's `meta`), share of well-formed answers (groups with responses to compare the words
    with), the reward model's rank of each answer among its group's K responses (1 = above all of them), its mean
    score of the answers, and the win rate after vs before, reported only when the answers before are well-formed."""
    from ..data.demo import answer_correct
    from ..reward.scorer import RewardScorer
    from .metrics import well_formed

    recipe, events, ec, rc = ctx.recipe, ctx.events, ctx.recipe.eval, ctx.recipe.reward
    has_before = any(b for _, b in answers)
    sides = ("after", "before") if has_before else ("after",)
    out: dict = {}
    right: dict[str, list] = {side: [] for side in sides}
    formed: dict[str, list] = {side: [] for side in sides}
    for g, (a, b) in zip(groups, answers):
        for side, texts in zip(sides, (a, b)):
            for t in texts:
                if g.responses:
                    formed[side].append(well_formed(t, [r.text for r in g.responses]))
                ok = answer_correct(g, t)
                if ok is not None:
                    right[side].append(ok)
    if right["after"]:
        out["right_answers"] = {side: _share(v) for side, v in right.items()} | {"n": len(right["after"])}
        events.metrics(eval_right_answers_after=out["right_answers"]["after"],
                       **({"eval_right_answers_before": out["right_answers"]["before"]} if has_before else {}))
    if formed["after"]:
        out["well_formed"] = {side: _share(v) for side, v in formed.items()} | {"n": len(formed["after"])}
    if not (ctx.reward_model_dir() / "adapter_config.json").exists():
        return out
    scorer = RewardScorer.from_adapter(ctx.reward_model_dir(), recipe.model, max_length=rc.train.max_length,
                                       max_frames=recipe.data.max_frames)
    # policy answers have no dataset critique: `given` falls back to generating one
    mode = "generate" if rc.critique_mode == "given" else rc.critique_mode
    # one group per prompt: its K responses, then every after and before answer, scored alike
    scoring = [PreferenceGroup(id=g.id, prompt=g.prompt, images=g.images, video=g.video,
                               responses=[Response(r.text) for r in g.responses]
                               + [Response(t or " ") for t in a + b]) for g, (a, b) in zip(groups, answers)]
    scored = score_split(ctx, scorer, scoring, mode, "scoring the policy's answers")
    del scorer
    release_memory()
    ranks: dict[str, list] = {side: [] for side in sides}
    scores: dict[str, list] = {side: [] for side in sides}
    for g, (a, b), sc in zip(groups, answers, scored):
        k = len(g.responses)
        own = [s.score for s in sc[:k]]
        extra = [s.score for s in sc[k:]]
        for side, vals in zip(sides, (extra[:len(a)], extra[len(a):])):
            scores[side] += vals
            if k:
                ranks[side] += [answer_rank(v, own) for v in vals]
    out["reward_score"] = {side: _share(v) for side, v in scores.items()} | {"n": len(scores["after"]),
                                                                              "critique_mode": mode}
    metrics = {"eval_reward_score_after": out["reward_score"]["after"]}
    if ranks["after"]:
        out["reward_rank"] = {side: _share(v) for side, v in ranks.items()}
        out["reward_rank"].update({f"top_{side}": _share([r == 1 for r in v]) for side, v in ranks.items()})
        out["reward_rank"].update({"k": len(groups[0].responses) if groups else 0, "n": len(ranks["after"]),
                                   "critique_mode": mode})
        metrics["eval_reward_rank_after"] = out["reward_rank"]["after"]
    if "well_formed" in out:
        metrics["eval_well_formed_after"] = out["well_formed"]["after"]
    if has_before:
        metrics.update({f"eval_{name}_before": out[key]["before"] for name, key in (
            ("reward_rank", "reward_rank"), ("well_formed", "well_formed")) if key in out})
    events.metrics(**metrics)
    if not has_before:
        return out
    wr = win_rate(scores["after"], scores["before"])
    wr["critique_mode"] = mode
    if out.get("well_formed", {}).get("before", 0.0) < ec.min_well_formed:
        wr = {"win_rate": None, "n": wr["n"], "critique_mode": mode,
              "withheld": f"only {100 * out.get('well_formed', {}).get('before', 0.0):.1f}% of the starting "
                          f"policy's answers are well-formed (eval.min_well_formed = {ec.min_well_formed}): a win rate "
                          "against it measures how the reward model extrapolates to malformed text, not the policy"}
        events.info(f"win rate after vs before DPO not reported: {wr['withheld']}")
    else:
        events.metrics(eval_win_rate=wr["win_rate"])
    out["win_rate"] = wr
    return out


def answer_rank(score: float, group_scores: list[float]) -> float:
    """1 + the number of the group's responses scored above `score` (an exact tie counts half)."""
    return 1 + sum(1.0 if s > score else 0.5 if s == score else 0.0 for s in group_scores)


def run_stage(ctx) -> dict:
    recipe = ctx.recipe
    _, evals = ctx.data()
    if not evals:
        if recipe.rounds.n > 0:
            ctx.events.info("no held-out human-ranked group: nothing to evaluate offline (the rounds report on the "
                            "held-out prompts)")
            return {"skipped": "no held-out human-ranked group"}
        raise ValueError("no held-out groups: set data.eval_fraction > 0 or data.eval_path")
    if recipe.eval.max_groups:
        evals = evals[: recipe.eval.max_groups]
    if distributed.shards_base():
        from ..checks import FSDP_EVAL
        ctx.events.warning(FSDP_EVAL)
    start = time.time()
    report = {"groups": len(evals), "pairs": sum(len(g.pairs()) for g in evals),
              "dpo": {"beta": recipe.dpo.beta, "w": recipe.dpo.w, "k": recipe.dpo.k, "pairs": recipe.dpo.pairs,
                      "loss_type": recipe.dpo.loss_type, "gamma": recipe.dpo.gamma,
                      "sft_target": recipe.dpo.sft_target}}
    stage_seconds = {}
    for st in ("reward", "score", "reference", "dpo"):
        s = ctx.run.status(st)
        if s and s.get("train_seconds") is not None:
            stage_seconds[st] = s["train_seconds"]
    report["reward_model"] = eval_reward_model(ctx, evals)
    score = ctx.run.status("score") or {}
    if score.get("beta"):  # the margins MM-DPO trained with (stage score, recipe critique mode)
        report["margins"] = {k: score.get(k) for k in ("mode", "eval_delta_rank_spearman", "eval_delta_rank_pairs",
                                                       "beta")}
    if distributed.any_rank(ctx.stop_requested()):  # every rank takes the same branch
        raise StageStopped("stopped during evaluation (an evaluation is not kept in parts: it starts over)")
    report["policy"] = eval_policy(ctx, evals)
    report["seconds"] = round(time.time() - start, 1)
    out_dir = ctx.run.stage_dir("eval")

    def write() -> None:   # every rank holds the whole report; it is written once
        write_atomic(out_dir / "report.json", json.dumps(report, indent=2))
        write_atomic(out_dir / "report.md", format_report(report))
    distributed.on_main("eval: report", write)
    summary = {"reward_acc": {m: r["overall"]["acc"] for m, r in report["reward_model"]["modes"].items()}}
    if report.get("margins"):
        summary["delta_rank_spearman"] = report["margins"]["eval_delta_rank_spearman"]
    if report["policy"]:
        summary["implicit_accuracy"] = report["policy"]["implicit_accuracy"]
        for key, field in (("win_rate", "win_rate"), ("right_answers", "after"), ("reward_rank", "after")):
            if report["policy"].get(key):
                summary[key] = report["policy"][key][field]
    return summary


def load_report(run_dir: str | Path) -> dict | None:
    p = Path(run_dir) / "eval" / "report.json"
    return json.loads(p.read_text()) if p.exists() else None
