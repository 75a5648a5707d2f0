"""Margin signal and policy-answer metrics against hand-worked values.

    python -m pytest tests/test_margin_signal.py -q
"""
from __future__ import annotations

import math

import pytest

from mmrlhf_lite.data.demo import answer_correct
from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn
from mmrlhf_lite.evaluate.margins import (average_ranks, beta_spread, delta_rank_correlation, spearman,
                                          write_beta_histogram)
from mmrlhf_lite.evaluate.metrics import well_formed
from mmrlhf_lite.evaluate.pipeline import answer_rank


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]


def test_spearman_hand_worked():
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); x ranks 1..5, y ranks (2, 1, 4, 3, 5): sum d^2 = 4
    assert spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(1 - 6 * 4 / (5 * 24), abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # with ties: Pearson of average ranks. x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4):
    # means 2.5; sxy = 2.25 + 0 + 0 + 2.25 = 4.5; sxx = 2.25 + 0 + 0 + 2.25 = 4.5; syy = 5 -> 4.5 / sqrt(22.5)
    assert spearman([0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1], [2]) is None


def _group(ranks, texts=None):
    texts = texts or [f"answer {i}" for i in range(len(ranks))]
    return PreferenceGroup(id="g", prompt=[text_to_turn("q", 0)], responses=[Response(t, rank=r) for t, r in zip(texts, ranks)])


def test_delta_rank_correlation_uses_the_human_rank_gap():
    g = _group([1, 2, 3])  # pairs (0,1) gap 1, (0,2) gap 2, (1,2) gap 1
    perfect = delta_rank_correlation([g], [[3.0, 2.0, 1.0]])  # deltas 1, 2, 1: ranks follow the gaps
    assert perfect == {"spearman": pytest.approx(1.0), "pairs": 3}
    flat = delta_rank_correlation([g], [[0.0, 5.0, 10.0]])  # deltas -5, -10, -5
    assert flat["spearman"] == pytest.approx(-1.0)


def test_beta_spread_and_histogram(tmp_path):
    # beta(0) = beta; beta(2) = 0.1 * (1 + 0.1 * (1 - e^-1)) = 0.1063212056 (dpo/loss.py worked example)
    s = beta_spread([0.0, 2.0, -100.0], beta=0.1, w=0.1, k=0.5, floor=1e-3)
    assert s["n"] == 3 and s["min"] == 1e-3 and s["max"] == pytest.approx(0.1063212056, abs=1e-9)
    assert s["median"] == pytest.approx(0.1)
    png = write_beta_histogram(tmp_path / "score" / "beta_hist.png", [0.0, 2.0, 1.0], 0.1, 0.1, 0.5, 1e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_answer_rank_among_the_group():
    assert answer_rank(5.0, [1.0, 2.0, 3.0]) == 1
    assert answer_rank(0.0, [1.0, 2.0, 3.0]) == 4
    assert answer_rank(2.0, [1.0, 2.0, 3.0]) == 2.5  # one above, one tied


def test_well_formed():
    refs = ["The circle is red. It is big.", "The circle is blue. It is small."]
    assert well_formed("The circle is green. It is big.", refs)  # 6 of 7 words known
    assert not well_formed("answer gray\ufffdtriangle**in*etaile", refs)
    assert not well_formed("answer gray triangle in etaile", refs)
    assert not well_formed("   ", refs)


def test_answer_correct_on_demo_facts():
    g = PreferenceGroup(id="d", prompt=[text_to_turn("What colour is the circle?", 0)],
                        responses=[Response("The circle is red. It is big.", rank=1)], category="colour",
                        meta={"facts": {"shape": "circle", "colour": "red", "size": "big", "count": 1}})
    assert answer_correct(g, "The circle is red. It is small.") is True
    assert answer_correct(g, "The circle is blue. It is big.") is False
    assert answer_correct(g, "The circle is red or blue.") is False  # naming two colours is no answer
    assert answer_correct(g, "circle circle") is False
    g.meta = {}
    assert answer_correct(g, "red") is None
