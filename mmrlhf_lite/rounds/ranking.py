"""From a round's sampled answers to MM-DPO groups: distinct answers per prompt, ranked by the reward model.

Per prompt the K sampled answers are reduced to the distinct non-empty ones (outer whitespace ignored; each keeps
how often it was sampled). A prompt left with fewer than 2 is degenerate: nothing to compare. The reward model's
scores then rank the rest: a pair (better, worse) for every two answers whose scores differ by more than
`rounds.min_gap` (MM-DPO's pairs; the margin delta = r(better) - r(worse) gives each pair its beta), a tie
otherwise; a group whose answers are all tied is dropped. Both drops are counted.

    python -m pytest -q tests/test_rounds.py -k degenerate
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..data.groups import PreferenceGroup, Response


@dataclass
class Distinct:
    """A prompt's distinct non-empty answers and how many times each was sampled."""
    prompt: PreferenceGroup
    texts: list[str]
    counts: list[int]
    empty: int            # answers that were empty


def distinct_answers(prompts: Sequence[PreferenceGroup], answers: Sequence[Sequence[str]]) -> list[Distinct]:
    out = []
    for g, sampled in zip(prompts, answers):
        texts, counts, seen, empty = [], [], {}, 0
        for a in sampled:
            norm = a.strip()
            if not norm:
                empty += 1
            elif norm in seen:
                counts[seen[norm]] += 1
            else:
                seen[norm] = len(texts)
                texts.append(norm)
                counts.append(1)
        out.append(Distinct(g, texts, counts, empty))
    return out


def answer_group(d: Distinct) -> PreferenceGroup:
    """The prompt with its distinct answers as (unranked) responses: what the scorer and the reference pass read."""
    return dataclasses.replace(d.prompt, responses=[Response(t) for t in d.texts], explicit_pairs=None,
                               explicit_ties=None)


@dataclass
class Ranked:
    groups: list[PreferenceGroup]                    # MM-DPO groups: answers with scores, pairs and ties
    records: list[list[dict]]                        # their reward records (score, critiques), per answer
    dropped: dict[str, int] = field(default_factory=dict)   # degenerate / tied prompts


def answer_records(distinct: Sequence[Distinct], records: Sequence[list[dict] | None],
                   judge: Callable[[PreferenceGroup, str], bool | None]) -> list[list[dict] | None]:
    """`rounds.ranker: answer`: the records that rank each prompt's answers by what the data knows, not by the reward
    model. An answer's `score` is 1 when `judge(prompt, text)` says it is right and 0 when wrong (the reward model's
    score moves to `reward`; its critiques stay); None for a prompt where `judge` cannot tell for some answer (it is
    dropped as `unknown`) or that was not scored."""
    out: list[list[dict] | None] = []
    for d, recs in zip(distinct, records):
        verdicts = [judge(d.prompt, t) for t in d.texts]
        if recs is None or any(v is None for v in verdicts):
            out.append(None)
            continue
        out.append([{**rec, "score": 1.0 if v else 0.0, "reward": rec.get("score")} for rec, v in zip(recs, verdicts)])
    return out


def judged_prompts(prompts: Sequence[PreferenceGroup], judge: Callable[[PreferenceGroup, str], bool | None]) -> int:
    """How many of `prompts` the data can judge (`judge` knows their right answer): what `rounds.ranker: answer`
    can rank; the others are dropped as `unknown`."""
    return sum(judge(g, "") is not None for g in prompts)


def no_answer_error(what: str) -> str:
    """The message when none of `what` (e.g. "the round's 5 prompts") names its right answer."""
    return (f"rounds.ranker is `answer`, but none of {what} names its right answer (a row's `meta` needs `answer` with "
            "`choices`, e.g. {\"answer\": \"red\", \"choices\": [\"red\", \"green\"]}: docs/rounds.md); add them to "
            "the data or set rounds.ranker=reward")


def check_answer_ranker(prompts: Sequence[PreferenceGroup], judge: Callable[[PreferenceGroup, str], bool | None],
                        r: int) -> None:
    """`rounds.ranker: answer` needs prompts whose data names the right answer: refuse before sampling when none of
    the round's prompts does (nothing could be ranked). The dry run says the same (plan.rounds_plan)."""
    if prompts and not judged_prompts(prompts, judge):
        raise ValueError(f"round {r}: " + no_answer_error(f"the round's {len(prompts)} prompts"))


def rank_answers(distinct: Sequence[Distinct], records: Sequence[list[dict] | None], min_gap: float) -> Ranked:
    """`records[i]`: the ranking records of `distinct[i]`'s answers (None: the prompt cannot be ranked: not scored,
    or its right answer unknown to `rounds.ranker: answer`; dropped as `unknown`)."""
    groups, kept, dropped = [], [], {"degenerate": 0, "tied": 0, "unknown": 0}
    for d, recs in zip(distinct, records):
        if len(d.texts) < 2:
            dropped["degenerate"] += 1
            continue
        if recs is None:
            dropped["unknown"] += 1
            continue
        scores = [float(r["score"]) for r in recs]
        pairs, ties = [], []
        for i, j in itertools.combinations(range(len(scores)), 2):
            gap = scores[i] - scores[j]
            if abs(gap) <= min_gap:
                ties.append((i, j))
            else:
                pairs.append((i, j) if gap > 0 else (j, i))
        if not pairs:
            dropped["tied"] += 1
            continue
        responses = [Response(t, score=s, critique=" | ".join(r.get("critiques") or []) or None)
                     for t, s, r in zip(d.texts, scores, recs)]
        groups.append(dataclasses.replace(d.prompt, responses=responses, explicit_pairs=pairs, explicit_ties=ties))
        kept.append(list(recs))
    return Ranked(groups, kept, dropped)
