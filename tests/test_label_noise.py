"""data.label_noise: a seeded share of the training groups' ranked pairs is flipped; held-out groups keep
their labels; the MM-DPO comparison table renders mean ± sd.

    python -m pytest tests/test_label_noise.py -q
"""
from __future__ import annotations

from mmrlhf_lite.compare_dpo import table
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
