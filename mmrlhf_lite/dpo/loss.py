"""MM-DPO loss as a pure function of log-probs (REFERENCE.md, "MM-DPO").

Per ranked pair i = (better y_w, worse y_l) of a group, with reward-model margin delta_i = r(y_w) - r(y_l):

    beta_i = max(beta_floor, beta * (1 + w * (1 - exp(-k * delta_i))))          dynamic reward scaling
    h_i    = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
    sigmoid: L_i = -(1 - eps) log sigmoid(beta_i h_i) - eps log sigmoid(-beta_i h_i)   (eps = label smoothing)
    ipo:     L_i = (h_i - 1 / (2 beta_i))^2, with h_i on length-normalised log-probs (log pi / |y|, as in
             the IPO paper and TRL): on sums the target 1 / (2 beta) = 5 nats at beta 0.1 would be spread
             over a whole response whatever its length
    L_dpo  = weighted mean of L_i over all pairs of the batch
    L      = alpha * L_dpo + gamma * NLL(chosen)   (NLL = mean token negative log-likelihood)

The SFT term is the paper's: each pair i carries NLL_i of its own chosen (better) response y_w, so with
`pairs: all` a group's rank-2 response, chosen against ranks 3 and 4, is trained on too. `dpo.sft_target:
best` gives every pair of a group the NLL of the group's rank-1 response instead (dpo/trainer.py's
`sft_response` picks the response; this function takes the per-pair NLLs).

Every pair weighs the same, however the pairs of one optimizer step are split into micro-batches,
accumulation steps and ranks: each pair carries its own DPO term and its own SFT term, and the step's
loss is

    L_step = sum over the step's pairs i of w_i * (alpha * L_i + gamma * NLL_i) / sum over the step's pairs of w_i

A micro-batch passes `num_pairs` = the step's (weighted) pair count, summed over ranks; its loss is then
its share of L_step, and the shares add up to L_step. Without `num_pairs` (one batch = one step) it is
the formula above on the batch, so a single group gets alpha * mean L_i + gamma * mean NLL_i.

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
                n_tokens: torch.Tensor | None = None,
                num_pairs: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """policy_logps, reference_logps (N,) summed over response tokens; pairs (P, 2) long (better, worse);
    deltas (P,); pair_weights (P,) or None; sft_nll: None, a scalar (the same NLL for every pair) or (P,)
    (per pair: the mean token NLL of its SFT response, see the module docstring); n_tokens (N,) response token counts, needed
    by `ipo` (length-normalised); num_pairs: the (weighted) pair count of the whole optimizer step when this
    batch is only part of it (None: this batch's own).
    Returns (total loss, metrics); the metrics are this batch's own means."""
    ratios = policy_logps - reference_logps.to(policy_logps)                       # (N,)
    if loss_type == "ipo":
        if n_tokens is None:
            raise ValueError("loss_type 'ipo' needs n_tokens: it compares length-normalised log-probs")
        ratios = ratios / n_tokens.to(ratios).clamp_min(1)                         # (N,) mean per token
    h = ratios[pairs[:, 0]] - ratios[pairs[:, 1]]                                   # (P,)
    betas = dynamic_beta(deltas.to(h), beta, w, k, beta_floor)                      # (P,)
    losses = pair_losses(h, betas, loss_type, label_smoothing)
    pw = torch.ones_like(losses) if pair_weights is None else pair_weights.to(losses)
    local_weight = pw.sum()
    denom = local_weight.clamp_min(1e-12) if num_pairs is None else max(float(num_pairs), 1e-12)
    dpo_sum = (losses * pw).sum()
    total = alpha * dpo_sum / denom
    with torch.no_grad():
        chosen = policy_logps[pairs[:, 0]]
        rejected = policy_logps[pairs[:, 1]]
        metrics = {
            "dpo_loss": (dpo_sum / local_weight.clamp_min(1e-12)).item(),
            "implicit_accuracy": (h > 0).float().mean().item(),
            "implicit_margin": (betas * h).mean().item(),
            "chosen_reward": (betas * ratios[pairs[:, 0]]).mean().item(),
            "rejected_reward": (betas * ratios[pairs[:, 1]]).mean().item(),
            "beta_mean": betas.mean().item(), "beta_min": betas.min().item(), "beta_max": betas.max().item(),
            "delta_mean": deltas.float().mean().item(),
            "logp_chosen": chosen.mean().item(), "logp_rejected": rejected.mean().item(),
            # largest |log pi - log pi_ref| (summed over tokens) of the batch: 0 at step 0, where the policy is
            # the reference; a nonzero value there means the reference cache was computed in other numerics
            "abs_log_ratio_max": (policy_logps.detach() - reference_logps.to(policy_logps)).abs().max().item()
            if policy_logps.numel() else 0.0,
        }
    if sft_nll is not None and gamma > 0:
        sft_nll = sft_nll.to(losses)
        sft_sum = sft_nll * local_weight if sft_nll.dim() == 0 else (sft_nll * pw).sum()
        total = total + gamma * sft_sum / denom
        metrics["sft_nll"] = (sft_sum / local_weight.clamp_min(1e-12)).item()
    return total, metrics
