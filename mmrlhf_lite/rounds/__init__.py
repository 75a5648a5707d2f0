"""Stage `rounds`: online MM-DPO, the policy learning from its own answers ranked by the critique reward model.

After the offline stages (or from the base policy when the run has no human-ranked data), each of `rounds.n`
rounds samples `rounds.samples` answers per training prompt from the current policy, scores them with the reward
model in the recipe's critique mode (critiques kept), drops the prompts whose answers are degenerate or all tied
(counted), forms every ranked pair with its margin (MM-DPO's beta_i), continues MM-DPO from the current policy for
`rounds.steps`, and ends with the eval stage's policy metrics on the held-out groups. Beside the reward model's
mean score it reports what the reward model cannot game (rounds/guard.py: right and well-formed answers, their
length, the KL to the starting policy) and stops early, with a warning, when for `rounds.patience` rounds in a row
the reward rose while a held-out signal fell. Every step is a stage's own
function (rounds/round.py lists them); the rounds are not a second pipeline.

In the run folder it reads the groups and prompts (`data.path`: ranked groups and rows without a ranking,
docs/rounds.md), the reward model (`reward/final`, or `reward.model_from`'s), the offline policy (`dpo/final`; none:
the base model) and the reference cache of the held-out groups, and writes `rounds/<r>/` per round (its caches,
margins, groups, policy and eval report, then `round.json`; round 0: the starting policy's held-out metrics),
`rounds/summary.json` and `rounds/report.md` (the table of every round), its progress in `events.jsonl` (every
event tagged with its round) and, through train.py, `stages/rounds.json`.

    python -m mmrlhf_lite.train recipes/demo.yaml --rounds 3
    python -m mmrlhf_lite.train recipes/demo.yaml --stages rounds rounds.n=5     # 2 more rounds after those 3

A killed or stopped round resumes with the same command; raising `rounds.n` later continues after the last
finished round.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import distributed
from ..evaluate.metrics import known_words
from ..runs import write_atomic
from .guard import HELD_OUT_SIGNALS, RoundSignals, stop_reason
from .round import ROUND_FILE, policy_of, round_dir, run_round, start_round

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"


def rounds_done(run) -> int:
    """Rounds the run folder's finished `rounds` stage recorded (0 when it has not finished)."""
    st = run.status("rounds") or {}
    return int(st.get("rounds") or 0) if st.get("status") == "done" else 0


def rounds_pending(run, recipe) -> bool:
    """Whether a finished `rounds` stage has rounds left to run (rounds.n was raised since)."""
    return recipe.rounds.n > rounds_done(run)


def training_prompts(ctx) -> list:
    """The prompts the rounds sample for (`rounds.prompts`): the ranked training groups' prompts and the rows
    without a ranking, or only the latter."""
    data = ctx.prepared()
    return list(data.train_prompts) if ctx.recipe.rounds.prompts == "unranked" else (
        list(data.train) + list(data.train_prompts))


def starting_policy(ctx) -> Path | None:
    """pi_0: the offline `dpo` stage's policy, or None (the base model) when the run has no human-ranked training
    group; an error when it has some but the `dpo` stage has not run."""
    from ..dpo.trainer import policy_dir

    final = policy_dir(ctx.run_dir)
    if (final / "adapter_config.json").exists():
        return final
    train, _ = ctx.data()
    if train:
        raise ValueError(f"the rounds start from the offline MM-DPO policy, and {final} does not exist: run the `dpo` "
                         "stage first (it trains on the human-ranked groups)")
    ctx.events.info("no human-ranked training group: the rounds start from the base policy")
    return None


def run_stage(ctx) -> dict:
    recipe, events = ctx.recipe, ctx.events
    rc = recipe.rounds
    if rc.n == 0:
        return {"rounds": 0}
    data = ctx.prepared()
    prompts = training_prompts(ctx)
    if not prompts:
        raise ValueError(f"rounds.prompts={rc.prompts}: no training prompt to sample answers for "
                         "(docs/rounds.md: prompts are the training groups and rows without a ranking)")
    held_out = list(data.evals)[: recipe.eval.max_groups] if recipe.eval.max_groups else list(data.evals)
    held_out_prompts = list(data.eval_prompts)
    if not held_out and not held_out_prompts:
        raise ValueError("each round ends with held-out metrics, and the data has no held-out group or prompt: set "
                         "data.eval_fraction > 0 or data.eval_path")
    if not (ctx.reward_model_dir() / "adapter_config.json").exists():
        raise ValueError(f"the rounds rank answers with the reward model, and {ctx.reward_model_dir()} holds none: "
                         "run the `reward` stage or set reward.model_from")
    initial = starting_policy(ctx)
    known = known_words([r.text for g in list(data.train) + list(data.evals) for r in g.responses]) or None
    fresh = not (round_dir(ctx, 0) / ROUND_FILE).exists()
    history = [start_round(ctx, initial, held_out, held_out_prompts)]
    if fresh:
        _report_round(ctx, history[-1])
    start, stopped = initial, None
    for r in range(1, rc.n + 1):
        stopped = stop_reason(signals(history), rc.patience)
        if stopped:
            events.warning(stopped + f"; rounds {r}..{rc.n} not run")
            break
        fresh = not (round_dir(ctx, r) / ROUND_FILE).exists()
        history.append(run_round(ctx.with_events(events.tagged(round=r)), r, start, initial, prompts, held_out,
                                 held_out_prompts, known))
        if fresh:  # a round finished by an earlier invocation already has its metrics event
            _report_round(ctx, history[-1])
        start = policy_of(ctx, r)
    else:
        late = stop_reason(signals(history), rc.patience)
        if late:
            events.warning(late.replace("stopped after", "after", 1))
    summary = {"rounds": len(history) - 1, "stopped_early": stopped, "history": history}
    folder = ctx.run.stage_dir("rounds")

    def write() -> None:
        write_atomic(folder / SUMMARY_FILE, json.dumps(summary, indent=2))
        write_atomic(folder / REPORT_FILE, format_rounds(history))
    distributed.on_main("rounds summary", write)
    last = history[-1]["held_out"]
    return {"rounds": len(history) - 1, "stopped_early": stopped,
            **{f"last_{k}": v for k, v in last.items() if v is not None}}


def signals(history: list[dict]) -> list[RoundSignals]:
    """The stop rule's view of the rounds so far: the reward model's mean score of the held-out answers, and the
    held-out signals it cannot game."""
    return [RoundSignals(h["round"], h["held_out"].get("reward_score"),
                         {k: h["held_out"].get(k) for k in HELD_OUT_SIGNALS}) for h in history]


def _report_round(ctx, summary: dict) -> None:
    """One metrics event per round (step = the round): the Live tab's curves over rounds. Held-out numbers are
    `rounds_<metric>`, those of the round's samples `rounds_sampled_<metric>`."""
    flat = {f"rounds_{k}": v for k, v in summary["held_out"].items() if v is not None}
    flat.update({f"rounds_sampled_{k}": v for k, v in (summary.get("sampled") or {}).items()
                 if isinstance(v, (int, float))})
    if summary["round"]:
        flat.update(rounds_groups=summary["groups"], rounds_pairs=summary["pairs"],
                    rounds_dropped_degenerate=summary["dropped"]["degenerate"],
                    rounds_dropped_tied=summary["dropped"]["tied"],
                    rounds_dropped_unknown=summary["dropped"].get("unknown", 0))
    ctx.events.metrics(step=summary["round"], round=summary["round"], **flat)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_rounds(history: list[dict]) -> str:
    """`rounds/report.md`: one row per round (round 0 = the starting policy)."""
    lines = ["# Online MM-DPO rounds", "",
             "Held-out metrics of each round's policy (round 0: the policy the rounds started from).", "",
             "| round | right answers | well-formed | reward rank | reward score | implicit acc | groups | pairs | "
             "dropped (degenerate / tied / unknown answer) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for h in history:
        ho = h["held_out"]
        drop = h.get("dropped")
        lines.append(f"| {h['round']} | {_pct(ho.get('right_answers'))} | {_pct(ho.get('well_formed'))} | "
                     f"{_num(ho.get('reward_rank'), 2)} | {_num(ho.get('reward_score'))} | "
                     f"{_pct(ho.get('implicit_accuracy'))} | {h.get('groups', '-')} | {h.get('pairs', '-')} | "
                     + (f"{drop['degenerate']} / {drop['tied']} / {drop.get('unknown', 0)} |" if drop else "- |"))
    lines += ["", "The answers each round sampled (from the policy it started from), every sample counted: the reward "
              "model's mean score beside what it cannot game.", "",
              "| round | samples | reward score | right answers | well-formed | empty | length (words) | KL to pi_0 | "
              "reward model: right > wrong (pairs) | its top answer right (prompts) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for h in history:
        sm = h.get("sampled")
        if sm:
            lines.append(f"| {h['round']} | {sm['samples']} | {_num(sm['reward_score'])} | {_pct(sm['right_answers'])} | "
                         f"{_pct(sm['well_formed'])} | {_pct(sm['empty'])} | {_num(sm['length_words'], 1)} | "
                         f"{_num(sm['kl_to_initial'])} | {_checked(sm, 'ranker_right', 'ranker_pairs')} | "
                         f"{_checked(sm, 'best_right', 'best_prompts')} |")
    lines += ["", "The last two columns check the reward model on the policy's own answers where the data knows which "
              "are right (each distinct answer once): near 50% it ranks them by chance, and the round trains its "
              "mistakes in (docs/rounds.md)."]
    return "\n".join(lines) + "\n"


def _checked(sampled: dict, share: str, count: str) -> str:
    """A ranker check's share with its count; '-' where the data knows no right answer (or a round of an older
    version did not record it)."""
    if sampled.get(share) is None:
        return "-"
    return f"{_pct(sampled[share])} ({sampled[count]})"


__all__ = ["ROUND_FILE", "REPORT_FILE", "SUMMARY_FILE", "format_rounds", "round_dir", "rounds_done",
           "rounds_pending", "run_stage", "starting_policy", "training_prompts"]
