"""Reward-model losses against hand-computed float64 values."""
import math

import pytest
import torch

from mmrlhf_lite.reward.loss import bradley_terry, center_loss, critique_ce, reward_loss, tie_loss


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def idx(x):
    return torch.tensor(x, dtype=torch.long).reshape(-1, 2)


def test_bradley_terry_hand_values():
    r = t([1.0, 0.25, -0.5])
    # pairs (0 > 1): -log sigmoid(0.75) = 0.38687100611489994 ; (0 > 2): -log sigmoid(1.5)
    got = bradley_terry(r, idx([[0, 1], [0, 2]]))
    assert got.item() == pytest.approx((0.38687100611489994 + math.log1p(math.exp(-1.5))) / 2, abs=1e-12)


def test_margin_bradley_terry():
    r = t([1.0, 0.25])
    got = bradley_terry(r, idx([[0, 1]]), margins=t([0.5]))       # -log sigmoid(0.75 - 0.5)
    assert got.item() == pytest.approx(math.log1p(math.exp(-0.25)), abs=1e-12)


def test_tie_and_center():
    r = t([0.5, -0.25, 2.0])
    assert tie_loss(r, idx([[0, 1]])).item() == pytest.approx(0.75 ** 2)
    assert center_loss(r, idx([[0, 1], [0, 2]])).item() == pytest.approx((0.25 ** 2 + 2.5 ** 2) / 2)
    assert tie_loss(r, idx([])).item() == 0.0


def test_critique_ce_masked_mean():
    # token log-probs of two critiques; a response without critique contributes nothing
    lps = [t([-1.0, -3.0]), t([]), t([-0.5])]
    assert critique_ce(lps).item() == pytest.approx(2 * ((2.0 + 0.5) / 2), abs=1e-12)
    assert critique_ce([t([])]) is None


def test_group_critique_term_equals_per_pair_sum_averaged():
    """2 * mean_i CE_i == mean over all pairs of (CE_c + CE_r) for a fully ranked group."""
    ce = [0.7, 1.3, 2.2, 0.4]
    lps = [t([-c]) for c in ce]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    per_pair = sum(ce[i] + ce[j] for i, j in pairs) / len(pairs)
    assert critique_ce(lps).item() == pytest.approx(per_pair, abs=1e-12)


def test_reward_loss_total_and_parts():
    r = t([1.0, 0.25, 0.25]).requires_grad_()
    total, parts = reward_loss(r, idx([[0, 1], [0, 2]]), idx([[1, 2]]), [t([-1.0]), t([-2.0]), t([])],
                               w_rank=1.0, w_tie=0.5, w_center=0.01, w_crit=1.0)
    bt = math.log1p(math.exp(-0.75))
    center = ((1.25 ** 2) * 2 + 0.5 ** 2) / 3
    crit = 2 * 1.5
    assert total.item() == pytest.approx(bt + 0.5 * 0 + 0.01 * center + crit, abs=1e-12)
    assert parts["pair_accuracy"] == 1.0 and parts["tie_loss"] == 0.0
    total.backward()
    assert r.grad is not None and torch.isfinite(r.grad).all()
