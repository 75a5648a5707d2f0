"""MM-DPO loss as a pure function of log-probs (REFERENCE.md, "MM-DPO").

Per ranked pair i = (better y_w, worse y_l) of a group, with reward-model margin delta_i = r(y_w) - r(y_l):

    beta_i = max(beta_floor, beta * (1 + w * (1 - exp(-k * delta_i))))          dynamic reward scaling
    h_i    = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
    sigmoid: L_i = -(1 - eps) log sigmoid(beta_i h_i) - eps log sigmoid(-beta_i h_i)   (eps = label smoothing)
    ipo:     L_i = (h_i - 1 / (2 beta_i))^2, with h_i on length-normalised log-probs (log pi / |y|, as in
             the IPO paper and TRL): on sums the target 1 / (2 beta) = 5 nats at beta 0.1 would be spread
             over a whole response whatever its length
    L_dpo  = weighted mean of L_i over all pairs of the batch
    L      = alpha * L_dpo + gamma * NLL(best response)   (NLL = mean token negative log-likelihood)

Log-probs are per response (N of them); pairs index into them, so a group of K responses gives all
K(K-1)/2 pairs from K forwards. With w = 0 it is standard DPO. Pairs the reward model is sure of
(large delta) get a larger beta; a negative delta (the reward model disagrees with the ranking) shrinks
beta towards the floor.

Worked example (tests/test_dpo_loss.py): beta=0.1, w=0.1, k=0.5, delta=2: beta_i = 0.1*(1 + 0.1*(1 - e^-1))
= 0.1063212056; with h = 3: L = -log sigmoid(0.3189636) = log(1 + e^-0.3189636) = 0.5463290494.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dynamic_beta(delta: torch.Tensor, beta: float, w: float, k: float, floor: float = 1e-3) -> torch.Tensor:
    """beta(delta) = beta * (1 + w * (1 - exp(-k * delta))), clamped below at `floor` (> 0)."""
    return torch.clamp(beta * (1 + w * (1 - torch.exp(-k * delta))), min=floor)


def pair_losses(h: torch.Tensor, betas: torch.Tensor, loss_type: str = "sigmoid",
                label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair losses from log-ratio differences h (P,) and betas (P,)."""
    return LOSSES[loss_type](h, betas, label_smoothing)


def _sigmoid(h, betas, eps):
    z = betas * h
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _ipo(h, betas, eps):
    return (h - 1 / (2 * betas)) ** 2


LOSSES = {"sigmoid": _sigmoid, "ipo": _ipo}


def mm_dpo_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, pairs: torch.Tensor,
                deltas: torch.Tensor, *, beta: float = 0.1, w: float = 0.1, k: float = 0.5, beta_floor: float = 1e-3,
                loss_type: str = "sigmoid", label_smoothing: float = 0.0, pair_weights: torch.Tensor | None = None,
                sft_nll: torch.Tensor | None = None, alpha: float = 1.0, gamma: float = 0.25,
                n_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """policy_logps, reference_logps (N,) summed over response tokens; pairs (P, 2) long (better, worse);
    deltas (P,); pair_weights (P,) or None; sft_nll scalar (mean token NLL of the best responses) or None;
    n_tokens (N,) response token counts, needed by `ipo` (length-normalised). Returns (total loss, metrics)."""
    ratios = policy_logps - reference_logps.to(policy_logps)                       # (N,)
    if loss_type == "ipo":
        if n_tokens is None:
            raise ValueError("loss_type 'ipo' needs n_tokens: it compares length-normalised log-probs")
        ratios = ratios / n_tokens.to(ratios).clamp_min(1)                         # (N,) mean per token
    h = ratios[pairs[:, 0]] - ratios[pairs[:, 1]]                                   # (P,)
    betas = dynamic_beta(deltas.to(h), beta, w, k, beta_floor)                      # (P,)
    losses = pair_losses(h, betas, loss_type, label_smoothing)
    if pair_weights is None:
        dpo = losses.mean()
    else:
        pw = pair_weights.to(losses)
        dpo = (losses * pw).sum() / pw.sum().clamp_min(1e-12)
    total = alpha * dpo
    with torch.no_grad():
        chosen = policy_logps[pairs[:, 0]]
        rejected = policy_logps[pairs[:, 1]]
        metrics = {
            "dpo_loss": dpo.item(),
            "implicit_accuracy": (h > 0).float().mean().item(),
            "implicit_margin": (betas * h).mean().item(),
            "chosen_reward": (betas * ratios[pairs[:, 0]]).mean().item(),
            "rejected_reward": (betas * ratios[pairs[:, 1]]).mean().item(),
            "beta_mean": betas.mean().item(), "beta_min": betas.min().item(), "beta_max": betas.max().item(),
            "delta_mean": deltas.float().mean().item(),
            "logp_chosen": chosen.mean().item(), "logp_rejected": rejected.mean().item(),
        }
    if sft_nll is not None and gamma > 0:
        total = total + gamma * sft_nll
        metrics["sft_nll"] = sft_nll.item()
    return total, metrics
