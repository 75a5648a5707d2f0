"""A frozen vision tower's work done once: the prompt's decoder input embeddings (image features merged in)
computed by `prefix_embeddings` and reused by `packed_forward_embedded`, so a later pass over the same
prompt does not run the vision tower and projector again.

Exact only while everything before the decoder is frozen (no vision LoRA, embeddings not trained):
checked, else `MediaNotCacheable`. tests/test_bench.py checks it against `logprobs.packed_forward`.

    python -m pytest tests/test_bench.py -q -k cache
"""
from __future__ import annotations

from typing import Sequence

import torch

from .families import FamilySpec, prompt_positions
from .logprobs import BranchOutput, backbone, collect_branch_outputs, lm_head_of
from .packing import TOKEN_LEVEL_KEYS, EncodedGroup, attention_mask_for, concat_media, forward_keys, packed_batch
from .wrappers import unwrap


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
                keys = forward_keys(spec, [prefix])
                kwargs = {k: v.to(device) for k, v in concat_media([prefix], keys).items()}
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
    batch = packed_batch(model, spec, groups, max_row_tokens)
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
    attention_mask = attention_mask_for(batch.mask, model).to(device)
    out = backbone(model)(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=batch.positions.to(device), use_cache=False)
    return collect_branch_outputs(out.last_hidden_state, [r.prefix_len for r in rows], [r.spans for r in rows],
                    [r.owners for r in rows], groups, lm_head_of(model), logps, hidden)
