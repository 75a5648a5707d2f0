"""The reward model's scalar head, read at the last non-padding token of [prompt + response + critique].

The paper's public code: dropout -> Linear(h, h) -> tanh -> dropout -> Linear(h, 1) (`mlp`); `linear` is
a plain Linear(h, 1). Kept in float32 whatever the compute dtype: it is tiny and the scores feed a
sigmoid, where bf16 rounding of reward differences is visible.
"""
from __future__ import annotations

import torch
from torch import nn


class RewardHead(nn.Module):
    def __init__(self, hidden: int, kind: str = "mlp", dropout: float = 0.0, response_logp_weight: float = 0.0):
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise ValueError(f"reward head kind must be 'mlp' or 'linear', got {kind!r}")
        self.kind, self.dropout_p = kind, float(dropout)
        # score = head(h_last) + response_logp_weight * mean log p(response tokens | image, prompt) under the
        # reward model's own LM (recipe reward.response_logp_weight; 0 = the paper's head alone)
        self.response_logp_weight = float(response_logp_weight)
        if kind == "mlp":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout),
                                     nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., h) -> (...) rewards."""
        return self.net(hidden_states.to(self.net[-1].weight.dtype)).squeeze(-1)
