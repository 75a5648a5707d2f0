"""Pure evaluation metrics (REFERENCE.md, "Reward-model metrics").

Acc  = share of ranked pairs with r(better) > r(worse); an exact score tie counts as wrong.
Acc+ = share of ids (groups) whose ranked pairs are all right.
Pairs of equal human rank are not ranked pairs: they are excluded from both and counted as `rank_ties`.
Both overall and per category.

    python -m pytest tests/test_eval_metrics.py -q
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class ScoredGroup:
    id: str
    category: str
    pairs: list[tuple[int, int]]      # (better, worse) ranked pairs
    scores: list[float]               # one per response
    rank_ties: int = 0


def _acc(groups: list[ScoredGroup]) -> dict:
    right = total = all_right = n_groups = score_ties = 0
    for g in groups:
        if not g.pairs:
            continue
        ok = [g.scores[b] > g.scores[w] for b, w in g.pairs]
        score_ties += sum(g.scores[b] == g.scores[w] for b, w in g.pairs)
        right += sum(ok)
        total += len(ok)
        all_right += all(ok)
        n_groups += 1
    return {"acc": right / total if total else None, "acc_plus": all_right / n_groups if n_groups else None,
            "pairs": total, "groups": n_groups, "score_ties": score_ties,
            "rank_ties": sum(g.rank_ties for g in groups)}


def reward_bench(groups: list[ScoredGroup]) -> dict:
    """{"overall": {...}, "by_category": {category: {...}}}"""
    by_cat: dict[str, list[ScoredGroup]] = defaultdict(list)
    for g in groups:
        by_cat[g.category].append(g)
    return {"overall": _acc(groups), "by_category": {c: _acc(gs) for c, gs in sorted(by_cat.items())}}


def merge_by_id(groups: list[ScoredGroup]) -> list[ScoredGroup]:
    """Bench files with several rows per id: Acc+ is per id, so groups sharing an id are merged."""
    merged: dict[str, ScoredGroup] = {}
    for g in groups:
        m = merged.get(g.id)
        if m is None:
            merged[g.id] = ScoredGroup(g.id, g.category, list(g.pairs), list(g.scores), g.rank_ties)
        else:
            off = len(m.scores)
            m.scores.extend(g.scores)
            m.pairs.extend((b + off, w + off) for b, w in g.pairs)
            m.rank_ties += g.rank_ties
    return list(merged.values())


_WORD = re.compile(r"[^\W\d_]+|\d+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def known_words(references: list[str]) -> set[str]:
    """The words of `references` (what `well_formed` compares an answer with), computed once for many answers."""
    return {w for r in references for w in words(r)}


def well_formed(answer: str, references: list[str], min_known: float = 0.8, known: set[str] | None = None) -> bool:
    """A policy answer is well-formed when it is non-empty, decodes cleanly (no U+FFFD) and at least
    `min_known` of its words occur among the words of the group's own responses (`known`: those words,
    precomputed by `known_words`): it speaks the language and format of the data (the untrained tiny model
    writes e.g. "answer gray\ufffdtriangle**in*etaile")."""
    if not answer.strip() or "\ufffd" in answer:
        return False
    ws = words(answer)
    if not ws:
        return False
    known = known if known is not None else known_words(references)
    return sum(w in known for w in ws) >= min_known * len(ws)


def win_rate(after: list[float], before: list[float]) -> dict:
    """Share of prompts where the after-training answer scores higher (exact ties count half)."""
    if not after:
        return {"win_rate": None, "n": 0}
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(after, before))
    return {"win_rate": wins / len(after), "n": len(after),
            "mean_score_after": sum(after) / len(after), "mean_score_before": sum(before) / len(before)}


def implicit_accuracy(policy: list[list[float]], reference: list[list[float]], pairs: list[list[tuple[int, int]]]
                      ) -> dict:
    """DPO implicit reward accuracy: share of ranked pairs with
    (log pi - log ref)(better) > (log pi - log ref)(worse), and the mean log-ratio margin."""
    right = total = 0
    margin = 0.0
    for p, r, ps in zip(policy, reference, pairs):
        ratio = [a - b for a, b in zip(p, r)]
        for b, w in ps:
            right += ratio[b] > ratio[w]
            margin += ratio[b] - ratio[w]
            total += 1
    return {"implicit_accuracy": right / total if total else None,
            "mean_logratio_margin": margin / total if total else None, "pairs": total}
