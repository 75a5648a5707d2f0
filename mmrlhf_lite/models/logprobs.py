"""Forwards over encoded groups that return, per branch, its target tokens' log-probs and its last hidden
state: packed (one row per group, models/packing.py) or unpacked (one ordinary row per branch).

Log-probs are gathered on branch target tokens only, through a chunked LM head: full-vocabulary
logits are never built for image or prompt positions (DESIGN.md, "Logits only where needed").
The unpacked path (the model computing masks and positions itself) is the fallback for families whose
attention cannot take the packed mask, and the test oracle.

    python -m pytest tests/test_packing.py -q
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .families import FamilySpec
from .packing import (TOKEN_LEVEL_KEYS, EncodedGroup, attention_mask_for, concat_media, forward_keys, packed_batch)
from .wrappers import unwrap


@dataclass
class BranchOutput:
    """Per branch of each group, in input order."""
    logps: list[torch.Tensor] = field(default_factory=list)       # summed target log-prob, scalar
    token_logps: list[torch.Tensor] = field(default_factory=list)  # (n_target,)
    n_tokens: list[int] = field(default_factory=list)
    last_hidden: list[torch.Tensor] = field(default_factory=list)  # (h,) at the branch's last token


# --------------------------------------------------------------------------------------------------
# log-probs through a chunked LM head

def _chunk_logps(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return torch.gather(logits.log_softmax(-1), 1, targets[:, None]).squeeze(1)


def token_logps(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module,
                chunk: int = 1024) -> torch.Tensor:
    """log p(target_t | h_t) for (N, h) hidden states, N target ids -> (N,) float32.

    Chunks of `chunk` tokens, each recomputed in backward (activation checkpointing), so at most one
    chunk's (chunk, vocab) logits exist at a time. The head is called as a module, so whatever wraps
    it (LoRA on the head, a hook) takes part.
    """
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    outs = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s:s + chunk], targets[s:s + chunk]
        if needs_grad:
            outs.append(checkpoint(_chunk_logps, h, t, lm_head, use_reentrant=False))
        else:
            outs.append(_chunk_logps(h, t, lm_head))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


def collect_branch_outputs(hidden: torch.Tensor, prefix_lens: list[int], spans_per_row, owners_per_row, groups, lm_head,
             want_logps: bool, want_hidden: bool) -> BranchOutput:
    """Per-branch outputs from (B, L, h) hidden states of a packed or unpacked batch.

    Token 0 of a branch is predicted by the last prefix token (also in a packed row, where the previous
    position belongs to another branch); token t > 0 by the token before it.
    """
    device = hidden.device
    pred_rows, pred_cols, target_ids, owner_of = [], [], [], []
    last = {}
    for r, (spans, owners) in enumerate(zip(spans_per_row, owners_per_row)):
        for (s, e), (gi, bi) in zip(spans, owners):
            b = groups[gi].branches[bi]
            if want_logps:
                for t, is_target in enumerate(b.target):
                    if is_target:
                        pred_rows.append(r)
                        pred_cols.append(prefix_lens[r] - 1 if t == 0 else s + t - 1)
                        target_ids.append(b.ids[t])
                        owner_of.append((gi, bi))
            if want_hidden:
                last[(gi, bi)] = hidden[r, e - 1]
    out = BranchOutput()
    order = [(gi, bi) for gi, g in enumerate(groups) for bi in range(len(g.branches))]
    if want_logps:
        if pred_rows:
            h = hidden[torch.tensor(pred_rows, device=device), torch.tensor(pred_cols, device=device)]
            lp = token_logps(h, torch.tensor(target_ids, device=device), lm_head)
        else:
            lp = hidden.new_zeros(0, dtype=torch.float32)
        index: dict[tuple[int, int], list[int]] = {k: [] for k in order}
        for i, key in enumerate(owner_of):
            index[key].append(i)
        for key in order:
            tl = lp[torch.tensor(index[key], device=device, dtype=torch.long)]
            out.token_logps.append(tl)
            out.logps.append(tl.sum())
            out.n_tokens.append(len(index[key]))
    if want_hidden:
        out.last_hidden = [last[k] for k in order]
    return out


# --------------------------------------------------------------------------------------------------
# the two forwards

def backbone(model) -> torch.nn.Module:
    """The multimodal backbone (`...ForConditionalGeneration.model`) returning last hidden states."""
    return unwrap(model).model


def lm_head_of(model) -> torch.nn.Module:
    return unwrap(model).get_output_embeddings()


def packed_forward(model, spec: FamilySpec, groups: Sequence[EncodedGroup], *, logps: bool = True,
                   hidden: bool = False, max_row_tokens: int | None = None) -> BranchOutput:
    """One row per group (split under `max_row_tokens`), each branch attending to prefix + itself."""
    device = next(p for p in model.parameters()).device
    batch = packed_batch(model, spec, groups, max_row_tokens)
    rows = batch.rows
    prefixes = [r.prefix for r in rows]
    kwargs = concat_media(prefixes, forward_keys(spec, prefixes))
    kwargs.update(batch.token_keys)
    attention_mask = attention_mask_for(batch.mask, model).to(device)
    out = backbone(model)(input_ids=batch.input_ids.to(device), attention_mask=attention_mask,
                          position_ids=batch.positions.to(device), use_cache=False,
                          **{k: v.to(device) for k, v in kwargs.items()})
    return collect_branch_outputs(out.last_hidden_state, [r.prefix_len for r in rows], [r.spans for r in rows],
                    [r.owners for r in rows], groups, lm_head_of(model), logps, hidden)


def unpacked_forward(model, spec: FamilySpec, groups: Sequence[EncodedGroup], *, logps: bool = True,
                     hidden: bool = False) -> BranchOutput:
    """One ordinary right-padded row per branch; the model builds its own mask and positions."""
    device = next(p for p in model.parameters()).device
    rows, prefixes, spans, owners = [], [], [], []
    for gi, g in enumerate(groups):
        for bi, b in enumerate(g.branches):
            ids = g.prefix["input_ids"][0].tolist() + list(b.ids)
            rows.append((ids, {k: g.prefix[k][0].tolist() + [0] * len(b.ids) for k in TOKEN_LEVEL_KEYS
                               if k in g.prefix}))
            prefixes.append(g.prefix)
            spans.append([(g.prefix_len, len(ids))])
            owners.append([(gi, bi)])
    L = max(len(ids) for ids, _ in rows)
    B = len(rows)
    input_ids = torch.zeros((B, L), dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    token_keys = {k: torch.zeros((B, L), dtype=torch.long) for _, tk in rows for k in tk}
    for i, (ids, tk) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attn[i, :len(ids)] = 1
        for k, v in tk.items():
            token_keys[k][i, :len(v)] = torch.tensor(v)
    kwargs = concat_media(prefixes, forward_keys(spec, prefixes))
    kwargs.update(token_keys)
    base = backbone(model)
    if hasattr(base, "rope_deltas"):
        base.rope_deltas = None  # stale deltas from a previous generate() must not leak into this pass
    out = base(input_ids=input_ids.to(device), attention_mask=attn.to(device), use_cache=False,
               **{k: v.to(device) for k, v in kwargs.items()})
    return collect_branch_outputs(out.last_hidden_state, [groups[o[0][0]].prefix_len for o in owners], spans, owners, groups,
                    lm_head_of(model), logps, hidden)


def group_forward(model, spec: FamilySpec, groups: Sequence[EncodedGroup], *, packed: bool, logps: bool = True,
                  hidden: bool = False, max_row_tokens: int | None = None) -> BranchOutput:
    if packed:
        return packed_forward(model, spec, groups, logps=logps, hidden=hidden, max_row_tokens=max_row_tokens)
    return unpacked_forward(model, spec, groups, logps=logps, hidden=hidden)


def use_packing(spec: FamilySpec, setting: str, attn_implementation: str) -> bool:
    """`auto` packs where the family and attention kernel take a 4-D mask."""
    if setting == "unpacked":
        return False
    ok = spec.packing and attn_implementation in ("sdpa", "eager")
    if setting == "packed" and not ok:
        raise ValueError(f"model.packing=packed is not supported for {spec.name} with "
                         f"attn_implementation={attn_implementation}; use sdpa or model.packing=auto")
    return ok
