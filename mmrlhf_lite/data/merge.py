"""Pair rows -> preference groups, recovering the ranking when the pairs allow it.

Rows join a group by `id`, or, without one, by prompt + media (RLAIF-V, TRL). Responses are matched
by text with outer whitespace ignored (MM-RLHF has rejected answers with a leading space that appear
without it in another pair); the first spelling is kept verbatim.

Ranks are recovered only when the pairs are *exactly* every pair of some ranking: each two responses
compared once, preferences forming no cycle, ties (`is_tie`) only between equal ranks. Then the
responses get ranks 1..R and are ordered best first. Otherwise the pairs are kept as given
(`explicit_pairs` / `explicit_ties`): a partial set (the RewardBench gives 1-6 of the possible pairs
per id) stays partial, since completing it would invent comparisons; a contradictory set (a cycle, a
pair given both ways, a tie that is also a preference) is kept too, with a warning.

    python -m pytest -q tests/test_data_merge.py
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError
from .groups import PreferenceGroup, Response
from .rows import PairRow


def media_key(images: list, video: list | None) -> list:
    def one(m):
        return m if isinstance(m, str) else "sha1:" + hashlib.sha1(m).hexdigest()
    return [[one(m) for m in images], None if video is None else [one(m) for m in video]]


def content_key(row: PairRow) -> str:
    return json.dumps([row.prompt, media_key(row.images, row.video)], sort_keys=True, ensure_ascii=False)


@dataclass
class _Pending:
    """A group being assembled from pair rows."""
    id: str
    first: PairRow
    texts: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    critiques: list[str | None] = field(default_factory=list)
    prefs: dict[tuple[int, int], str] = field(default_factory=dict)   # (better, worse) -> source
    ties: dict[tuple[int, int], str] = field(default_factory=dict)    # (low, high) -> source
    critique_conflicts: list[str] = field(default_factory=list)

    def node(self, text: str, critique: str | None, source: str) -> int:
        key = text.strip()
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.texts)
            self.texts.append(text)
            self.critiques.append(critique)
        elif critique is not None:
            if self.critiques[i] is None:
                self.critiques[i] = critique
            elif self.critiques[i] != critique:
                self.critique_conflicts.append(source)
        return i


class GroupBuilder:
    """Collects whole groups and pair rows in reading order; `finish()` returns the groups."""

    def __init__(self) -> None:
        self._order: list[PreferenceGroup | _Pending] = []
        self._by_id: dict[str, PreferenceGroup | _Pending] = {}
        self._by_content: dict[str, _Pending] = {}

    def __len__(self) -> int:
        return len(self._order)

    def add_group(self, group: PreferenceGroup) -> None:
        prev = self._by_id.get(group.id)
        if prev is not None:
            raise DataError(group.source, f"duplicate id '{group.id}' (first at {_source(prev)})",
                            reason="duplicate_id", key="id")
        self._by_id[group.id] = group
        self._order.append(group)

    def add_pair(self, row: PairRow) -> None:
        pending = self._find(row)
        ci, ri = pending.index.get(row.chosen.strip()), pending.index.get(row.rejected.strip())
        if ci is not None and ri is not None:
            pair, book = ((min(ci, ri), max(ci, ri)), pending.ties) if row.tie else ((ci, ri), pending.prefs)
            if pair in book:
                raise DataError(row.source, f"duplicate pair in group '{pending.id}': the same chosen and rejected "
                                f"as {book[pair]}", reason="duplicate_pair")
        ci = pending.node(row.chosen, row.chosen_critique, row.source)
        ri = pending.node(row.rejected, row.rejected_critique, row.source)
        if row.tie:
            pending.ties[(min(ci, ri), max(ci, ri))] = row.source
        else:
            pending.prefs[(ci, ri)] = row.source

    def _find(self, row: PairRow) -> _Pending:
        if row.group_id is not None:
            prev = self._by_id.get(row.group_id)
            if prev is None:
                return self._new(row.group_id, row)
            if isinstance(prev, PreferenceGroup):
                raise DataError(row.source, f"duplicate id '{row.group_id}' (first at {prev.source})",
                                reason="duplicate_id", key="id")
            what = _difference(prev.first, row)
            if what:
                raise DataError(row.source, f"id '{row.group_id}' was first used at {prev.first.source} with a "
                                f"different {what}", reason="duplicate_id", key="id")
            return prev
        key = content_key(row)
        prev = self._by_content.get(key)
        if prev is None:
            gid = row.fallback_id or "h" + hashlib.sha1(key.encode()).hexdigest()[:12]
            clash = self._by_id.get(gid)
            if clash is not None:
                raise DataError(row.source, f"duplicate id '{gid}' for a different prompt (first at {_source(clash)})",
                                reason="duplicate_id", key="id")
            prev = self._by_content[key] = self._new(gid, row)
        return prev

    def _new(self, gid: str, row: PairRow) -> _Pending:
        # parsers share prompt / media lists between rows (memoised); each group gets its own copy
        row.prompt = [{"role": t["role"], "content": [dict(p) for p in t["content"]]} for t in row.prompt]
        row.images = list(row.images)
        row.video = None if row.video is None else list(row.video)
        pending = _Pending(gid, row)
        self._by_id[gid] = pending
        self._order.append(pending)
        return pending

    def finish(self) -> tuple[list[PreferenceGroup], list[tuple[str, str]]]:
        """(groups, warnings as (kind, message))."""
        groups, warnings = [], []
        for item in self._order:
            if isinstance(item, PreferenceGroup):
                groups.append(item)
                continue
            group, problem = build_group(item)
            groups.append(group)
            if problem:
                warnings.append(("contradiction", f"{item.first.source}: group '{item.id}': {problem}; the pairs are "
                                                  "kept as given"))
            if item.critique_conflicts:
                warnings.append(("critique", f"{item.first.source}: group '{item.id}': a response has different "
                                             f"critiques in different rows ({', '.join(item.critique_conflicts[:3])}); "
                                             "the first is kept"))
        return groups, warnings


def _source(item: PreferenceGroup | _Pending) -> str:
    return item.source if isinstance(item, PreferenceGroup) else item.first.source


def _difference(a: PairRow, b: PairRow) -> str:
    if a.prompt != b.prompt:
        return "prompt"
    if a.images != b.images:
        return "images"
    return "" if a.video == b.video else "video"


def build_group(p: _Pending) -> tuple[PreferenceGroup, str | None]:
    ranks, problem = recover_ranks(len(p.texts), set(p.prefs), set(p.ties), names=p.texts)
    first = p.first
    common: dict[str, Any] = dict(id=p.id, prompt=first.prompt, images=first.images, video=first.video,
                                  category=first.category, source=first.source, meta=dict(first.meta))
    if ranks is None:
        responses = [Response(t, critique=c) for t, c in zip(p.texts, p.critiques)]
        return PreferenceGroup(responses=responses, explicit_pairs=list(p.prefs), explicit_ties=list(p.ties),
                               **common), problem
    order = sorted(range(len(p.texts)), key=lambda i: (ranks[i], i))
    responses = [Response(p.texts[i], rank=ranks[i], critique=p.critiques[i]) for i in order]
    return PreferenceGroup(responses=responses, **common), None


def recover_ranks(n: int, prefs: set[tuple[int, int]], ties: set[tuple[int, int]], names: list[str] | None = None
                  ) -> tuple[list[int] | None, str | None]:
    """Ranks (1 = best) when the pairs are exactly every pair of one ranking, else (None, contradiction or None).

    Ties merge responses into classes; preferences must order the classes without a cycle; then each
    class's rank is 1 + the longest chain of classes above it, and the ranking's full pair set must be
    the given one (so nothing is invented). `names` (the response texts) only serve the message.
    """
    def name(i: int) -> str:
        if names is None:
            return f"#{i}"
        t = names[i].strip()
        return repr(t if len(t) <= 40 else t[:37] + "...")

    if not ties and len(prefs) == n * (n - 1) // 2:
        ranks = _tournament_ranks(n, prefs)
        if ranks is not None:
            return ranks, None
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in ties:
        parent[find(a)] = find(b)
    above: dict[int, set[int]] = {find(i): set() for i in range(n)}
    for b, w in prefs:
        cb, cw = find(b), find(w)
        if cb == cw:
            return None, (f"responses {name(b)} and {name(w)} are tied (directly or through other ties) but one is "
                          "also preferred to the other")
        above[cw].add(cb)
    rank: dict[int, int] = {}
    visiting: set[int] = set()

    def depth(c: int) -> int:  # longest chain above c; a class met again while visiting closes a cycle
        if c in rank:
            return rank[c]
        if c in visiting:
            raise _Cycle()
        visiting.add(c)
        r = 1 + max((depth(a) for a in above[c]), default=0)
        visiting.discard(c)
        rank[c] = r
        return r

    try:
        for c in above:
            depth(c)
    except _Cycle:
        both = next(((b, w) for b, w in prefs if (w, b) in prefs), None)
        if both:
            return None, f"the pair {name(both[0])} vs {name(both[1])} is given both ways"
        return None, "the preferences form a cycle (A > B > ... > A)"
    ranks = [rank[find(i)] for i in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        if ranks[i] == ranks[j]:
            if (i, j) not in ties:
                return None, None
        elif (ranks[i] < ranks[j] and (i, j) not in prefs) or (ranks[i] > ranks[j] and (j, i) not in prefs):
            return None, None
    return ranks, None


def _tournament_ranks(n: int, prefs: set[tuple[int, int]]) -> list[int] | None:
    """Fast path: every pair compared once, no ties. Transitive iff the win counts are n-1, ..., 0 and
    every preference agrees with them; then rank = n - wins. (None: let the general path explain.)"""
    wins = [0] * n
    for b, _ in prefs:
        wins[b] += 1
    if sorted(wins) != list(range(n)) or any(wins[b] <= wins[w] for b, w in prefs):
        return None
    return [n - w for w in wins]


class _Cycle(Exception):
    pass
