"""Train/eval split by group (deterministic, order-free, stable) and `prepare_data` on a recipe.

    python -m pytest -q tests/test_data_split.py
"""
from __future__ import annotations

import dataclasses
import json
import random

from mmrlhf_lite.data import prepare_data, split_groups
from mmrlhf_lite.data.formats import FORMATS
from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn
from mmrlhf_lite.events import EventLog, read_events
from mmrlhf_lite.recipe import DataConfig, load_recipe


def groups(n: int, start: int = 0) -> list[PreferenceGroup]:
    return [PreferenceGroup(f"g{i}", [text_to_turn(f"q{i}", 0)], [Response("a", 1), Response("b", 2)])
            for i in range(start, start + n)]


def ids(gs) -> list[str]:
    return [g.id for g in gs]


def test_split_is_deterministic_disjoint_and_order_free():
    gs = groups(1000)
    train, evals = split_groups(gs, 0.2, seed=0)
    assert (len(train), len(evals)) == (805, 195)
    assert set(ids(train)).isdisjoint(ids(evals)) and len(train) + len(evals) == 1000
    shuffled = gs[:]
    random.Random(1).shuffle(shuffled)
    t2, e2 = split_groups(shuffled, 0.2, seed=0)
    assert sorted(ids(t2)) == sorted(ids(train)) and sorted(ids(e2)) == sorted(ids(evals))
    assert ids(split_groups(gs, 0.2, seed=0)[1]) == ids(evals)           # same call, same answer
    assert ids(split_groups(gs, 0.2, seed=1)[1]) != ids(evals)           # the seed matters


def test_adding_groups_does_not_move_existing_ones():
    train, evals = split_groups(groups(500), 0.3, seed=7)
    t2, e2 = split_groups(groups(500) + groups(300, start=500), 0.3, seed=7)
    assert set(ids(evals)) <= set(ids(e2)) and set(ids(train)) <= set(ids(t2))


def test_zero_fraction_keeps_everything_for_training():
    gs = groups(10)
    assert split_groups(gs, 0.0) == (gs, [])


def test_pairs_of_one_prompt_never_straddle_the_split(tmp_path):
    """Pair rows merge into one group per id before splitting, so all pairs of a prompt land together."""
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as fh:
        for i in range(60):
            for c, r in (("best", "mid"), ("best", "worst"), ("mid", "worst")):
                fh.write(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?", "chosen": f"{c} {i}",
                                     "rejected": f"{r} {i}"}) + "\n")
    recipe = load_recipe(None, [f"data.path={path}", "data.eval_fraction=0.25"])
    events = EventLog(tmp_path / "run", echo=False)
    train, evals = prepare_data(recipe, tmp_path / "run", events)
    assert len(train) + len(evals) == 60 and all(len(g.responses) == 3 for g in train + evals)
    prompts = lambda gs: {g.question_text() for g in gs}  # noqa: E731
    assert prompts(train).isdisjoint(prompts(evals)) and len(evals) > 0
    evs, _ = read_events(tmp_path / "run")
    assert [e["message"] for e in evs if e["type"] == "log"] == [
        f"data: {len(train)} train groups, {len(evals)} eval groups from {path} (mmrlhf)"]


def test_recipe_format_choices_match_the_readers():
    [f] = [f for f in dataclasses.fields(DataConfig) if f.name == "format"]
    assert f.metadata["choices"] == FORMATS
