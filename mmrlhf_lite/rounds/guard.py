"""Guards against reward hacking in online rounds (pure functions, no model).

A policy trained on its own answers, ranked by a reward model, can learn what the reward model likes instead of
what is right. Each round therefore reports, beside the reward model's mean score, signals it cannot game: the
share of right answers (where the data knows them), of well-formed answers, the answers' length, the held-out
implicit reward accuracy on human-ranked pairs, and how far the policy has moved from the one the rounds started
from, KL(pi || pi_0), estimated from the round's own samples:

    KL(pi || pi_0) = E_{y ~ pi}[log pi(y | x) - log pi_0(y | x)]  ~  (1 / N) sum_i (log pi(y_i) - log pi_0(y_i))

(the plain Monte-Carlo estimator, "k1" in Schulman's note on KL approximations: unbiased, in nats per answer, and
negative by chance when the two policies barely differ). `stop_reason` is the early-stop rule of `rounds.patience`.

Where the data knows the right answer, each round also checks the ranker itself on the policy's own answers
(`ranker_check`): of the pairs of distinct answers to one prompt where one is right and the other wrong, the share
the reward model scores right-above-wrong, and of the prompts with both kinds, the share whose top-scored answer is
right. Those are the pairs and the best answers the round trains on; a reward model that ranks human-written
responses well can rank the policy's near-duplicates near chance (docs/rounds.md, "Why the rounds fail here").

    python -m pytest -q tests/test_rounds_guard.py
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

# held-out signals the reward model cannot game, in the order the stop message names them
HELD_OUT_SIGNALS = ("right_answers", "well_formed", "implicit_accuracy")


def kl_estimate(policy_logps: Sequence[float], initial_logps: Sequence[float],
                weights: Sequence[float] | None = None) -> float | None:
    """The Monte-Carlo estimate of KL(pi || pi_0) from answers sampled from pi: the weighted mean of
    log pi(y) - log pi_0(y) (`weights`: how many times each answer was sampled; None = once each). None when there
    is no answer."""
    if len(policy_logps) != len(initial_logps):
        raise ValueError(f"{len(policy_logps)} policy log-probs but {len(initial_logps)} initial ones")
    w = [1.0] * len(policy_logps) if weights is None else [float(x) for x in weights]
    total = sum(w)
    if not total:
        return None
    return math.fsum(wi * (a - b) for wi, a, b in zip(w, policy_logps, initial_logps)) / total


@dataclass
class RoundSignals:
    """What the stop rule reads of one round: the reward model's mean score of the policy's held-out answers, and
    the held-out signals it cannot game (None where the data cannot tell)."""
    round: int
    reward: float | None
    held_out: dict[str, float | None] = field(default_factory=dict)


def _fell(before: RoundSignals, after: RoundSignals) -> list[str]:
    return [name for name in HELD_OUT_SIGNALS
            if before.held_out.get(name) is not None and after.held_out.get(name) is not None
            and after.held_out[name] < before.held_out[name]]


def stop_reason(history: Sequence[RoundSignals], patience: int) -> str | None:
    """Why the rounds stop early, or None: for `patience` rounds in a row (each compared with the round before
    it), the reward rose while at least one held-out signal fell. `patience` 0 never stops."""
    if patience <= 0 or len(history) <= patience:
        return None
    steps = list(zip(history[-patience - 1:-1], history[-patience:]))
    fallen = []
    for before, after in steps:
        if before.reward is None or after.reward is None or not after.reward > before.reward:
            return None
        fell = _fell(before, after)
        if not fell:
            return None
        fallen.append((before, after, fell))
    detail = "; ".join(
        f"round {a.round}: reward {b.reward:.4g} -> {a.reward:.4g}, "
        + ", ".join(f"{name} {b.held_out[name]:.4g} -> {a.held_out[name]:.4g}" for name in fell)
        for b, a, fell in fallen)
    return (f"stopped after round {history[-1].round}: for {patience} round(s) in a row the reward model's mean score "
            f"of the held-out answers rose while a held-out signal it cannot game fell ({detail}); the policy may "
            "be learning what the reward model likes rather than what is right (rounds.patience)")


@dataclass
class PromptSamples:
    """One prompt's sampled answers as a round sees them: its distinct non-empty answers with how often each was
    sampled, the empty ones, and per distinct answer its reward score and log-probs under the sampling policy and
    pi_0 (None where not computed)."""
    right: list[bool | None]           # per distinct answer: right, wrong, or unknown to the data
    texts: list[str]
    counts: list[int]
    empty: int
    scores: list[float] | None = None
    policy_logps: list[float] | None = None
    initial_logps: list[float] | None = None


def sampled_metrics(prompts: Sequence[PromptSamples], known: set[str] | None) -> dict:
    """What the sampling policy's answers of one round look like, every sample counted (duplicates by their
    count): the reward model's mean score, the share right (answers whose data knows it), well-formed (`known`:
    the words of the data's human-ranked responses; None: not measured), empty, the mean length in words, and the
    KL to pi_0 (`kl_estimate`, nats per answer) over the non-empty answers."""
    from ..evaluate.metrics import well_formed, words

    n = sum(sum(p.counts) + p.empty for p in prompts)
    reward, right, formed, length, kl_policy, kl_initial, kl_weights = [], [], [], [], [], [], []
    for p in prompts:
        for i, (text, count) in enumerate(zip(p.texts, p.counts)):
            if p.scores is not None:
                reward += [p.scores[i]] * count
            if p.right[i] is not None:
                right += [p.right[i]] * count
            if known is not None:
                formed += [well_formed(text, [], known=known)] * count
            length += [len(words(text))] * count
            if p.policy_logps is not None and p.initial_logps is not None:
                kl_policy.append(p.policy_logps[i])
                kl_initial.append(p.initial_logps[i])
                kl_weights.append(count)
        if known is not None:
            formed += [False] * p.empty
        length += [0] * p.empty
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"samples": n, "reward_score": mean(reward), "right_answers": mean(right), "well_formed": mean(formed),
            "empty": sum(p.empty for p in prompts) / n if n else None, "length_words": mean(length),
            "kl_to_initial": kl_estimate(kl_policy, kl_initial, kl_weights), **ranker_check(prompts)}


def ranker_check(prompts: Sequence[PromptSamples]) -> dict:
    """How well the reward model ranks the policy's own answers where the data knows which are right, each distinct
    answer once (as the round's pairs hold them):

    - `ranker_right`: over the pairs (right answer, wrong answer) of one prompt, the share whose right answer has
      the higher score (a tie counts half), with their number `ranker_pairs`;
    - `best_right`: over the prompts with a right and a wrong answer, the share whose top-scored answer is right
      (a tie for the top: the share of right answers among the tied), with their number `best_prompts`.

    None (and 0) where no prompt has both a right and a wrong scored answer."""
    from ..evaluate.metrics import win_rate   # the share of first-above-second, ties half

    right_scores, wrong_scores, best = [], [], []
    for p in prompts:
        if p.scores is None:
            continue
        known = [(s, r) for s, r in zip(p.scores, p.right) if r is not None]
        rights = [s for s, r in known if r]
        wrongs = [s for s, r in known if not r]
        if not rights or not wrongs:
            continue
        right_scores += [a for a in rights for _ in wrongs]
        wrong_scores += [b for _ in rights for b in wrongs]
        top = max(s for s, _ in known)
        at_top = [r for s, r in known if s == top]
        best.append(sum(at_top) / len(at_top))
    return {"ranker_right": win_rate(right_scores, wrong_scores)["win_rate"], "ranker_pairs": len(right_scores),
            "best_right": sum(best) / len(best) if best else None, "best_prompts": len(best)}
