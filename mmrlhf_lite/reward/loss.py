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

    python -m pytest tests/test_reward_loss.py -q
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(rewards: torch.Tensor, pairs: torch.Tensor, margins: torch.Tensor | None = None) -> torch.Tensor:
    """rewards (N,), pairs (P, 2) long of (better, worse), margins (P,) or None -> scalar."""
    if pairs.numel() == 0:
        return rewards.sum() * 0
    diff = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
    if margins is not None:
        diff = diff - margins
    return -F.logsigmoid(diff).mean()


def tie_loss(rewards: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    if ties.numel() == 0:
        return rewards.sum() * 0
    return (rewards[ties[:, 0]] - rewards[ties[:, 1]]).pow(2).mean()


def center_loss(rewards: torch.Tensor, all_pairs: torch.Tensor) -> torch.Tensor:
    if all_pairs.numel() == 0:
        return rewards.sum() * 0
    return (rewards[all_pairs[:, 0]] + rewards[all_pairs[:, 1]]).pow(2).mean()


def critique_ce(token_logps: list[torch.Tensor]) -> torch.Tensor | None:
    """2 * mean over critiques of their mean token NLL; None when no response has a critique."""
    per = [-t.mean() for t in token_logps if t.numel() > 0]
    if not per:
        return None
    return 2 * torch.stack(per).mean()


def reward_loss(rewards: torch.Tensor, pairs: torch.Tensor, ties: torch.Tensor, critique_token_logps: list,
                *, w_rank: float = 1.0, w_tie: float = 0.0, w_center: float = 0.01, w_crit: float = 1.0,
                margins: torch.Tensor | None = None, center_rewards: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging). `center_rewards`: the rewards the centering term
    applies to (default `rewards`; the head's part alone when the score adds a response log-prob term)."""
    bt = bradley_terry(rewards, pairs, margins)
    tie = tie_loss(rewards, ties)
    all_pairs = torch.cat([pairs, ties]) if ties.numel() else pairs
    center = center_loss(rewards if center_rewards is None else center_rewards, all_pairs)
    total = w_rank * bt + w_tie * tie + w_center * center
    parts = {"bt_loss": bt.item(), "center_loss": center.item()}
    if ties.numel():
        parts["tie_loss"] = tie.item()
    crit = critique_ce(critique_token_logps)
    if crit is not None and w_crit > 0:
        total = total + w_crit * crit
        parts["critique_loss"] = crit.item()
    if pairs.numel():
        parts["pair_accuracy"] = (rewards[pairs[:, 0]] > rewards[pairs[:, 1]]).float().mean().item()
        parts["reward_margin"] = (rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).mean().item()
    return total, parts
