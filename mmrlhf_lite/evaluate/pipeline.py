"""Stage `eval`: reward-model bench (Acc / Acc+ per category, per critique mode, before vs after
training), critique quality on the demo set, and the policy's held-out implicit reward accuracy and
reward-model win rate of its answers after vs before MM-DPO. Writes `eval/report.json` and
`eval/report.md`.

    python -m mmrlhf_lite.train recipes/demo.yaml --stages eval
    python -m mmrlhf_lite.evaluate reward runs/demo --data my_bench.jsonl --critique given
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from ..data.groups import PreferenceGroup, Response
from ..events import StageStopped
from ..models.encoding import GroupEncoder
from ..models.generation import generate_after
from ..models.loading import load_model
from ..models.packing import use_packing
from ..runs import write_atomic
from .metrics import ScoredGroup, implicit_accuracy, merge_by_id, reward_bench, win_rate
from .report import format_report


def _free(*objs) -> None:
    for o in objs:
        del o
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def scored_groups(groups: list[PreferenceGroup], scores: list[list[float]]) -> list[ScoredGroup]:
    return merge_by_id([ScoredGroup(g.id, g.category, g.pairs(), s, len(g.ties())) for g, s in zip(groups, scores)])


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
    base, processor = load_model(recipe.model, reward_head={"kind": rc.head, "dropout": rc.head_dropout},
                                 trainable=False)
    scorer = RewardScorer(base, processor, max_length=rc.train.max_length, max_frames=recipe.data.max_frames,
                          packing=recipe.model.packing, attn_implementation=recipe.model.attn_implementation)
    for m in modes:
        t = time.time()
        scored = scorer.score_groups(groups, m, max_new_tokens=rc.max_new_tokens,
                                     batch_size=rc.generation_batch_size, seed=recipe.run.seed)
        out["before"][m] = reward_bench(scored_groups(groups, [[s.score for s in g] for g in scored]))
        out["before"][m]["seconds"] = round(time.time() - t, 1)
        if m == "generate":
            out["before"][m]["critique_fact_rate"] = critique_fact_rate(groups, [[s.critiques for s in g] for g in scored])
        events.metrics(**{f"reward_acc_before_{m}": out["before"][m]["overall"]["acc"]})
    _free(scorer, base)
    if not (ctx.reward_model_dir() / "adapter_config.json").exists():
        events.warning("eval: no trained reward model in this run; reward bench shows the untrained baseline only")
        return out
    scorer = RewardScorer.from_adapter(ctx.reward_model_dir(), recipe.model, max_length=rc.train.max_length,
                                       max_frames=recipe.data.max_frames)
    for m in modes:
        t = time.time()
        scored = scorer.score_groups(groups, m, n_samples=rc.n_samples, temperature=rc.temperature,
                                     max_new_tokens=rc.max_new_tokens, batch_size=rc.generation_batch_size,
                                     seed=recipe.run.seed)
        res = reward_bench(scored_groups(groups, [[s.score for s in g] for g in scored]))
        res["seconds"] = round(time.time() - t, 1)
        if m == "generate":
            res["critique_fact_rate"] = critique_fact_rate(groups, [[s.critiques for s in g] for g in scored])
            res["examples"] = [{"group": g.id, "response": g.responses[0].text, "critique": sc[0].critiques[0]}
                               for g, sc in list(zip(groups, scored))[:3]]
        out["modes"][m] = res
        events.metrics(**{f"reward_acc_{m}": res["overall"]["acc"], f"reward_acc_plus_{m}": res["overall"]["acc_plus"]})
    _free(scorer)
    return out


@torch.no_grad()
def eval_policy(ctx, groups: list[PreferenceGroup]) -> dict | None:
    from ..cache.reference import reference_logps
    from ..dpo.trainer import policy_dir, policy_forward
    from ..reward.scorer import RewardScorer

    recipe, events = ctx.recipe, ctx.events
    adapter = policy_dir(ctx.run_dir)
    if not (adapter / "adapter_config.json").exists():
        return None
    groups = [g for g in groups if g.pairs()]
    reference = reference_logps(ctx, groups)
    model, processor = load_model(recipe.model, adapter=adapter, trainable=False)
    spec = model.mmrlhf.family
    packed = use_packing(spec, recipe.model.packing, recipe.model.attn_implementation)
    encoder = GroupEncoder(processor, spec, max_length=recipe.dpo.train.max_length, max_frames=recipe.data.max_frames)
    policy = []
    for s in range(0, len(groups), 4):
        chunk = groups[s:s + 4]
        logps, _ = policy_forward(model, spec, [encoder.encode_policy(g) for g in chunk], packed)
        k = 0
        for g in chunk:
            policy.append([float(x) for x in logps[k:k + len(g.responses)]])
            k += len(g.responses)
    out = implicit_accuracy(policy, reference, [g.pairs() for g in groups])
    out["logp_accuracy"] = implicit_accuracy(policy, [[0.0] * len(p) for p in policy],
                                             [g.pairs() for g in groups])["implicit_accuracy"]
    events.metrics(eval_implicit_accuracy=out["implicit_accuracy"])
    ec = recipe.eval
    if ec.policy_samples > 0 and (ctx.reward_model_dir() / "adapter_config.json").exists():
        prompts = [(encoder.policy_prompt(g), []) for g in groups for _ in range(ec.policy_samples)]
        kw = dict(end_of_turn=encoder.end_of_turn, max_new_tokens=ec.max_new_tokens,
                  do_sample=ec.policy_samples > 1, temperature=1.0, seed=recipe.run.seed,
                  batch_size=recipe.reward.generation_batch_size)
        after = generate_after(model, spec, processor, prompts, **kw)
        with model.disable_adapter():
            before = generate_after(model, spec, processor, prompts, **kw)
        _free(model)
        rc = recipe.reward
        scorer = RewardScorer.from_adapter(ctx.reward_model_dir(), recipe.model, max_length=rc.train.max_length,
                                           max_frames=recipe.data.max_frames)
        pairs_groups = []
        for i, (a, b) in enumerate(zip(after, before)):
            g = groups[i // ec.policy_samples]
            pairs_groups.append(PreferenceGroup(id=f"{g.id}#{i}", prompt=g.prompt, images=g.images, video=g.video,
                                                responses=[Response(a or " "), Response(b or " ")]))
        # policy answers have no dataset critique: `given` falls back to generating one
        mode = "generate" if rc.critique_mode == "given" else rc.critique_mode
        scored = scorer.score_groups(pairs_groups, mode, max_new_tokens=rc.max_new_tokens,
                                     batch_size=rc.generation_batch_size, seed=recipe.run.seed)
        out["win_rate"] = win_rate([s[0].score for s in scored], [s[1].score for s in scored])
        out["win_rate"]["critique_mode"] = mode
        out["samples"] = [{"group": g.id, "before": b, "after": a} for g, a, b in list(zip(groups, after, before))[:3]]
        events.metrics(eval_win_rate=out["win_rate"]["win_rate"])
        _free(scorer)
    return out


def run_stage(ctx) -> dict:
    recipe = ctx.recipe
    _, evals = ctx.data()
    if not evals:
        raise ValueError("no held-out groups: set data.eval_fraction > 0 or data.eval_path")
    if recipe.eval.max_groups:
        evals = evals[: recipe.eval.max_groups]
    start = time.time()
    report = {"groups": len(evals), "pairs": sum(len(g.pairs()) for g in evals),
              "dpo": {"beta": recipe.dpo.beta, "w": recipe.dpo.w, "k": recipe.dpo.k, "pairs": recipe.dpo.pairs,
                      "loss_type": recipe.dpo.loss_type}}
    stage_seconds = {}
    for st in ("reward", "score", "reference", "dpo"):
        s = ctx.run.status(st)
        if s and s.get("train_seconds") is not None:
            stage_seconds[st] = s["train_seconds"]
    report["reward_model"] = eval_reward_model(ctx, evals)
    if ctx.stop_requested():
        raise StageStopped("stopped during evaluation; run again to evaluate")
    report["policy"] = eval_policy(ctx, evals)
    report["seconds"] = round(time.time() - start, 1)
    out_dir = ctx.run.stage_dir("eval")
    write_atomic(out_dir / "report.json", json.dumps(report, indent=2))
    write_atomic(out_dir / "report.md", format_report(report))
    summary = {"reward_acc": {m: r["overall"]["acc"] for m, r in report["reward_model"]["modes"].items()}}
    if report["policy"]:
        summary["implicit_accuracy"] = report["policy"]["implicit_accuracy"]
        if "win_rate" in report["policy"]:
            summary["win_rate"] = report["policy"]["win_rate"]["win_rate"]
    return summary


def load_report(run_dir: str | Path) -> dict | None:
    p = Path(run_dir) / "eval" / "report.json"
    return json.loads(p.read_text()) if p.exists() else None
