"""Pairs -> groups: rank recovery (only from a complete, consistent pair set), contradictions kept with a warning.

    python -m pytest -q tests/test_data_merge.py
"""
from __future__ import annotations

import itertools
import json

from mmrlhf_lite.data.merge import recover_ranks
from mmrlhf_lite.data.readers import load_groups
from mmrlhf_lite.events import EventLog, read_events


def full(ranks: list[int]) -> tuple[set, set]:
    prefs, ties = set(), set()
    for i, j in itertools.combinations(range(len(ranks)), 2):
        if ranks[i] == ranks[j]:
            ties.add((i, j))
        else:
            prefs.add((i, j) if ranks[i] < ranks[j] else (j, i))
    return prefs, ties


def test_complete_pair_sets_give_back_their_ranking():
    for ranks in ([1, 2, 3, 4], [3, 1, 4, 2], [1, 2, 2, 3], [2, 1, 2, 2], [1, 1], [1, 2, 3, 3, 3]):
        prefs, ties = full(ranks)
        assert recover_ranks(len(ranks), prefs, ties) == (ranks, None)


def test_partial_pair_sets_are_kept_as_given_without_warning():
    assert recover_ranks(3, {(0, 1), (1, 2)}, set()) == (None, None)          # 0 vs 2 not compared
    assert recover_ranks(3, {(0, 1), (0, 2)}, set()) == (None, None)          # would invent the tie 1 = 2
    prefs, _ = full([1, 2, 2, 3])
    assert recover_ranks(4, prefs, set()) == (None, None)                     # the tie row is missing


def test_contradictions_are_named():
    assert recover_ranks(2, {(0, 1), (1, 0)}, set(), names=["yes", "no"]) == (
        None, "the pair 'yes' vs 'no' is given both ways")
    assert recover_ranks(3, {(0, 1), (1, 2), (2, 0)}, set()) == (None, "the preferences form a cycle (A > B > ... > A)")
    assert recover_ranks(3, {(0, 2)}, {(0, 1), (1, 2)}, names=["a", "b", "c"]) == (
        None, "responses 'a' and 'c' are tied (directly or through other ties) but one is also preferred to the other")


def _rows(path, pairs, **extra):
    with open(path, "w") as fh:
        for c, r in pairs:
            fh.write(json.dumps({"id": "g", "prompt": "Which?", "chosen": c, "rejected": r, **extra}) + "\n")
    return path


def test_cycle_keeps_pairs_as_given_and_warns_in_the_event_stream(tmp_path):
    path = _rows(tmp_path / "cyc.jsonl", [("a", "b"), ("b", "c"), ("c", "a")])
    events = EventLog(tmp_path / "run", echo=False)
    res = load_groups(path, events=events)
    [g] = res.groups
    assert g.explicit_pairs == [(0, 1), (1, 2), (2, 0)] and [r.rank for r in g.responses] == [None] * 3
    message = (f"{path}:1: group 'g': the preferences form a cycle (A > B > ... > A); the pairs are kept as given")
    assert res.warnings == [message]
    evs, _ = read_events(tmp_path / "run")
    assert [(e["type"], e["stage"], e["message"]) for e in evs] == [("warning", "data", message)]


def test_full_expansion_is_reordered_best_first(tmp_path):
    path = _rows(tmp_path / "full.jsonl", [("mid", "low"), ("top", "low"), ("top", "mid")])
    [g] = load_groups(path).groups
    assert [(r.text, r.rank) for r in g.responses] == [("top", 1), ("mid", 2), ("low", 3)]
    assert g.best_index() == 0 and g.pairs() == [(0, 1), (0, 2), (1, 2)]


def test_conflicting_critiques_keep_the_first_and_warn(tmp_path):
    path = tmp_path / "crit.jsonl"
    rows = [{"id": "g", "prompt": "Q?", "chosen": "a", "rejected": "b", "chosen_reason": "good", "rejected_reason": ""},
            {"id": "g", "prompt": "Q?", "chosen": "a", "rejected": "c", "chosen_reason": "great", "rejected_reason": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = load_groups(path)
    assert [r.critique for r in res.groups[0].responses] == ["good", None, None]
    assert res.warnings == [f"{path}:1: group 'g': a response has different critiques in different rows "
                            f"({path}:2); the first is kept"]


def test_rows_without_id_group_by_prompt_and_media(tmp_path):
    path = tmp_path / "noid.jsonl"
    rows = [{"prompt": "Q1?", "chosen": "a", "rejected": "b"}, {"prompt": "Q2?", "chosen": "a", "rejected": "b"},
            {"prompt": "Q1?", "chosen": "b", "rejected": "c"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    g1, g2 = load_groups(path, fmt="mmrlhf").groups
    assert [r.text for r in g1.responses] == ["a", "b", "c"] and [r.text for r in g2.responses] == ["a", "b"]
    assert g1.id != g2.id and load_groups(path, fmt="mmrlhf").groups[0].id == g1.id  # ids are stable content hashes
