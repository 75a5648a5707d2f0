"""data.label_noise: a seeded share of the training groups' ranked pairs is flipped; held-out groups keep
their labels; the MM-DPO comparison table renders mean ± sd.

    python -m pytest tests/test_label_noise.py -q
"""
from __future__ import annotations

import json

import pytest

from mmrlhf_lite.compare_dpo import Method, matched_beta, parse_methods, table, trained_beta_mean
from mmrlhf_lite.data import flip_pairs, prepare_data
from mmrlhf_lite.data.demo import generate
from mmrlhf_lite.events import EventLog
from mmrlhf_lite.recipe import load_recipe


def test_flip_pairs_share_and_determinism(tmp_path):
    groups = [g for g in generate(tmp_path, groups=200, seed=0, image_size=32) if g.category != "safety"]
    noisy, flipped = flip_pairs(groups, 0.25, seed=0)
    total = sum(len(g.pairs()) for g in groups)
    assert total == 6 * len(groups)
    assert 0.20 < flipped / total < 0.30
    changed = sum(p != q for g, n in zip(groups, noisy) for p, q in zip(g.pairs(), n.pairs()))
    assert changed == flipped
    for g, n in zip(groups, noisy):
        assert {frozenset(p) for p in g.pairs()} == {frozenset(p) for p in n.pairs()}  # same pairs, some reversed
    again, flipped2 = flip_pairs(groups, 0.25, seed=0)
    assert flipped2 == flipped and [g.pairs() for g in again] == [g.pairs() for g in noisy]
    assert flip_pairs(groups, 0.0, seed=0)[1] == 0


def test_prepare_data_flips_training_pairs_only(tmp_path):
    recipe = load_recipe(None, ["data.demo.groups=40", "data.demo.image_size=32", "data.label_noise=0.5",
                                f"run.dir={tmp_path}"])
    clean = load_recipe(None, ["data.demo.groups=40", "data.demo.image_size=32", f"run.dir={tmp_path}"])
    train, evals = prepare_data(recipe, tmp_path, EventLog(tmp_path, echo=False))
    train0, evals0 = prepare_data(clean, tmp_path, EventLog(tmp_path, echo=False))
    assert [g.pairs() for g in evals] == [g.pairs() for g in evals0]
    assert [g.pairs() for g in train] != [g.pairs() for g in train0]


def test_compare_table_mean_sd():
    methods = [("MM-DPO", 0.1, 0.5), ("DPO", 0.0, 0.5)]
    results = {"0.25": {"MM-DPO": [{"implicit_accuracy": 0.8, "logp_accuracy": 0.7},
                                   {"implicit_accuracy": 0.9, "logp_accuracy": 0.7}],
                        "DPO": [{"implicit_accuracy": 0.5, "logp_accuracy": 0.5}]}}
    md = table(results, methods)
    # mean 0.85, sample sd sqrt(((0.05)^2 * 2) / 1) = 0.0707
    assert "| 25% | MM-DPO (0.1, 0.5) | 0.850 ± 0.071 | 0.700 ± 0.000 | 2 |" in md
    assert "| 25% | DPO (0, 0.5) | 0.500 ± 0.000 |" in md


def test_compare_methods_take_their_own_overrides_and_a_matched_beta():
    methods = parse_methods("MM:1:1,DPO:0:0.5,best:0.1:0.5", ["best:dpo.sft_target=best", "best:dpo.gamma=1.0"],
                       ["DPO=MM"])
    assert methods == [Method("MM", 1.0, 1.0), Method("DPO", 0.0, 0.5, (), "MM"),
                       Method("best", 0.1, 0.5, ("dpo.sft_target=best", "dpo.gamma=1.0"))]
    for sets, beta_from, message in ((["nope:dpo.w=1"], [], "--set 'nope:dpo.w=1'"),
                                     (["best:dpo.w"], [], "--set 'best:dpo.w'"),
                                     ([], ["MM=DPO"], "REF before NAME"), ([], ["DPO=gone"], "--beta-from 'DPO=gone'")):
        with pytest.raises(SystemExit, match=message):
            parse_methods("MM:1:1,DPO:0:0.5,best:0.1:0.5", sets, beta_from)
    with pytest.raises(SystemExit, match="names must differ"):
        parse_methods("A:1:1,A:0:1")


def test_matched_beta_is_the_mean_of_the_runs_trained_beta(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    events = [{"type": "metrics", "stage": "dpo", "step": 10, "beta_mean": 0.12},
              {"type": "metrics", "stage": "reward", "step": 10, "beta_mean": 9.0},   # another stage's metric
              {"type": "metrics", "stage": "dpo", "step": 20, "loss": 0.5},            # a step without it
              {"type": "metrics", "stage": "dpo", "step": 20, "beta_mean": 0.16}]
    (run / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + '\n{"type": "metr')  # torn line
    assert trained_beta_mean(run) == pytest.approx(0.14, abs=1e-12)
    assert trained_beta_mean(tmp_path / "missing") is None
    assert matched_beta([{"beta_mean": 0.14}, {"beta_mean": 0.18}, {"beta_mean": None}], "MM") == \
        pytest.approx(0.16, abs=1e-12)
    with pytest.raises(SystemExit, match="the runs of MM logged no beta_mean"):
        matched_beta([{"beta_mean": None}], "MM")


def test_compare_table_adds_the_answer_and_beta_columns():
    methods = [Method("chosen", 0.1, 0.5, ("dpo.sft_target=chosen",)), Method("best", 0.1, 0.5)]
    row = {"implicit_accuracy": 0.8, "logp_accuracy": 0.7, "beta_mean": 0.1062, "settings": ["dpo.sft_target=chosen"]}
    results = {"0": {"chosen": [row | {"right_answers": 0.5, "reward_rank": 2.0},
                                row | {"right_answers": 0.7, "reward_rank": 1.5}],
                     "best": [{"implicit_accuracy": 0.9, "logp_accuracy": 0.8, "beta_mean": 0.1, "settings": [],
                               "right_answers": 0.9}]}}
    md = table(results, methods)
    assert md.splitlines()[0] == ("| label noise | method (w, k) | settings | held-out implicit reward acc | "
                                  "held-out log-prob acc | held-out right answers | reward rank of its answers "
                                  "(1 = first) | mean beta_i (training) | seeds |")
    # right answers: mean 0.6, sd sqrt(2 * 0.1^2 / 1) = 0.141; reward rank 1.75 ± 0.354
    assert ("| 0% | chosen (0.1, 0.5) | dpo.sft_target=chosen | 0.800 ± 0.000 | 0.700 ± 0.000 | 0.600 ± 0.141 | "
            "1.750 ± 0.354 | 0.1062 ± 0.0000 | 2 |") in md
    assert "| 0% | best (0.1, 0.5) |  | 0.900 ± 0.000 | 0.800 ± 0.000 | 0.900 ± 0.000 | - | 0.1000 ± 0.0000 | 1 |" in md
