"""The reward-hacking guard of online rounds: the KL estimator against an exact computation, and the stop rule
on hand-made histories.

    python -m pytest -q tests/test_rounds_guard.py
"""
from __future__ import annotations

import math
import random

import pytest

from mmrlhf_lite.rounds.guard import PromptSamples, RoundSignals, kl_estimate, ranker_check, sampled_metrics, stop_reason


def test_kl_estimate_hand_worked():
    # log-ratios 1, -1, 3 with weights 1, 1, 2: (1 - 1 + 2 * 3) / 4 = 1.5
    assert kl_estimate([-1.0, -3.0, -0.5], [-2.0, -2.0, -3.5], weights=[1, 1, 2]) == pytest.approx(1.5)
    assert kl_estimate([-1.0, -3.0], [-2.0, -2.0]) == 0.0
    assert kl_estimate([], []) is None
    with pytest.raises(ValueError):
        kl_estimate([1.0], [])


def test_kl_estimate_converges_to_the_exact_kl_of_two_categoricals():
    """Answers y in {0..4} drawn from pi: the estimate from their log-probs matches sum_y pi(y) log(pi(y)/pi0(y))
    computed exactly (float64) within 4 standard errors of the mean, and the duplicates of a sample counted once
    with their multiplicity give the same number."""
    pi = [0.5, 0.2, 0.15, 0.1, 0.05]
    pi0 = [0.1, 0.3, 0.2, 0.2, 0.2]
    exact = math.fsum(p * math.log(p / q) for p, q in zip(pi, pi0))
    rng = random.Random(0)
    ys = rng.choices(range(5), weights=pi, k=20000)
    ratios = [math.log(pi[y]) - math.log(pi0[y]) for y in ys]
    est = kl_estimate([math.log(pi[y]) for y in ys], [math.log(pi0[y]) for y in ys])
    mean = sum(ratios) / len(ratios)
    se = math.sqrt(sum((r - mean) ** 2 for r in ratios) / (len(ratios) - 1) / len(ratios))
    assert abs(est - exact) < 4 * se and se < 0.01
    counts = [ys.count(y) for y in range(5)]
    grouped = kl_estimate([math.log(p) for p in pi], [math.log(q) for q in pi0], weights=counts)
    assert grouped == pytest.approx(est, rel=1e-12)
    # the same policy: exactly 0
    assert kl_estimate([math.log(pi[y]) for y in ys], [math.log(pi[y]) for y in ys]) == 0.0


def r(i, reward, **held):
    return RoundSignals(i, reward, held)


def test_stop_rule_needs_the_reward_up_and_a_held_out_signal_down_patience_rounds_in_a_row():
    # round 1: reward up, right answers down; round 2: the same -> stop at patience 2
    hist = [r(0, 0.1, right_answers=0.6, well_formed=0.9), r(1, 0.3, right_answers=0.5, well_formed=0.9),
            r(2, 0.5, right_answers=0.4, well_formed=0.95)]
    msg = stop_reason(hist, 2)
    assert msg.startswith("stopped after round 2: for 2 round(s) in a row")
    assert "round 1: reward 0.1 -> 0.3, right_answers 0.6 -> 0.5" in msg
    assert "round 2: reward 0.3 -> 0.5, right_answers 0.5 -> 0.4" in msg
    assert stop_reason(hist, 3) is None            # only 2 rounds of divergence
    assert stop_reason(hist, 0) is None            # patience 0: never
    assert stop_reason(hist, 1).startswith("stopped after round 2: for 1 round(s)")


@pytest.mark.parametrize("hist", [
    # reward up but every signal up or equal: learning, not hacking
    [r(0, 0.1, right_answers=0.4), r(1, 0.2, right_answers=0.5), r(2, 0.3, right_answers=0.5)],
    # a signal down but the reward down too
    [r(0, 0.3, right_answers=0.6), r(1, 0.2, right_answers=0.5), r(2, 0.1, right_answers=0.4)],
    # diverged in round 1 only, not in the last round
    [r(0, 0.1, right_answers=0.6), r(1, 0.3, right_answers=0.5), r(2, 0.5, right_answers=0.7)],
    # the signal is missing in one of the two rounds compared
    [r(0, 0.1, right_answers=0.6), r(1, 0.3, right_answers=None), r(2, 0.5, right_answers=0.4)],
    # no reward (no reward model score): no rule
    [r(0, None, right_answers=0.6), r(1, None, right_answers=0.5), r(2, None, right_answers=0.4)],
])
def test_stop_rule_does_not_fire(hist):
    assert stop_reason(hist, 2) is None


def test_stop_rule_any_signal_counts_and_each_round_may_name_another():
    hist = [r(0, 0.1, right_answers=0.6, implicit_accuracy=0.8), r(1, 0.2, right_answers=0.5, implicit_accuracy=0.9),
            r(2, 0.3, right_answers=0.7, implicit_accuracy=0.7)]
    msg = stop_reason(hist, 2)
    assert "round 1: reward 0.1 -> 0.2, right_answers 0.6 -> 0.5;" in msg
    assert "round 2: reward 0.2 -> 0.3, implicit_accuracy 0.9 -> 0.7" in msg


def _prompt(right, scores, counts=None):
    return PromptSamples(right=right, texts=[f"a{i}" for i in range(len(right))], counts=counts or [1] * len(right),
                         empty=0, scores=scores)


def test_ranker_check_hand_worked():
    prompts = [
        # right: 2.0, 0.5; wrong: 1.0, 0.5 -> pairs (2>1 yes, 2>0.5 yes, 0.5>1 no, 0.5=0.5 half) = 2.5 / 4;
        # top 2.0 is right
        _prompt([True, False, True, False], [2.0, 1.0, 0.5, 0.5]),
        # right -1, wrong 3 and an unknown 9 (ignored): 0 / 1; top of the known is wrong
        _prompt([True, False, None], [-1.0, 3.0, 9.0]),
        # tie for the top between a right and a wrong answer: the pair counts half, the top half right
        _prompt([True, False], [1.0, 1.0]),
        # all right, all wrong, not scored: no pair, not a mixed prompt
        _prompt([True, True], [0.0, 1.0]), _prompt([False, False], [0.0, 1.0]),
        PromptSamples(right=[True, False], texts=["a", "b"], counts=[1, 1], empty=0, scores=None),
    ]
    out = ranker_check(prompts)
    assert out["ranker_pairs"] == 4 + 1 + 1 and out["best_prompts"] == 3
    assert out["ranker_right"] == pytest.approx((2.5 + 0 + 0.5) / 6)
    assert out["best_right"] == pytest.approx((1 + 0 + 0.5) / 3)
    # how often an answer was sampled does not weigh a pair: the pairs are those of distinct answers
    assert ranker_check([_prompt([True, False], [1.0, 0.0], counts=[1, 9])])["ranker_right"] == 1.0
    assert ranker_check([]) == {"ranker_right": None, "ranker_pairs": 0, "best_right": None, "best_prompts": 0}


def test_ranker_check_equals_a_brute_force_count_on_random_prompts():
    rng = random.Random(3)
    prompts = []
    for _ in range(200):
        k = rng.randint(1, 5)
        prompts.append(_prompt([rng.choice([True, False, None]) for _ in range(k)],
                               [float(rng.randint(-3, 3)) for _ in range(k)]))
    won = n = 0.0
    tops = []
    for p in prompts:
        idx = [i for i, r in enumerate(p.right) if r is not None]
        for i in idx:
            for j in idx:
                if p.right[i] and not p.right[j]:
                    n += 1
                    won += 1.0 if p.scores[i] > p.scores[j] else 0.5 if p.scores[i] == p.scores[j] else 0.0
        if any(p.right[i] is True for i in idx) and any(p.right[i] is False for i in idx):
            best = max(p.scores[i] for i in idx)
            at = [p.right[i] for i in idx if p.scores[i] == best]
            tops.append(sum(at) / len(at))
    out = sampled_metrics(prompts, None)
    assert out["ranker_pairs"] == n > 0 and out["ranker_right"] == pytest.approx(won / n)
    assert out["best_prompts"] == len(tops) and out["best_right"] == pytest.approx(sum(tops) / len(tops))
