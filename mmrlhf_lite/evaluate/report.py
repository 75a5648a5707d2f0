"""Markdown rendering of an evaluation report (eval/report.json -> eval/report.md)."""
from __future__ import annotations


def _f(x, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def bench_table(title: str, results: dict) -> list[str]:
    """results: {mode: reward_bench output}"""
    if not results:
        return []
    cats = sorted({c for r in results.values() for c in r["by_category"]})
    lines = [f"### {title}", "", "| mode | Acc | Acc+ | pairs | " + " | ".join(f"{c} Acc" for c in cats) + " |",
             "|---|---|---|---|" + "---|" * len(cats)]
    for mode, r in results.items():
        o = r["overall"]
        per = " | ".join(_f(r["by_category"].get(c, {}).get("acc")) for c in cats)
        lines.append(f"| {mode} | {_f(o['acc'])} | {_f(o['acc_plus'])} | {o['pairs']} | {per} |")
    lines.append("")
    return lines


def format_report(report: dict) -> str:
    lines = ["# Evaluation report", "",
             f"Held-out groups: {report['groups']}, ranked pairs: {report['pairs']}. "
             f"Wall time: {report.get('seconds')} s.", ""]
    rm = report.get("reward_model") or {}
    lines += bench_table("Reward model after training", rm.get("modes", {}))
    lines += bench_table("Reward model before training (zero LoRA, untrained head)", rm.get("before", {}))
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
        wr = pol.get("win_rate")
        if wr and wr.get("win_rate") is not None:
            lines.append(f"- reward-model win rate of answers after vs before DPO: {_f(wr['win_rate'])} "
                         f"over {wr['n']} prompts (mean score {wr['mean_score_after']:.3f} vs "
                         f"{wr['mean_score_before']:.3f})")
        d = report.get("dpo", {})
        lines.append(f"- settings: beta={d.get('beta')} w={d.get('w')} k={d.get('k')} pairs={d.get('pairs')} "
                     f"loss={d.get('loss_type')}")
        lines.append("")
    return "\n".join(lines)
