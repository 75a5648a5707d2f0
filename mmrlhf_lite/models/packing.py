"""A group of K responses as one packed row: `[prompt with image][r1][r2]...[rK]`, built here.

DESIGN.md, "A group is one packed sequence": the prompt and its image tokens are run once per group,
not once per response. Each response ("branch") attends to the prompt and to itself only (4-D boolean
mask; 0/-inf floats for eager attention, which adds the mask to the scores), and its positions continue
from the prompt's end (3-D M-RoPE ids from the model's own rope-index function on the prompt).
This module builds the rows, masks, positions and media inputs; models/logprobs.py runs them through the
model and gathers log-probs; models/vision_cache.py starts a pass from cached prompt embeddings.

    python -m pytest tests/test_packing.py -q
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .families import FamilySpec, prompt_positions
from .wrappers import unwrap

TOKEN_LEVEL_KEYS = ("mm_token_type_ids", "token_type_ids")


@dataclass
class Branch:
    """Tokens that follow the shared prefix. `target[i]` marks tokens whose log-prob is gathered
    (a response for DPO, a critique for the reward model's LM loss)."""
    ids: list[int]
    target: list[bool]

    def __post_init__(self):
        if len(self.ids) != len(self.target):
            raise ValueError("branch ids and target mask differ in length")
        if not self.ids:
            raise ValueError("empty branch")


@dataclass
class EncodedGroup:
    """A prefix (processor outputs for batch 1, image inputs included) and its branches."""
    prefix: dict[str, torch.Tensor]
    branches: list[Branch]
    group_id: str = ""
    source: str = ""

    @property
    def prefix_len(self) -> int:
        return int(self.prefix["input_ids"].shape[1])

    def lengths(self) -> list[int]:
        return [self.prefix_len + len(b.ids) for b in self.branches]

    def packed_len(self) -> int:
        return self.prefix_len + sum(len(b.ids) for b in self.branches)


# --------------------------------------------------------------------------------------------------
# row building

@dataclass
class PackedRow:
    ids: list[int]
    token_keys: dict[str, list[int]]
    positions: torch.Tensor          # (3, L) or (1, L)
    spans: list[tuple[int, int]]     # branch [start, end) in the row
    prefix_len: int
    prefix: dict[str, torch.Tensor]
    owners: list[tuple[int, int]]    # (group index, branch index) for each span


def plan_rows(groups: Sequence[EncodedGroup], max_row_tokens: int | None) -> list[list[tuple[int, list[int]]]]:
    """Split each group's branches over as few rows as fit `max_row_tokens` (prefix repeated per row).

    Returns, per row, [(group index, [branch indices])]. One group per row: rows of different groups
    are batched, never concatenated, so no prefix ever attends to another group.
    """
    rows = []
    for gi, g in enumerate(groups):
        current, used = [], g.prefix_len
        for bi, b in enumerate(g.branches):
            n = len(b.ids)
            if current and max_row_tokens is not None and used + n > max_row_tokens:
                rows.append([(gi, current)])
                current, used = [], g.prefix_len
            current.append(bi)
            used += n
        if current:
            rows.append([(gi, current)])
    return rows


def build_row(model, spec: FamilySpec, g: EncodedGroup, gi: int, branch_idx: list[int]) -> PackedRow:
    base = unwrap(model)
    prefix = g.prefix
    ids = prefix["input_ids"][0].tolist()
    pos_prefix = prompt_positions(base, spec, prefix)[:, 0] if spec.mrope else prompt_positions(base, spec, prefix)
    nxt = int(pos_prefix.max()) + 1
    token_keys = {k: prefix[k][0].tolist() for k in TOKEN_LEVEL_KEYS if k in prefix}
    pos_parts, spans, owners = [pos_prefix.to(torch.long).cpu()], [], []
    for bi in branch_idx:
        b = g.branches[bi]
        start = len(ids)
        ids.extend(b.ids)
        for k in token_keys:
            token_keys[k].extend([0] * len(b.ids))
        p = torch.arange(nxt, nxt + len(b.ids), dtype=torch.long)
        pos_parts.append(p.unsqueeze(0).expand(pos_prefix.shape[0], -1))
        spans.append((start, len(ids)))
        owners.append((gi, bi))
    return PackedRow(ids=ids, token_keys=token_keys, positions=torch.cat(pos_parts, dim=1), spans=spans,
                prefix_len=g.prefix_len, prefix=prefix, owners=owners)


def packed_mask(prefix_len: int, spans: list[tuple[int, int]], length: int) -> torch.Tensor:
    """(L, L) boolean, True = may attend: causal prefix; each branch sees the prefix and itself
    (causally); padding sees only itself (a fully masked row would give NaN in SDPA)."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask[:prefix_len, :prefix_len] = causal[:prefix_len, :prefix_len]
    for s, e in spans:
        mask[s:e, :prefix_len] = True
        mask[s:e, s:e] = causal[: e - s, : e - s]
    used = spans[-1][1] if spans else prefix_len
    idx = torch.arange(used, length)
    mask[idx, idx] = True
    return mask


def attention_mask_for(mask: torch.Tensor, model) -> torch.Tensor:
    """The packed mask in the form the decoder's attention takes: SDPA (and unsloth) take the boolean
    mask as is; eager attention adds the mask to the scores, so it needs 0 / dtype-min floats in the
    hidden-state dtype (a boolean mask would be added as 0/1 and mask nothing)."""
    base = unwrap(model)
    if getattr(base.config.get_text_config(), "_attn_implementation", None) != "eager":
        return mask
    dtype = base.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def concat_media(prefixes: list[dict], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    out = {}
    for k in keys:
        if k in TOKEN_LEVEL_KEYS:
            continue
        vals = [p[k] for p in prefixes if k in p and p[k] is not None]
        if vals:
            out[k] = _cat_padded(vals)
    return out


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0, zero-padding the other dims to the largest, as the processor pads a batch.

    LLaVA-OV's pixel_values (images, anyres tiles, 3, H, W) differ in tile count with the aspect ratio,
    Idefics3's (rows, images, 3, H, W) in image count; both models drop all-zero padding tiles/images.
    """
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = []
        for d in reversed(range(1, t.dim())):
            pad += [0, shape[d - 1] - t.shape[d]]
        padded.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=0)


def forward_keys(spec: FamilySpec, prefixes: list[dict]) -> list[str]:
    keys = list(spec.forward_keys)
    for p in prefixes:
        for k in p:
            if k not in keys and k not in ("input_ids", "attention_mask"):
                keys.append(k)
    return keys


@dataclass
class PackedBatch:
    rows: list[PackedRow]
    input_ids: torch.Tensor          # (B, L)
    positions: torch.Tensor          # (3, B, L) for M-RoPE families, else (B, L)
    mask: torch.Tensor               # (B, 1, L, L) boolean, True = may attend
    token_keys: dict[str, torch.Tensor]


def packed_batch(model, spec: FamilySpec, groups: Sequence[EncodedGroup], max_row_tokens: int | None) -> PackedBatch:
    plan = plan_rows(groups, max_row_tokens)
    rows = [build_row(model, spec, groups[gi], gi, bidx) for ((gi, bidx),) in plan]
    L = max(len(r.ids) for r in rows)
    pad_id = 0
    B = len(rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    n_pos = rows[0].positions.shape[0]
    positions = torch.zeros((n_pos, B, L), dtype=torch.long)
    mask = torch.zeros((B, 1, L, L), dtype=torch.bool)
    token_keys = {k: torch.zeros((B, L), dtype=torch.long) for r in rows for k in r.token_keys}
    for i, r in enumerate(rows):
        n = len(r.ids)
        input_ids[i, :n] = torch.tensor(r.ids)
        positions[:, i, :n] = r.positions
        mask[i, 0] = packed_mask(r.prefix_len, r.spans, L)
        for k, v in r.token_keys.items():
            token_keys[k][i, :n] = torch.tensor(v)
    return PackedBatch(rows=rows, input_ids=input_ids, positions=positions if spec.mrope else positions[0],
                        mask=mask, token_keys=token_keys)
