"""Markdown rendering of an evaluation report (eval/report.json -> eval/report.md)."""
from __future__ import annotations


def _f(x, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


PART_LABELS = {"head": "head alone", "response_logp": "log-prob term alone"}


def bench_table(title: str, results: dict) -> list[str]:
    """results: {mode: reward_bench output}. A hybrid score (`response_logp_weight` > 0, with `parts`) gets a
    row per part under each mode's row: what the head alone and the log-prob term alone would rank."""
    if not results:
        return []
    cats = sorted({c for r in results.values() for c in r["by_category"]})
    lines = [f"### {title}", ""]
    weight = next((r["response_logp_weight"] for r in results.values() if r.get("response_logp_weight")), None)
    if weight:
        lines += [f"Hybrid score: head on the critique + {weight:g} x the answer's mean log-prob "
                  "(`reward.response_logp_weight`); each part's accuracy on its own below its mode's.", ""]
    lines += ["| mode | Acc | Acc+ | pairs | " + " | ".join(f"{c} Acc" for c in cats) + " |",
              "|---|---|---|---|" + "---|" * len(cats)]

    def row(label: str, r: dict) -> str:
        o = r["overall"]
        per = " | ".join(_f(r["by_category"].get(c, {}).get("acc")) for c in cats)
        return f"| {label} | {_f(o['acc'])} | {_f(o['acc_plus'])} | {o['pairs']} | {per} |"

    for mode, r in results.items():
        lines.append(row(f"{mode}: hybrid sum" if r.get("parts") else mode, r))
        for part, pr in (r.get("parts") or {}).items():
            lines.append(row(f"{mode}: {PART_LABELS.get(part, part)}", pr))
    lines.append("")
    return lines


def format_report(report: dict) -> str:
    lines = ["# Evaluation report", "",
             f"Held-out groups: {report['groups']}, ranked pairs: {report['pairs']}. "
             f"Wall time: {report.get('seconds')} s.", ""]
    rm = report.get("reward_model") or {}
    lines += bench_table("Reward model after training", rm.get("modes", {}))
    lines += bench_table("Reward model before training (zero LoRA, untrained head)", rm.get("before", {}))
    corr = {m: (r.get("delta_rank") or {}).get("spearman") for m, r in rm.get("modes", {}).items()}
    if any(v is not None for v in corr.values()):
        lines.append("Spearman correlation of the reward delta with the human rank gap (held-out pairs): "
                     + ", ".join(f"{m} {v:.3f}" if v is not None else f"{m} -" for m, v in corr.items()) + ".")
        lines.append("")
    mg = report.get("margins")
    if mg and mg.get("beta", {}).get("n"):
        b = mg["beta"]
        sp = mg.get("eval_delta_rank_spearman")
        lines += [f"Margins used by MM-DPO (stage score, mode {mg.get('mode')}): held-out Spearman(delta, rank gap) "
                  f"{'-' if sp is None else f'{sp:.3f}'}; beta_i over {b['n']} training pairs: min {b['min']:.4f}, "
                  f"p10 {b['p10']:.4f}, median {b['median']:.4f}, p90 {b['p90']:.4f}, max {b['max']:.4f} "
                  "(histogram: score/beta_hist.png).", ""]
    for label, section in (("after", rm.get("modes", {})), ("before", rm.get("before", {}))):
        fact = (section.get("generate") or {}).get("critique_fact_rate")
        if fact:
            lines.append(f"Generated critiques naming the right answer value ({label} training): "
                         f"{_f(fact['rate'])} of {fact['n']}.")
    lines.append("")
    pol = report.get("policy")
    if pol:
        lines += ["### Policy (MM-DPO)", "",
                  f"- implicit reward accuracy on held-out pairs: {_f(pol['implicit_accuracy'])} "
                  f"({pol['pairs']} pairs; mean log-ratio margin {_f(pol['mean_logratio_margin'], False)})",
                  f"- plain log-prob ranking accuracy of the policy: {_f(pol.get('logp_accuracy'))}"]
        ra = pol.get("right_answers")
        if ra:
            lines.append(f"- right answers of the policy's own generations (the data knows the right answer): "
                         f"{_f(ra['before'])} before -> {_f(ra['after'])} after DPO ({ra['n']} answers)")
        wf = pol.get("well_formed")
        if wf:
            lines.append(f"- well-formed answers: {_f(wf['before'])} before -> {_f(wf['after'])} after DPO")
        rr = pol.get("reward_rank")
        if rr:
            lines.append(f"- reward-model rank of the policy's answer among the group's {rr['k']} responses "
                         f"(1 = above all; {rr['critique_mode']} critiques): {rr['before']:.2f} before -> "
                         f"{rr['after']:.2f} after DPO; ranked first {_f(rr['top_before'])} -> {_f(rr['top_after'])}")
        wr = pol.get("win_rate")
        if wr and wr.get("win_rate") is not None:
            lines.append(f"- reward-model win rate of answers after vs before DPO: {_f(wr['win_rate'])} "
                         f"over {wr['n']} answers (mean score {wr['mean_score_after']:.3f} vs "
                         f"{wr['mean_score_before']:.3f})")
        elif wr and wr.get("withheld"):
            lines.append(f"- win rate after vs before DPO: not reported: {wr['withheld']}")
        d = report.get("dpo", {})
        lines.append(f"- settings: beta={d.get('beta')} w={d.get('w')} k={d.get('k')} pairs={d.get('pairs')} "
                     f"loss={d.get('loss_type')} gamma={d.get('gamma')} sft_target={d.get('sft_target')}")
        lines.append("")
    return "\n".join(lines)
