"""A group of K responses as one packed sequence: `[prompt with image][r1][r2]...[rK]`.

DESIGN.md, "A group is one packed sequence": the prompt and its image tokens are run once per group,
not once per response. Each response ("branch") attends to the prompt and to itself only (4-D boolean
mask; 0/-inf floats for eager attention, which adds the mask to the scores), and its positions continue
from the prompt's end (3-D M-RoPE ids from the model's own rope-index function on the prompt).
Log-probs are gathered on branch target tokens only, through a chunked LM head: full-vocabulary
logits are never built for image or prompt positions.

The unpacked path (one ordinary row per branch, the model computing masks and positions itself) is
the fallback for families whose attention cannot take the mask, and the test oracle.

While everything before the decoder is frozen (no vision LoRA), a prompt's decoder input embeddings
(image features merged in) are the same in every pass: `prefix_embeddings` computes them once (e.g. in
the reference pass) and `packed_forward_embedded` starts from them, so the vision tower does not run
again (tests/test_bench.py checks it against `packed_forward`).

    python -m pytest tests/test_packing.py -q
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .families import FamilySpec, prompt_positions
from .loading import unwrap

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


@dataclass
class BranchOutput:
    """Per branch of each group, in input order."""
    logps: list[torch.Tensor] = field(default_factory=list)       # summed target log-prob, scalar
    token_logps: list[torch.Tensor] = field(default_factory=list)  # (n_target,)
    n_tokens: list[int] = field(default_factory=list)
    last_hidden: list[torch.Tensor] = field(default_factory=list)  # (h,) at the branch's last token


# --------------------------------------------------------------------------------------------------
# row building

@dataclass
class _Row:
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


def _build_row(model, spec: FamilySpec, g: EncodedGroup, gi: int, branch_idx: list[int]) -> _Row:
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
    return _Row(ids=ids, token_keys=token_keys, positions=torch.cat(pos_parts, dim=1), spans=spans,
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


def _attention_mask(mask: torch.Tensor, model) -> torch.Tensor:
    """The packed mask in the form the decoder's attention takes: SDPA (and unsloth) take the boolean
    mask as is; eager attention adds the mask to the scores, so it needs 0 / dtype-min floats in the
    hidden-state dtype (a boolean mask would be added as 0/1 and mask nothing)."""
    base = unwrap(model)
    if getattr(base.config.get_text_config(), "_attn_implementation", None) != "eager":
        return mask
    dtype = base.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def _cat_media(prefixes: list[dict], keys: Sequence[str]) -> dict[str, torch.Tensor]:
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


def _forward_keys(spec: FamilySpec, prefixes: list[dict]) -> list[str]:
    keys = list(spec.forward_keys)
    for p in prefixes:
        for k in p:
            if k not in keys and k not in ("input_ids", "attention_mask"):
                keys.append(k)
    return keys


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


def _collect(hidden: torch.Tensor, prefix_lens: list[int], spans_per_row, owners_per_row, groups, lm_head,
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


@dataclass
class _PackedBatch:
    rows: list[_Row]
    input_ids: torch.Tensor          # (B, L)
    positions: torch.Tensor          # (3, B, L) for M-RoPE families, else (B, L)
    mask: torch.Tensor               # (B, 1, L, L) boolean, True = may attend
    token_keys: dict[str, torch.Tensor]


def _packed_batch(model, spec: FamilySpec, groups: Sequence[EncodedGroup], max_row_tokens: int | None) -> _PackedBatch:
    plan = plan_rows(groups, max_row_tokens)
    rows = [_build_row(model, spec, groups[gi], gi, bidx) for ((gi, bidx),) in plan]
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
    return _PackedBatch(rows=rows, input_ids=input_ids, positions=positions if spec.mrope else positions[0],
                        mask=mask, token_keys=token_keys)


def packed_forward(model, spec: FamilySpec, groups: Sequence[EncodedGroup], *, logps: bool = True,
                   hidden: bool = False, max_row_tokens: int | None = None) -> BranchOutput:
    """One row per group (split under `max_row_tokens`), each branch attending to prefix + itself."""
    device = next(p for p in model.parameters()).device
    batch = _packed_batch(model, spec, groups, max_row_tokens)
    rows = batch.rows
    prefixes = [r.prefix for r in rows]
    kwargs = _cat_media(prefixes, _forward_keys(spec, prefixes))
    kwargs.update(batch.token_keys)
    attention_mask = _attention_mask(batch.mask, model).to(device)
    out = backbone(model)(input_ids=batch.input_ids.to(device), attention_mask=attention_mask,
                          position_ids=batch.positions.to(device), use_cache=False,
                          **{k: v.to(device) for k, v in kwargs.items()})
    return _collect(out.last_hidden_state, [r.prefix_len for r in rows], [r.spans for r in rows],
                    [r.owners for r in rows], groups, lm_head_of(model), logps, hidden)


# --------------------------------------------------------------------------------------------------
# frozen vision tower: compute the prompt's input embeddings once, reuse them

class _Captured(Exception):
    pass


class MediaNotCacheable(ValueError):
    """The prompt's embeddings cannot be reused: something before the decoder trains, or the family feeds
    vision features to the decoder layers in another way than through its input embeddings."""


def _media_trainable(model, spec: FamilySpec) -> list[str]:
    base = unwrap(model)
    prefixes = tuple(p + "." for p in spec.vision_prefixes)
    names = [n for n, p in base.named_parameters() if p.requires_grad and n.startswith(prefixes)]
    names += [f"input embeddings ({n})" for n, p in base.get_input_embeddings().named_parameters() if p.requires_grad]
    return names


def prefix_embeddings(model, spec: FamilySpec, groups: Sequence[EncodedGroup]) -> list[torch.Tensor]:
    """Per group, the decoder's input embeddings of its prefix, image features merged in: (prefix_len, h).

    They are what the language model receives for the prompt, so a later pass can start from them and skip
    the vision tower (and projector). This is exact only while everything before the decoder is frozen
    (no vision LoRA, `model.lora_vision=false`; embeddings not trained): checked, else `MediaNotCacheable`.
    Computed with the model's own forward, stopped at the decoder's input, without gradients.
    """
    trainable = _media_trainable(model, spec)
    if trainable:
        raise MediaNotCacheable(f"{len(trainable)} parameter(s) before the decoder train (e.g. {trainable[0]}): "
                                "their output changes every step, so it cannot be cached")
    base = unwrap(model)
    decoder = base.get_submodule(spec.text_prefix)
    device = next(p for p in model.parameters()).device
    captured: dict = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        raise _Captured

    handle = decoder.register_forward_pre_hook(grab, with_kwargs=True)
    out = []
    try:
        with torch.no_grad():
            for g in groups:
                captured.clear()
                prefix = g.prefix
                keys = _forward_keys(spec, [prefix])
                kwargs = {k: v.to(device) for k, v in _cat_media([prefix], keys).items()}
                kwargs.update({k: prefix[k].to(device) for k in TOKEN_LEVEL_KEYS if k in prefix})
                base_positions = prompt_positions(base, spec, prefix)
                try:
                    backbone(model)(input_ids=prefix["input_ids"].to(device), position_ids=base_positions.to(device),
                                    use_cache=False, **kwargs)
                except _Captured:
                    pass
                embeds = captured.get("inputs_embeds")
                if embeds is None:
                    raise MediaNotCacheable(f"{spec.name}: the decoder was not called with inputs_embeds")
                extra = [k for k, v in captured.items() if isinstance(v, (torch.Tensor, list, tuple)) and v is not None
                         and k not in ("inputs_embeds", "position_ids", "attention_mask", "input_ids",
                                       "past_key_values", "cache_position")]
                if extra:
                    raise MediaNotCacheable(f"{spec.name} passes {extra} to its decoder besides the input embeddings "
                                            "(e.g. DeepStack vision features): not cacheable")
                out.append(embeds[0].detach())
    finally:
        handle.remove()
    return out


def packed_forward_embedded(model, spec: FamilySpec, groups: Sequence[EncodedGroup],
                            prefix_embeds: Sequence[torch.Tensor], *, logps: bool = True, hidden: bool = False,
                            max_row_tokens: int | None = None) -> BranchOutput:
    """`packed_forward` with each group's prefix given as input embeddings (from `prefix_embeddings`): the
    vision tower and projector do not run. Branch tokens go through the model's embedding layer as usual."""
    if len(prefix_embeds) != len(groups):
        raise ValueError("one prefix embedding tensor per group")
    device = next(p for p in model.parameters()).device
    batch = _packed_batch(model, spec, groups, max_row_tokens)
    rows = batch.rows
    embed = unwrap(model).get_input_embeddings()
    input_ids = batch.input_ids.to(device)
    token_embeds = embed(input_ids)                                                  # (B, L, h)
    cached = torch.zeros_like(token_embeds, requires_grad=False)
    is_prefix = torch.zeros(input_ids.shape, dtype=torch.bool, device=device)         # (B, L)
    for i, r in enumerate(rows):
        gi = r.owners[0][0]
        e = prefix_embeds[gi]
        if e.shape[0] != r.prefix_len:
            raise ValueError(f"group {gi}: cached prefix has {e.shape[0]} positions, the prefix {r.prefix_len}")
        cached[i, :r.prefix_len] = e.to(device=device, dtype=token_embeds.dtype)
        is_prefix[i, :r.prefix_len] = True
    inputs_embeds = torch.where(is_prefix[..., None], cached, token_embeds)
    attention_mask = _attention_mask(batch.mask, model).to(device)
    out = backbone(model)(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=batch.positions.to(device), use_cache=False)
    return _collect(out.last_hidden_state, [r.prefix_len for r in rows], [r.spans for r in rows],
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
    kwargs = _cat_media(prefixes, _forward_keys(spec, prefixes))
    kwargs.update(token_keys)
    base = backbone(model)
    if hasattr(base, "rope_deltas"):
        base.rope_deltas = None  # stale deltas from a previous generate() must not leak into this pass
    out = base(input_ids=input_ids.to(device), attention_mask=attn.to(device), use_cache=False,
               **{k: v.to(device) for k, v in kwargs.items()})
    return _collect(out.last_hidden_state, [groups[o[0][0]].prefix_len for o in owners], spans, owners, groups,
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

