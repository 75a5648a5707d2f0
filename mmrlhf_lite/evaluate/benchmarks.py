"""Reward-model benchmarks with their own metrics: pure functions of scored pairs, and their tables.

A benchmark pair is right when r(preferred) > r(other). An exact score tie is a pair without a verdict,
and each benchmark's own script treats that its own way; the headline `acc` follows it, and `acc_strict`
beside it counts every tie as wrong (our stricter count, over all pairs). Pairs the humans ranked equal are
not scored pairs: left out and counted (`rank_ties`).

- VL-RewardBench (its cal.py): a pair without a verdict is left out of both counts. Accuracy per source set
  and per domain, both from the row's id (`data.formats_bench.vl_dataset`: general = wildvision-battle,
  vlfeedback; hallucination = povid, rlaif-v, rlhf-v; reasoning = reasoning_tasks); overall accuracy = right
  / counted over all domains; macro average = mean of the three domain accuracies.
- Multimodal RewardBench (its 2_get_accuracy.py): a pair without a verdict gets a random one (`random`
  seeded 123 once, one draw per such pair in file order, answer 1 when the draw is < 0.5). Accuracy overall
  and per `Category`; `safety` splits into `safety/bias` (ID starting with `pairs`, case-insensitive) and
  `safety/toxicity`, and `reasoning` into `reasoning/math` (ID starting with `math`) and `reasoning/coding`.
- MM-RLHF-RewardBench: Acc and Acc+ overall and per category (`metrics.reward_bench`); a tie is wrong in
  both counts (its scoring script was not available to check).

docs/benchmarks-rm.md has the definitions and where each was checked.

    python -m mmrlhf_lite.evaluate bench runs/demo --bench vl-rewardbench --data vl_rewardbench.parquet
    python -m pytest -q tests/test_bench_rm.py
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from ..data.formats_bench import VL_DOMAIN_ORDER, vl_domain
from .metrics import ScoredGroup, merge_by_id, reward_bench

MM_TIE_SEED = 123  # Multimodal RewardBench's 2_get_accuracy.py: random.seed(123) before its first line


@dataclass(frozen=True)
class Outcome:
    """One scored pair: right by the strict count, a score tie, and right by the benchmark's own rule
    (None: the rule leaves the pair out)."""
    group: ScoredGroup
    strict: bool
    tie: bool
    official: bool | None


def outcomes(groups: list[ScoredGroup], ties: str) -> list[Outcome]:
    """Every ranked pair of `groups`, in order. `ties`: "leave_out" (VL-RewardBench), "coin" (Multimodal
    RewardBench: its seeded draws, one per tie in this order) or "wrong"."""
    coin = random.Random(MM_TIE_SEED)
    out = []
    for g in groups:
        for b, w in g.pairs:
            tie = g.scores[b] == g.scores[w]
            right = g.scores[b] > g.scores[w]
            if not tie or ties == "wrong":
                official = right
            elif ties == "leave_out":
                official = None
            else:  # the script's verdict "A" (answer 1) when the draw is < 0.5; right when that is the preferred
                official = (coin.random() < 0.5) == (b == 0)
            out.append(Outcome(g, right, tie, official))
    return out


def accuracy(pairs: list[Outcome]) -> dict:
    """acc = right / counted by the benchmark's rule; acc_strict = right / all pairs, a tie wrong."""
    counted = [o for o in pairs if o.official is not None]
    right = sum(o.official for o in counted)
    strict = sum(o.strict for o in pairs)
    return {"acc": right / len(counted) if counted else None, "right": right, "pairs": len(counted),
            "acc_strict": strict / len(pairs) if pairs else None, "right_strict": strict, "all_pairs": len(pairs),
            "score_ties": sum(o.tie for o in pairs)}


def _by(pairs: list[Outcome], key: Callable[[ScoredGroup], str]) -> dict[str, dict]:
    buckets: dict[str, list] = defaultdict(list)
    for o in pairs:
        buckets[key(o.group)].append(o)
    return {k: accuracy(v) for k, v in sorted(buckets.items())}


def _rank_ties(groups: list[ScoredGroup]) -> int:
    return sum(g.rank_ties for g in groups)


# ------------------------------------------------------------------------------------ VL-RewardBench

def vl_rewardbench_metrics(groups: list[ScoredGroup]) -> dict:
    """Overall accuracy, macro average over the domains, per domain and per source set (module doc); each
    group's category is its source set as `data.formats_bench.vl_dataset` names it from the row's id."""
    unknown = sorted({g.category for g in groups if vl_domain(g.category) is None})
    if unknown:
        raise ValueError(f"VL-RewardBench: unknown source set {', '.join(unknown)} (the sets are those cal.py "
                         "names from a row's id: vlfeedback, wildvision-battle, povid, rlaif-v, rlhf-v, "
                         "reasoning_tasks)")
    pairs = outcomes(groups, "leave_out")
    domains = _by(pairs, lambda g: vl_domain(g.category))
    measured = [d for d in VL_DOMAIN_ORDER if domains.get(d, {}).get("acc") is not None]
    macro = sum(domains[d]["acc"] for d in measured) / len(measured) if measured else None
    strict = [d for d in VL_DOMAIN_ORDER if domains.get(d, {}).get("acc_strict") is not None]
    macro_strict = sum(domains[d]["acc_strict"] for d in strict) / len(strict) if strict else None
    return {"overall": accuracy(pairs), "macro_acc": macro, "macro_domains": measured,
            "macro_acc_strict": macro_strict, "macro_domains_strict": strict,
            "domains": {d: domains[d] for d in VL_DOMAIN_ORDER if d in domains},
            "sources": _by(pairs, lambda g: g.category), "rank_ties": _rank_ties(groups)}


def vl_rewardbench_rows(m: dict) -> list[tuple[str, dict | None]]:
    rows: list = [(d.capitalize(), m["domains"].get(d)) for d in VL_DOMAIN_ORDER]
    partial = len(m["macro_domains"]) < len(VL_DOMAIN_ORDER)
    macro = "Macro Average Accuracy" + (f" (over {', '.join(m['macro_domains']) or 'no domain'} only)" if partial else "")
    rows += [("Overall Accuracy", m["overall"]),
             (macro, {"acc": m["macro_acc"], "acc_strict": m.get("macro_acc_strict"), "unit": ""})]
    rows += [(f"source set: {s}", r) for s, r in m["sources"].items()]
    return rows


def vl_rewardbench_leaderboard(m: dict, strict: bool = False) -> tuple[list[str], list[str]]:
    """The paper's columns (General, Hallucination, Reasoning, Overall Accuracy, Macro Average), in %."""
    acc = "acc_strict" if strict else "acc"
    cols = ["General", "Hallucination", "Reasoning", "Overall Accuracy", "Macro Average Accuracy"]
    vals = [m["domains"].get(d, {}).get(acc) for d in VL_DOMAIN_ORDER] + [m["overall"][acc],
                                                                         m.get(f"macro_{acc}")]
    return cols, [_pct(v) for v in vals]


# ----------------------------------------------------------------------------- Multimodal RewardBench

MM_CATEGORY_NAMES = {"open_generation/correctness_task": "General Correctness",
                     "open_generation/preference_task": "General Preference", "knowledge": "Knowledge",
                     "reasoning": "Reasoning", "safety": "Safety", "vqa": "VQA"}


def mm_rewardbench_split(pair_id: str, category: str) -> str:
    """The official script's (sub)category of a row: safety and reasoning split by ID prefix."""
    pid = pair_id.lower()
    if category == "safety":
        return "safety/bias" if pid.startswith("pairs") else "safety/toxicity"
    if category == "reasoning":
        return "reasoning/math" if pid.startswith("math") else "reasoning/coding"
    return category


def mm_rewardbench_metrics(groups: list[ScoredGroup]) -> dict:
    """Accuracy overall, per Category, and per the official (sub)category split (module doc); `groups` in
    the file's order, which decides the seeded verdicts of ties."""
    pairs = outcomes(groups, "coin")
    return {"overall": accuracy(pairs), "categories": _by(pairs, lambda g: g.category),
            "splits": _by(pairs, lambda g: mm_rewardbench_split(g.id, g.category)),
            "rank_ties": _rank_ties(groups)}


def _mm_order(name: str) -> tuple:
    known = list(MM_CATEGORY_NAMES)
    top = name.split("/")[0] if name.split("/")[0] in ("safety", "reasoning") else name
    return (known.index(top) if top in known else len(known), name)


def mm_rewardbench_rows(m: dict) -> list[tuple[str, dict | None]]:
    rows: list = [("Overall", m["overall"])]
    rows += [(MM_CATEGORY_NAMES.get(c, c), m["categories"][c]) for c in sorted(m["categories"], key=_mm_order)]
    rows += [(f"split: {s}", m["splits"][s]) for s in sorted(m["splits"], key=_mm_order)
             if s.startswith(("safety/", "reasoning/"))]
    return rows


def mm_rewardbench_leaderboard(m: dict, strict: bool = False) -> tuple[list[str], list[str]]:
    """The repository leaderboard's columns (Overall, the six categories), as fractions with 3 decimals."""
    acc = "acc_strict" if strict else "acc"
    cols = ["Overall"] + list(MM_CATEGORY_NAMES.values())
    vals = [m["overall"][acc]] + [m["categories"].get(c, {}).get(acc) for c in MM_CATEGORY_NAMES]
    return cols, ["-" if v is None else f"{v:.3f}" for v in vals]


# ------------------------------------------------------------------------------- MM-RLHF-RewardBench

def mmrlhf_rewardbench_metrics(groups: list[ScoredGroup]) -> dict:
    """Acc / Acc+ per category; pairs sharing an id form one Acc+ group."""
    out = reward_bench(merge_by_id(groups))
    out["rank_ties"] = _rank_ties(groups)
    return out


def mmrlhf_rewardbench_rows(m: dict) -> list[tuple[str, dict | None]]:
    rows: list = [("Acc", _acc_row(m["overall"])), ("Acc+", _plus_row(m["overall"]))]
    for c, r in m["by_category"].items():
        rows += [(f"{c} Acc", _acc_row(r)), (f"{c} Acc+", _plus_row(r))]
    return rows


def _acc_row(r: dict) -> dict:  # one rule (a tie is wrong): the strict count is the count
    right = None if r["acc"] is None else round(r["acc"] * r["pairs"])
    return {"acc": r["acc"], "right": right, "pairs": r["pairs"], "acc_strict": r["acc"], "right_strict": right,
            "all_pairs": r["pairs"], "score_ties": r["score_ties"]}


def _plus_row(r: dict) -> dict:
    right = None if r["acc_plus"] is None else round(r["acc_plus"] * r["groups"])
    return {"acc": r["acc_plus"], "right": right, "pairs": r["groups"], "acc_strict": r["acc_plus"],
            "right_strict": right, "all_pairs": r["groups"], "score_ties": None, "unit": "ids"}


def mmrlhf_rewardbench_leaderboard(m: dict, strict: bool = False) -> tuple[list[str], list[str]]:
    cols, vals = ["Acc", "Acc+"], [m["overall"]["acc"], m["overall"]["acc_plus"]]
    for c, r in m["by_category"].items():
        cols += [f"{c} Acc", f"{c} Acc+"]
        vals += [r["acc"], r["acc_plus"]]
    return cols, [_pct(v) for v in vals]


# ----------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Benchmark:
    key: str                                     # the --bench value
    title: str
    fmt: str                                     # the data format its files are read as
    metrics: Callable[[list[ScoredGroup]], dict]
    rows: Callable[[dict], list]
    leaderboard: Callable[..., tuple[list[str], list[str]]]   # (metrics, strict=False) -> (columns, values)
    reference: str
    ties: str                                    # how its own script counts a pair without a verdict (a tie)


BENCHMARKS = {
    "vl-rewardbench": Benchmark(
        "vl-rewardbench", "VL-RewardBench", "vl_rewardbench", vl_rewardbench_metrics, vl_rewardbench_rows,
        vl_rewardbench_leaderboard, "arXiv 2411.17451",
        "as VL-RewardBench's cal.py counts: a pair without a verdict (a score tie) is left out of both counts"),
    "mm-rewardbench": Benchmark(
        "mm-rewardbench", "Multimodal RewardBench", "mm_rewardbench", mm_rewardbench_metrics, mm_rewardbench_rows,
        mm_rewardbench_leaderboard, "arXiv 2502.14191",
        f"as Multimodal RewardBench's 2_get_accuracy.py counts: a pair without a verdict (a score tie) gets a "
        f"random one (Python's `random` seeded {MM_TIE_SEED}, one draw per tie in file order)"),
    "mmrlhf-rewardbench": Benchmark(
        "mmrlhf-rewardbench", "MM-RLHF-RewardBench", "mmrlhf_bench", mmrlhf_rewardbench_metrics,
        mmrlhf_rewardbench_rows, mmrlhf_rewardbench_leaderboard, "arXiv 2502.10391", "a score tie is wrong"),
}


# ------------------------------------------------------------------------------------------ tables

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _percent(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


ROW_FIELDS = ("acc", "right", "pairs", "acc_strict", "right_strict", "all_pairs", "score_ties")


def table_rows(bench: Benchmark, m: dict) -> list[dict]:
    """The benchmark's metric table as plain records (what report.json keeps and the UI shows): `acc` = `right`
    / `pairs` counted by the benchmark's own rule, `acc_strict` = `right_strict` / `all_pairs` with every score
    tie wrong."""
    out = []
    for label, r in bench.rows(m):
        r = r or {}
        out.append({"metric": label, **{k: r.get(k) for k in ROW_FIELDS}, "unit": r.get("unit", "pairs")})
    return out


def leaderboard_line(bench: Benchmark, m: dict, label: str) -> str:
    """A markdown header + row to paste beside published numbers (the benchmark's own count), and a second
    row with score ties counted wrong when that differs."""
    cols, vals = bench.leaderboard(m)
    lines = [f"| Model | {' | '.join(cols)} |", "|---|" + "---|" * len(cols), f"| {label} | {' | '.join(vals)} |"]
    _, strict = bench.leaderboard(m, strict=True)
    if strict != vals:
        lines.append(f"| {label}, score ties counted wrong | {' | '.join(strict)} |")
    return "\n".join(lines)


def bench_result(bench: str, groups: list[ScoredGroup], label: str) -> dict:
    """One critique mode's entry of report.json: the metrics, their table and the leaderboard line."""
    spec = BENCHMARKS[bench]
    metrics = spec.metrics(groups)
    return {"metrics": metrics, "table": table_rows(spec, metrics), "leaderboard": leaderboard_line(spec, metrics, label)}


def _packing(packed: bool | None) -> str:
    if packed is None:
        return "every score read from the score store (scores.jsonl), computed by an earlier run of the command"
    return ("each pair scored packed (both answers in one row)" if packed else
            "each answer scored in its own row (this family or attention kernel takes no packed mask)")


def markdown(report: dict) -> str:
    """report.md of a `bench` run (report.json's content)."""
    bench = BENCHMARKS[report["benchmark"]]
    lines = [f"# {bench.title}: {report['run']}", ""]
    if report.get("smoke"):
        lines += [f"**Smoke run**: `{report['model']}` is a tiny random-init test model; these numbers only show "
                  "that the benchmark reads and scores end to end, and say nothing about a real reward model.", ""]
    lines += [f"Data: `{report['data']}` ({report['format']}), {report['groups']} rows, {report['pairs']} scored "
              f"pairs; {report['rank_ties']} pair(s) the humans ranked equal were left out. Reward model: "
              f"`{report['model']}` + the run's adapter (`{report['adapter']}`); {_packing(report.get('packed'))}.",
              ""]
    if report.get("skipped_rows"):
        lines += [f"Rows left out (`--on-error skip`): " + ", ".join(f"{n} {why}" for why, n in report["skipped_rows"].items())
                  + ".", ""]
    if report.get("warnings"):
        n = report.get("warning_count", len(report["warnings"]))
        lines += [f"{n} warning(s) while reading (report.json lists up to 20):", ""]
        lines += [f"- {w}" for w in report["warnings"][:5]] + [""]
    for mode, res in report["results"].items():
        lines += [f"## Critique mode `{mode}` ({res['seconds']} s)", "",
                  "| metric | accuracy | right / counted | score ties counted wrong | score ties |",
                  "|---|---|---|---|---|"]
        for r in res["table"]:
            n = "" if r["pairs"] is None else f"{r['right'] or 0} / {r['pairs']} {r['unit']}"
            strict = _percent(r.get("acc_strict")) + ("" if r.get("all_pairs") is None else
                                                      f" ({r['right_strict'] or 0} / {r['all_pairs']})")
            ties = "" if r["score_ties"] is None else r["score_ties"]
            lines.append(f"| {r['metric']} | {_percent(r['acc'])} | {n} | {strict} | {ties} |")
        lines += ["", f"Accuracy: {bench.ties}. Score ties counted wrong: our stricter count, over every pair. "
                  "Leaderboard line:", "", res["leaderboard"], ""]
    for mode, why in report.get("skipped_modes", {}).items():
        lines.append(f"- critique mode `{mode}` skipped: {why}")
    return "\n".join(lines).rstrip() + "\n"
