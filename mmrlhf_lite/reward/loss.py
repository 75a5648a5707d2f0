"""Reward-model losses as pure functions of per-response rewards (REFERENCE.md, public code defaults):

    L = w_rank * BT + w_tie * tie + w_center * center + w_crit * critique_CE

    BT     = mean over ranked pairs of -log sigmoid(r_better - r_worse - margin)
    tie    = mean over tied pairs of (r_i - r_j)^2
    center = mean over all pairs (ranked and tied) of (r_i + r_j)^2
    critique_CE = 2 * mean over responses with a critique of (mean token NLL of its critique)

Rewards are per response, so every pair of a group reuses the K rewards: a pair index (P, 2) of
(better, worse) positions into the flat reward vector replaces running each pair side separately.
The critique term's factor 2 makes it equal the paper's per-pair `CE_c + CE_r` averaged over all pairs of
a fully ranked group, where each response appears in K-1 pairs: (K-1) * sum_i CE_i / (K(K-1)/2) = 2 mean CE_i.

The means run over the whole optimizer step, however it is split into micro-batches, accumulation steps
and ranks: every ranked pair weighs the same in BT, every tied pair in tie, every pair in center and every
critique in critique_CE. A micro-batch that is part of a step passes `norm`, the step's counts summed over
ranks ({"ranked": P, "tied": T, "all": P + T, "critiques": C}); each term is then its share (its sum over
the micro-batch divided by the step's count) and the shares add up to the step's means. Without `norm`
(one batch = one step) the counts are the batch's own.

    python -m pytest tests/test_reward_loss.py -q
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean(terms: torch.Tensor, count: float | None) -> torch.Tensor:
    """terms.sum() / count (the step's count), or terms.mean() when count is None."""
    return terms.mean() if count is None else terms.sum() / max(float(count), 1.0)


def bradley_terry(rewards: torch.Tensor, pairs: torch.Tensor, margins: torch.Tensor | None = None,
                  count: float | None = None) -> torch.Tensor:
    """rewards (N,), pairs (P, 2) long of (better, worse), margins (P,) or None -> scalar."""
    if pairs.numel() == 0:
        return rewards.sum() * 0
    diff = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
    if margins is not None:
        diff = diff - margins
    return _mean(-F.logsigmoid(diff), count)


def tie_loss(rewards: torch.Tensor, ties: torch.Tensor, count: float | None = None) -> torch.Tensor:
    if ties.numel() == 0:
        return rewards.sum() * 0
    return _mean((rewards[ties[:, 0]] - rewards[ties[:, 1]]).pow(2), count)


def center_loss(rewards: torch.Tensor, all_pairs: torch.Tensor, count: float | None = None) -> torch.Tensor:
    if all_pairs.numel() == 0:
        return rewards.sum() * 0
    return _mean((rewards[all_pairs[:, 0]] + rewards[all_pairs[:, 1]]).pow(2), count)


def critique_ce(token_logps: list[torch.Tensor], count: float | None = None) -> torch.Tensor | None:
    """2 * mean over critiques of their mean token NLL; None when no response has a critique."""
    per = [-t.mean() for t in token_logps if t.numel() > 0]
    if not per:
        return None
    return 2 * _mean(torch.stack(per), count)


def step_counts(pairs: torch.Tensor, ties: torch.Tensor, critique_token_logps_or_count) -> dict[str, float]:
    """A batch's counts for `norm`: ranked pairs, tied pairs, all pairs, critiques (a count or the list of
    per-critique token log-probs)."""
    c = critique_token_logps_or_count
    n_crit = c if isinstance(c, (int, float)) else sum(1 for t in c if t.numel() > 0)
    p, t = pairs.reshape(-1, 2).shape[0], ties.reshape(-1, 2).shape[0]
    return {"ranked": float(p), "tied": float(t), "all": float(p + t), "critiques": float(n_crit)}


def reward_loss(rewards: torch.Tensor, pairs: torch.Tensor, ties: torch.Tensor, critique_token_logps: list,
                *, w_rank: float = 1.0, w_tie: float = 0.0, w_center: float = 0.01, w_crit: float = 1.0,
                margins: torch.Tensor | None = None, center_rewards: torch.Tensor | None = None,
                norm: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging: this batch's own means). `norm`: the optimizer
    step's counts (see the module docstring) when this batch is only part of the step. `center_rewards`:
    the rewards the centering term applies to (default `rewards`; the head's part alone when the score adds
    a response log-prob term)."""
    n = norm or {}
    bt = bradley_terry(rewards, pairs, margins, n.get("ranked"))
    tie = tie_loss(rewards, ties, n.get("tied"))
    all_pairs = torch.cat([pairs, ties]) if ties.numel() else pairs
    center = center_loss(rewards if center_rewards is None else center_rewards, all_pairs, n.get("all"))
    total = w_rank * bt + w_tie * tie + w_center * center
    with torch.no_grad():
        parts = {"bt_loss": bradley_terry(rewards, pairs, margins).item(),
                 "center_loss": center_loss(rewards, all_pairs).item()}
        if ties.numel():
            parts["tie_loss"] = tie_loss(rewards, ties).item()
    crit = critique_ce(critique_token_logps, n.get("critiques"))
    if crit is not None and w_crit > 0:
        total = total + w_crit * crit
        parts["critique_loss"] = critique_ce([t.detach() for t in critique_token_logps]).item()
    if pairs.numel():
        parts["pair_accuracy"] = (rewards[pairs[:, 0]] > rewards[pairs[:, 1]]).float().mean().item()
        parts["reward_margin"] = (rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).mean().item()
    return total, parts
