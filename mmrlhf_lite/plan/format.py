"""`format_plan`: the dry-run plan (a JSON-able dict, mmrlhf_lite/plan) rendered for the terminal.

    python -m mmrlhf_lite.train recipes/demo.yaml --dry-run
"""
from __future__ import annotations

TOO_LONG_SHOWN = 20


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
    how = {"processor": "model processor", "formula": "estimate: text characters/4, image tokens by formula",
           "chars/4": "estimate, characters/4"}[t["method"]]
    lines = [f"tokens per group ({t['groups']} groups, {how}):"]
    if t["note"]:
        lines.append(f"  note: {t['note']}")
    label = "prompt (text only):  " if t["method"] == "chars/4" else "prompt (incl. image):"
    lines.append(f"  {label}   {_pct(t['prompt'])}")
    if t["image"] is not None:
        lines.append(f"    of which image:       {_pct(t['image'])}")
        for split, st in (t.get("splits") or {}).items():
            if st["image"]:
                lines.append(f"      {split + ':':<20}{_pct(st['image'])}  (packed group {_pct(st['packed'])})")
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


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _format_micro(mb: dict | None, packed: bool) -> str:
    if not mb:
        return ""
    rows = f"{mb['rows']} {'group' if packed else 'row'}{'s' if mb['rows'] != 1 else ''} x {mb['row_tokens']} tokens"
    img = f", media of {mb['vision_samples']} x {mb['patches_per_sample']} patches" if mb["vision_samples"] else ""
    return f"{rows}, {mb['target_tokens']} target tokens{img}"


def _format_memory(m: dict) -> list[str]:
    if not m:
        return []
    if not m.get("available"):
        return ["", f"memory: {m.get('note', 'no estimate')}"] if m.get("note") else []
    a = m["architecture"]
    approx = "; token counts estimated" if m.get("approximate_tokens") else ""
    lines = ["", f"memory (estimate for one GPU, transformers backend; docs/memory.md{approx}):",
             f"  architecture: {_params(a['params'])} params, hidden {a['hidden']}, {a['layers']} layers, vocab "
             f"{a['vocab']}; LoRA {a['lora_params'] / 1e6:.1f}M params (config: {m['config']})",
             f"  {'stage':<10}{'allocated':>10}{'needed':>9}   longest micro-batch"]
    for stage, e in m["stages"].items():
        lines.append(f"  {stage:<10}{e['allocated_gib']:>6.1f} GiB{e['needed_gib']:>5.1f} GiB   "
                     f"{_format_micro(e.get('micro_batch'), m['packed']) or 'generation / scoring'}")
    if m.get("peak"):
        peak = m["stages"][m["peak"]["stage"]]
        lines.append(f"  peak: {m['peak']['stage']}, {m['peak']['needed_gib']} GiB needed = "
                     + " + ".join(f"{k} {v:.2f}" for k, v in peak["components_gib"].items() if v >= 0.005)
                     + " GiB + CUDA context and allocator slack")
    if m.get("budget"):
        b = m["budget"]
        verdict = "fits" if m.get("fits") else "does NOT fit"
        lines.append(f"  budget: {b['gib']} GiB ({b['source']}): {verdict}")
    else:
        lines.append("  budget: no GPU found and no --gpu-mem given; nothing checked")
    for prop in m.get("proposals", []):
        if prop["overrides"]:
            lines.append(f"  to fit: {' '.join(prop['overrides'])}  -> {prop['needed_gib']} GiB"
                         f"{'' if prop['fits'] else ' (still over)'}  ({prop['why']})")
        else:
            lines.append(f"  to fit: {prop['why']}")
    return lines


def format_plan(plan: dict) -> str:
    """The plan as terminal text (stdout of `--dry-run`)."""
    m = plan["model"]
    lines = [f"recipe: {plan['recipe']}", f"run dir: {plan['run_dir']}",
             f"model: {m['path']} (family {m['family']}, 4-bit {'on' if m['load_in_4bit'] else 'off'}, "
             f"packing {m['packing']})", "",
             "stages: " + ", ".join(
                 s["stage"] + {"run": "", "done": " (done, skipped)", "changed": " (done with other settings)",
                                 "stale": " (done, but an input stage was recomputed since: runs again)"}[
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
    if plan.get("rounds"):
        r = plan["rounds"]
        lines += ["", f"rounds: {r['n']} online round(s), {r['samples']} answers for each of {r['prompts']} prompts "
                      f"(rounds.prompts {r['which']}{', ' + str(r['max_prompts']) + ' a round' if r['max_prompts'] else ''})"
                      f", {r['steps']} MM-DPO steps each, reference: the {r['reference']} policy; held out: "
                      f"{r['held_out']} groups, {r['held_out_prompts']} prompts",
                  "  ranked by " + ("the reward model" if r.get("ranker", "reward") == "reward" else
                                    f"the data's own answer ({r.get('answer_known', 0)} of the prompts name it; the "
                                    "others are dropped as unknown)")]
    if plan["too_long"]:
        lines += ["", f"too long ({len(plan['too_long'])}):"]
        lines += [f"  [{x['limit']}] {x['message']}" for x in plan["too_long"][:TOO_LONG_SHOWN]]
        if len(plan["too_long"]) > TOO_LONG_SHOWN:
            lines.append(f"  ... and {len(plan['too_long']) - TOO_LONG_SHOWN} more")
    lines += _format_memory(plan.get("memory") or {})
    for note in plan["notes"]:
        lines += ["", f"note: {note}"]
    for warning in plan.get("warnings", []):
        lines += ["", f"WARNING: {warning}"]
    if plan["errors"]:
        lines += [""] + [f"ERROR: {e}" for e in plan["errors"]]
    else:
        n = len(plan.get("warnings", []))
        lines += ["", f"plan OK, {n} warning{'s' if n > 1 else ''}" if n else "plan OK"]
    return "\n".join(lines)
