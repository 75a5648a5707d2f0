"""The dry-run plan: what a recipe would do, counted before any model weight is loaded.

    python -m mmrlhf_lite.train recipes/demo.yaml --dry-run

`make_plan` tokenises every group with the model's own processor (the chat template, image tokens
included) exactly as the stages will, so the sequence lengths it reports are the ones training sees,
and a sample longer than `max_length` is reported here, by file:line, instead of hours into a run.
Only the processor/tokenizer is loaded. When it cannot be (a hub id while offline, say), lengths fall
back to characters / 4 with image tokens uncounted, and the plan says so.

The plan is a JSON-able dict (the UI shows the same facts); `format_plan` renders it for the terminal.
A memory estimate (a later addition) belongs next to the token counts it is derived from: a
`plan["memory"]` entry filled from `plan["tokens"]` and `plan["steps"]`, with its own section in
`format_plan`.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from .data.groups import PreferenceGroup
from .recipe import Recipe, TrainConfig
from .runs import RunDir, _diff, stage_inputs

TRAINER_STAGES = {"reward": "reward.train", "dpo": "dpo.train"}
# which sequence each stage feeds the model, and the max_length that bounds it
POLICY_STAGES = ("reference", "dpo")
CRITIQUE_STAGES = ("reward",)
TOO_LONG_SHOWN = 20


# --------------------------------------------------------------------------------------------------
# counts

def percentiles(values: Sequence[int]) -> dict[str, int] | None:
    """p50 / p95 / max by the nearest-rank rule (an observed value, never interpolated)."""
    if not values:
        return None
    s = sorted(values)
    rank = lambda q: s[max(1, math.ceil(q * len(s))) - 1]  # noqa: E731
    return {"p50": rank(0.50), "p95": rank(0.95), "max": s[-1]}


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
    """Per requested stage: `run` or `done` (skipped), and errors for finished stages whose inputs changed
    (a real run refuses those, `RunDir.check_recipe`)."""
    run = RunDir(recipe.run.dir)
    now = recipe.to_dict()
    rows, errors = [], []
    for stage in stages:
        rows.append({"stage": stage, "status": "done" if run.is_done(stage) else "run"})
    for stage in ("reward", "score", "reference", "dpo", "eval"):
        st = run.status(stage)
        if not st or st.get("status") != "done":
            continue
        changed = _diff(st.get("inputs", {}), stage_inputs(now, stage), "")
        if changed:
            errors.append(f"run folder {run.path} has finished stage '{stage}' with different settings "
                          f"(changed: {', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); "
                          f"use a new run.dir or --redo {stage}")
            for row in rows:
                if row["stage"] == stage:
                    row["status"] = "changed"
    return rows, errors


# --------------------------------------------------------------------------------------------------
# tokens

@dataclasses.dataclass
class _Encoders:
    """How groups become token counts: the real processor, or the chars/4 fallback."""
    method: str                                   # "processor" or "chars/4"
    policy: Callable[[PreferenceGroup], Any] | None = None
    critique: Callable[[PreferenceGroup], Any] | None = None
    check_policy: Callable[[PreferenceGroup, Any], None] | None = None
    check_critique: Callable[[PreferenceGroup, Any], None] | None = None
    count_text: Callable[[str], int] = lambda text: math.ceil(len(text) / 4)
    image_tokens: Callable[[Any], int] = lambda enc: 0
    note: str = ""
    family: str | None = None                     # detected when the processor loaded


def _encoders(recipe: Recipe, stages: Sequence[str]) -> _Encoders:
    """The processor-backed encoders, or the fallback with the reason it was needed."""
    from .models.loading import load_processor, resolve_model_path

    try:
        from .models.encoding import GroupEncoder
        from .models.families import detect_family

        path = resolve_model_path(recipe.model.path)
        family = detect_family(path, recipe.model.family)
        processor = load_processor(path, family, recipe.model)
    except Exception as exc:  # noqa: BLE001 - any failure here only costs accuracy, and is reported
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _Encoders(method="chars/4", note=f"processor of '{recipe.model.path}' not loadable ({reason}); "
                                                 "lengths are estimated as characters/4 and image tokens are "
                                                 "not counted")
    # no length limit while measuring; each stage's own max_length is checked afterwards
    unlimited = GroupEncoder(processor, family, max_length=10 ** 9, max_frames=recipe.data.max_frames)
    dpo_limit = dataclasses.replace(unlimited, max_length=recipe.dpo.train.max_length)
    reward_limit = dataclasses.replace(unlimited, max_length=recipe.reward.train.max_length)
    enc = _Encoders(method="processor", policy=unlimited.encode_policy,
                    check_policy=lambda g, e: dpo_limit.check_length(g, e, "prompt + response"),
                    count_text=lambda text: len(unlimited.tokens(text)),
                    image_tokens=lambda e: unlimited.image_token_count(e.prefix), family=family.name)
    if any(s in stages for s in CRITIQUE_STAGES):
        try:
            from .reward.prompt import CritiqueEncoder
        except ImportError:
            return enc
        critique = CritiqueEncoder(unlimited)
        enc.critique = lambda g: critique.encode(g)[0]
        enc.check_critique = lambda g, e: reward_limit.check_length(g, e, "critique prompt + response + critique")
    return enc


def _estimate(group: PreferenceGroup, count_text: Callable[[str], int]) -> tuple[int, list[int]]:
    """(prompt tokens, response tokens) from text only."""
    prompt = sum(count_text(p.get("text") or "") for t in group.prompt for p in t["content"])
    return prompt, [count_text(r.text) for r in group.responses]


def token_stats(recipe: Recipe, stages: Sequence[str], groups: Sequence[PreferenceGroup],
                train_ids: set[str]) -> tuple[dict[str, Any], list[dict]]:
    """Token counts per group and the samples over max_length (all groups, train and eval)."""
    from .models.encoding import SequenceTooLong

    enc = _encoders(recipe, stages)
    prompt, images, responses, sequences, packed, critique_seq, critiques = [], [], [], [], [], [], []
    train_packed = train_unpacked = 0
    too_long: list[dict] = []
    check_policy = any(s in stages for s in POLICY_STAGES)
    for g in groups:
        if enc.policy is not None:
            e = enc.policy(g)
            p_len, r_lens = e.prefix_len, [len(b.ids) for b in e.branches]
            images.append(enc.image_tokens(e))
            if check_policy:
                try:
                    enc.check_policy(g, e)
                except SequenceTooLong as exc:
                    too_long.append({"limit": "dpo.train.max_length", "source": g.source or g.id,
                                     "message": str(exc)})
        else:
            p_len, r_lens = _estimate(g, enc.count_text)
            if check_policy and p_len + max(r_lens) > recipe.dpo.train.max_length:
                too_long.append({"limit": "dpo.train.max_length", "source": g.source or g.id,
                                 "message": f"{g.source or g.id}: about {p_len + max(r_lens)} tokens (estimated) "
                                            f"> max_length {recipe.dpo.train.max_length}"})
        prompt.append(p_len)
        responses.extend(r_lens)
        sequences.extend(p_len + n for n in r_lens)
        packed.append(p_len + sum(r_lens))
        if g.id in train_ids:
            train_packed += p_len + sum(r_lens)
            train_unpacked += sum(p_len + n for n in r_lens)
        crit = [r.critique for r in g.responses if r.critique]
        critiques.extend(enc.count_text(c) for c in crit)
        if enc.critique is not None and crit:
            ce = enc.critique(g)
            critique_seq.extend(ce.lengths())
            try:
                enc.check_critique(g, ce)
            except SequenceTooLong as exc:
                too_long.append({"limit": "reward.train.max_length", "source": g.source or g.id,
                                 "message": str(exc)})
    stats = {"method": enc.method, "note": enc.note, "family": enc.family, "groups": len(groups),
             "prompt": percentiles(prompt), "image": percentiles(images) if images else None,
             "response": percentiles(responses), "sequence": percentiles(sequences), "packed": percentiles(packed),
             "critique": percentiles(critiques), "critique_sequence": percentiles(critique_seq),
             "train_tokens_packed": train_packed, "train_tokens_unpacked": train_unpacked}
    return stats, too_long


# --------------------------------------------------------------------------------------------------
# the plan

def make_plan(recipe: Recipe, stages: Sequence[str], train_groups: Sequence[PreferenceGroup],
              eval_groups: Sequence[PreferenceGroup], gpu_mem: str | None = None) -> dict[str, Any]:
    """Everything the dry run reports, as data. `errors` is non-empty when a real run would fail."""
    stage_rows, errors = stage_status(recipe, stages)
    tokens, too_long = token_stats(recipe, stages, list(train_groups) + list(eval_groups),
                                   {g.id for g in train_groups})
    steps = {}
    for stage, section in TRAINER_STAGES.items():
        if stage in stages:
            cfg = recipe.reward.train if stage == "reward" else recipe.dpo.train
            n = len(train_groups) if stage == "reward" else sum(1 for g in train_groups if g.pairs())
            steps[stage] = {"section": section, **optimizer_steps(cfg, n)}
    if too_long:
        errors.append(f"{len(too_long)} sequence(s) longer than max_length (listed above)")
    notes = []
    if gpu_mem:
        notes.append(f"--gpu-mem {gpu_mem}: no memory estimate in this version; nothing was checked against it")
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
        "too_long": too_long,
        "notes": notes,
        "errors": errors,
    }


# --------------------------------------------------------------------------------------------------
# rendering

def _pct(p: dict | None) -> str:
    return "-" if not p else f"p50 {p['p50']}, p95 {p['p95']}, max {p['max']}"


def _format_data(plan: dict) -> list[str]:
    lines = ["data:", f"  source: {plan['data']['path']}"]
    header = f"  {'split / category':<22}{'groups':>8}{'pairs':>8}{'ties':>7}{'dpo pairs':>11}"
    lines.append(header)
    for split in ("train", "eval"):
        c = plan["data"][split]
        lines.append(f"  {split:<22}{c['groups']:>8}{c['pairs']:>8}{c['ties']:>7}{c['dpo_pairs']:>11}")
        for cat, cc in c["categories"].items():
            lines.append(f"    {cat:<20}{cc['groups']:>8}{cc['pairs']:>8}{cc['ties']:>7}{cc['dpo_pairs']:>11}")
    for split in ("train", "eval"):
        resp = plan["data"][split]["responses"]
        if resp:
            lines.append(f"  responses per group ({split}): "
                         + ", ".join(f"{k} x {v} groups" for k, v in resp.items()))
    return lines


def _format_tokens(t: dict) -> list[str]:
    how = "model processor" if t["method"] == "processor" else "estimate, characters/4"
    lines = [f"tokens per group ({t['groups']} groups, {how}):"]
    if t["note"]:
        lines.append(f"  note: {t['note']}")
    label = "prompt (incl. image):" if t["method"] == "processor" else "prompt (text only):  "
    lines.append(f"  {label}   {_pct(t['prompt'])}")
    if t["image"] is not None:
        lines.append(f"    of which image:       {_pct(t['image'])}")
    lines += [f"  response:               {_pct(t['response'])}",
              f"  prompt + one response:  {_pct(t['sequence'])}",
              f"  packed group:           {_pct(t['packed'])}"]
    if t["critique"]:
        lines.append(f"  critique:               {_pct(t['critique'])}")
    if t["critique_sequence"]:
        lines.append(f"  reward sequence:        {_pct(t['critique_sequence'])}  (critique prompt + response + "
                     "critique)")
    if t["train_tokens_unpacked"]:
        saved = 1 - t["train_tokens_packed"] / t["train_tokens_unpacked"]
        lines.append(f"  one pass over train:    {t['train_tokens_packed']} tokens packed vs "
                     f"{t['train_tokens_unpacked']} as separate rows ({saved:.0%} fewer)")
    return lines


def format_plan(plan: dict) -> str:
    """The plan as terminal text (stdout of `--dry-run`)."""
    m = plan["model"]
    lines = [f"recipe: {plan['recipe']}", f"run dir: {plan['run_dir']}",
             f"model: {m['path']} (family {m['family']}, 4-bit {'on' if m['load_in_4bit'] else 'off'}, "
             f"packing {m['packing']})", "",
             "stages: " + ", ".join(
                 s["stage"] + {"run": "", "done": " (done, skipped)", "changed": " (done with other settings)"}[
                     s["status"]] for s in plan["stages"]), ""]
    lines += _format_data(plan) + [""] + _format_tokens(plan["tokens"])
    if plan["steps"]:
        lines += ["", "optimizer steps:"]
        for stage, s in plan["steps"].items():
            budget = f"max_steps {s['max_steps']}" if s["max_steps"] > 0 else f"{s['epochs']:g} epoch(s)"
            lines.append(f"  {stage:<7} {s['steps']} steps ({budget}; {s['groups']} groups, "
                         f"{s['groups_per_step']} per micro-batch x {s['grad_accum']} accumulated = "
                         f"{s['groups_per_optimizer_step']} per step, {s['steps_per_epoch']} steps per epoch; "
                         f"warm-up {s['warmup_steps']}; max_length {s['max_length']})")
    if plan["too_long"]:
        lines += ["", f"too long ({len(plan['too_long'])}):"]
        lines += [f"  [{x['limit']}] {x['message']}" for x in plan["too_long"][:TOO_LONG_SHOWN]]
        if len(plan["too_long"]) > TOO_LONG_SHOWN:
            lines.append(f"  ... and {len(plan['too_long']) - TOO_LONG_SHOWN} more")
    for note in plan["notes"]:
        lines += ["", f"note: {note}"]
    if plan["errors"]:
        lines += [""] + [f"ERROR: {e}" for e in plan["errors"]]
    else:
        lines += ["", "plan OK"]
    return "\n".join(lines)
