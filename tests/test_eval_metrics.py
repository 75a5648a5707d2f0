"""Acc / Acc+ / win rate / implicit accuracy on hand-made score tables."""
import pytest

from mmrlhf_lite.evaluate.metrics import ScoredGroup, implicit_accuracy, merge_by_id, reward_bench, win_rate


def test_acc_and_acc_plus_with_one_wrong_pair():
    groups = [
        ScoredGroup("a", "mcq", [(0, 1), (0, 2), (1, 2)], [3.0, 2.0, 1.0]),        # all 3 right
        ScoredGroup("b", "mcq", [(0, 1), (0, 2), (1, 2)], [3.0, 1.0, 2.0]),        # all right but one
        ScoredGroup("c", "safety", [(0, 1)], [0.5, 0.5], rank_ties=2),            # exact score tie = wrong
    ]
    res = reward_bench(groups)
    assert res["overall"]["acc"] == pytest.approx(5 / 7)
    assert res["overall"]["acc_plus"] == pytest.approx(1 / 3)
    assert res["overall"]["score_ties"] == 1 and res["overall"]["rank_ties"] == 2
    assert res["by_category"]["mcq"]["acc"] == pytest.approx(5 / 6)
    assert res["by_category"]["mcq"]["acc_plus"] == pytest.approx(0.5)
    assert res["by_category"]["safety"]["acc"] == 0.0


def test_bench_rows_sharing_an_id_are_one_group_for_acc_plus():
    rows = [ScoredGroup("x", "long", [(0, 1)], [1.0, 0.0]), ScoredGroup("x", "long", [(0, 1)], [0.0, 1.0])]
    merged = merge_by_id(rows)
    assert len(merged) == 1 and merged[0].pairs == [(0, 1), (2, 3)]
    res = reward_bench(merged)
    assert res["overall"]["acc"] == 0.5 and res["overall"]["acc_plus"] == 0.0


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.0, 0.5], [0.0, 1.0, 0.5])["win_rate"] == pytest.approx(0.5)
    assert win_rate([], [])["win_rate"] is None


def test_implicit_accuracy():
    policy = [[-1.0, -5.0, -3.0]]
    reference = [[-2.0, -4.0, -3.0]]      # ratios +1, -1, 0
    res = implicit_accuracy(policy, reference, [[(0, 1), (0, 2), (2, 1), (1, 2)]])
    assert res["implicit_accuracy"] == 0.75
    assert res["mean_logratio_margin"] == pytest.approx((2 + 1 + 1 - 1) / 4)
