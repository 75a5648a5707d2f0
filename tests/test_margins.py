"""Reward margins are found by content: a train group and an eval group may share an id.

    python -m pytest -q tests/test_margins.py
"""
from __future__ import annotations

import json

import pytest

from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn
from mmrlhf_lite.dpo.trainer import margins_for
from mmrlhf_lite.reward.scorer import load_margins, write_margins


def _group(question: str, texts: list[str]) -> PreferenceGroup:
    return PreferenceGroup(id="0", prompt=[text_to_turn(question, 0)],
                           responses=[Response(t, rank=i + 1) for i, t in enumerate(texts)])


def _records(scores):
    return [{"score": s, "critiques": []} for s in scores]


def test_train_and_eval_groups_with_the_same_id_keep_their_own_margins(tmp_path):
    """Train group "0" scored (2, -1) and eval group "0" scored (-3, 0.5): DPO's delta for the train pair
    is 2 - (-1) = 3.0 (by id alone the eval record, written last, gave -3 - 0.5 = -3.5)."""
    train = _group("How many circles?", ["Two circles.", "Five squares."])
    evals = _group("What colour is the star?", ["It is red.", "Blue."])
    path = tmp_path / "score" / "margins.jsonl"
    path.parent.mkdir()
    records = [_records([2.0, -1.0]), _records([-3.0, 0.5])]
    write_margins(path, [train, evals], records, {"0": "eval"})
    assert margins_for([train], "reward", tmp_path) == {"0": [3.0]}
    # the split of each record comes from its position, not from a by-id map
    write_margins(path, [train, evals], records, {"0": "eval"}, splits=["train", "eval"])
    assert [json.loads(x)["split"] for x in path.read_text().splitlines()] == ["train", "eval"]
    assert load_margins(tmp_path)["0"]["scores"] == [-3.0, 0.5]  # browsing by id: the last record of the id


def test_old_margins_file_with_a_repeated_id_is_refused(tmp_path):
    path = tmp_path / "score" / "margins.jsonl"
    path.parent.mkdir()
    old = [{"group_id": "0", "split": s, "category": "general", "scores": sc, "critiques": [[], []], "pairs": []}
           for s, sc in (("train", [2.0, -1.0]), ("eval", [-3.0, 0.5]))]
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    with pytest.raises(ValueError, match=r"group id\(s\) '0' appear more than once .* re-run the `score` stage"):
        margins_for([_group("How many circles?", ["Two circles.", "Five squares."])], "reward", tmp_path)
    path.write_text(json.dumps(old[0]) + "\n")
    assert margins_for([_group("q", ["a", "b"])], "reward", tmp_path) == {"0": [3.0]}
