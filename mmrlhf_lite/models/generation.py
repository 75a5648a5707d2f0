"""Batched generation after an encoded prefix (+ optional context tokens): critiques for the reward
model, answers for the policy win-rate. Rows are left-padded; each row carries its own image inputs.

    python -m mmrlhf_lite.evaluate reward runs/demo --data runs/demo/data/demo/demo.jsonl --critique generate
"""
from __future__ import annotations

from typing import Sequence

import torch

from .families import FamilySpec
from .packing import TOKEN_LEVEL_KEYS, concat_media, forward_keys
from .reward_score import cut_reply, stop_ids


@torch.no_grad()
def generate_after(model, spec: FamilySpec, processor, prompts: Sequence[tuple[dict, list[int]]], *,
                   end_of_turn: str, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                   top_p: float = 1.0, batch_size: int = 8, seed: int | None = None, return_ids: bool = False) -> list:
    """For each (prefix inputs, context ids): the decoded continuation, cut at the end of turn.
    `top_p` < 1: nucleus sampling (with `do_sample`). `return_ids`: (text, generated ids up to and including the
    stop token when one was generated) instead."""
    device = next(p for p in model.parameters()).device
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    stop = stop_ids(tok, end_of_turn)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            rows = [(p["input_ids"][0].tolist() + list(ctx), p) for p, ctx in chunk]
            L = max(len(ids) for ids, _ in rows)
            B = len(rows)
            input_ids = torch.full((B, L), pad_id, dtype=torch.long)
            attn = torch.zeros((B, L), dtype=torch.long)
            token_keys = {k: torch.zeros((B, L), dtype=torch.long) for k in TOKEN_LEVEL_KEYS if k in rows[0][1]}
            for i, (ids, p) in enumerate(rows):
                input_ids[i, L - len(ids):] = torch.tensor(ids)
                attn[i, L - len(ids):] = 1
                for k in token_keys:
                    v = p[k][0].tolist()
                    token_keys[k][i, L - len(ids):L - len(ids) + len(v)] = torch.tensor(v)
            prefixes = [p for _, p in rows]
            media = concat_media(prefixes, forward_keys(spec, prefixes))
            kwargs = {k: v.to(device) for k, v in {**media, **token_keys}.items()}
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device), **kwargs,
                                 max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature if do_sample else None,
                                 top_p=top_p if do_sample and top_p < 1 else None, top_k=None,
                                 eos_token_id=stop, pad_token_id=pad_id, use_cache=True)
            for row in gen[:, L:].tolist():
                text, ids = cut_reply(tok, row, stop)  # the score function's decoding rule
                texts.append((text, ids) if return_ids else text)
    finally:
        if was_training:
            model.train()
    return texts
