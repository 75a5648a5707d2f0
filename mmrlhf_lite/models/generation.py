"""Batched generation after an encoded prefix (+ optional context tokens): critiques for the reward
model, answers for the policy win-rate.

Two paths. `generate_after`: one left-padded row per (prefix, context) through `generate`, each row with
its own image inputs (answers; critiques where groups are not packed). `generate_branches`: a prompt run
once, its key/value states shared by all the branches decoded after it (a group's K x n critiques:
DESIGN.md's "encode the image once per group" applied to generation); tests/test_shared_prompt.py holds it
token-identical to `generate_after` (greedy, one row at a time) on every family.

    python -m mmrlhf_lite.evaluate reward runs/demo --data runs/demo/data/demo/demo.jsonl --critique generate
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .families import FamilySpec, prompt_positions
from .logprobs import backbone
from .packing import TOKEN_LEVEL_KEYS, concat_media, forward_keys
from .reward_score import cut_reply, stop_ids
from .wrappers import unwrap


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


# --------------------------------------------------------------------------------------------------
# branches decoded from one shared prompt

@dataclass
class SharedPrefix:
    """One prompt (processor outputs, batch 1) and the branches to generate after it: each branch continues
    after the prompt with its own context ids (e.g. the response a critique judges), then generates.
    `embeds`: the prompt's decoder input embeddings (`vision_cache.prefix_embeddings`), so that the
    prefill does not run the vision tower again; None runs the model's own forward on the prompt."""
    prefix: dict
    contexts: list[list[int]]
    embeds: torch.Tensor | None = None


def _prefill_prefix(model, spec: FamilySpec, item: SharedPrefix, device) -> tuple[list, int]:
    """The prompt's key/value states, one (keys, values) pair of (1, kv heads, P, d) per decoder layer, and
    the position the first token after it takes (`prompt_positions(...).max() + 1`)."""
    from transformers import DynamicCache

    base = unwrap(model)
    prefix = item.prefix
    positions = prompt_positions(base, spec, prefix).to(device)
    cache = DynamicCache(config=base.config.get_text_config())
    kwargs: dict = {}
    if item.embeds is not None:
        kwargs["inputs_embeds"] = item.embeds.to(device)[None]
    else:
        media = concat_media([prefix], forward_keys(spec, [prefix]))
        kwargs.update({k: v.to(device) for k, v in media.items()})
        kwargs.update({k: prefix[k].to(device) for k in TOKEN_LEVEL_KEYS if k in prefix})
        kwargs["input_ids"] = prefix["input_ids"].to(device)
    backbone(model)(position_ids=positions, past_key_values=cache, use_cache=True, **kwargs)
    states = [(layer.keys, layer.values) for layer in cache.layers]
    return states, int(positions.max()) + 1


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: greedy, or sampled from softmax(logits / temperature) (the
    whole vocabulary, as `generate_after` asks `generate` for: no top-k, no top-p)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1).squeeze(1)


@torch.no_grad()
def generate_branches(model, spec: FamilySpec, processor, items: Sequence[SharedPrefix], *, end_of_turn: str,
                      max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, batch_size: int = 8,
                      seed: int | None = None) -> list[list[tuple[str, list[int]]]]:
    """For each item and each of its contexts: (decoded continuation cut at the end of turn, generated ids
    up to and including the stop token when one was generated), as `generate_after(return_ids=True)`.

    The prompt is run once per item (vision tower included, unless `embeds` are given) and its key/value
    states are shared by every branch: a batch of `batch_size` branch rows holds each row's prompt states
    left-padded to the longest prompt, then the row's context and its generated tokens. Positions are
    explicit (`prompt_positions` for the prompt, then consecutive from its end in every M-RoPE axis, as
    `packing.build_row` gives a packed branch), so padding never shifts a row's positions. Needs a family
    whose decoder takes explicit positions with a key/value cache (`FamilySpec.packing`).
    """
    from transformers import DynamicCache

    device = next(p for p in model.parameters()).device
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    stop_list = stop_ids(tok, end_of_turn)
    stop = torch.tensor(stop_list, device=device)
    if seed is not None:
        torch.manual_seed(seed)
    head = unwrap(model).get_output_embeddings()
    rows = [(ii, ci) for ii, item in enumerate(items) for ci in range(len(item.contexts))]
    remaining = {ii: len(item.contexts) for ii, item in enumerate(items)}
    prefilled: dict[int, tuple[list, int]] = {}
    out: list[list] = [[None] * len(item.contexts) for item in items]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            for ii, _ in chunk:
                if ii not in prefilled:
                    prefilled[ii] = _prefill_prefix(model, spec, items[ii], device)
            B = len(chunk)
            prompt_len = [prefilled[ii][0][0][0].shape[2] for ii, _ in chunk]
            P = max(prompt_len)
            contexts = [items[ii].contexts[ci] for ii, ci in chunk]
            C = max(len(c) for c in contexts)
            cache = DynamicCache(config=unwrap(model).config.get_text_config())
            for layer in range(len(prefilled[chunk[0][0]][0])):
                keys, values = [], []
                for (ii, _), p in zip(chunk, prompt_len):
                    k, v = prefilled[ii][0][layer]
                    keys.append(F.pad(k, (0, 0, P - p, 0)))                       # (1, kv heads, P, d)
                    values.append(F.pad(v, (0, 0, P - p, 0)))
                cache.update(torch.cat(keys), torch.cat(values), layer)
            attention = torch.zeros((B, P + C), dtype=torch.long, device=device)
            input_ids = torch.full((B, C), pad_id, dtype=torch.long, device=device)
            positions = torch.zeros((B, C), dtype=torch.long, device=device)
            next_pos = torch.zeros(B, dtype=torch.long, device=device)
            for b, ((ii, _), p, ctx) in enumerate(zip(chunk, prompt_len, contexts)):
                attention[b, P - p:P] = 1
                attention[b, P + C - len(ctx):] = 1
                input_ids[b, C - len(ctx):] = torch.tensor(ctx, device=device)
                start = prefilled[ii][1]
                positions[b, C - len(ctx):] = torch.arange(start, start + len(ctx), device=device)
                next_pos[b] = start + len(ctx)

            def step(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
                pos = pos[None].expand(3, -1, -1) if spec.mrope else pos                 # (3, B, L) for M-RoPE
                hidden = backbone(model)(input_ids=ids, attention_mask=attention, position_ids=pos,
                                         past_key_values=cache, use_cache=True).last_hidden_state
                return head(hidden[:, -1]).float()                                       # (B, V)

            logits = step(input_ids, positions)
            generated = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
            done = torch.zeros(B, dtype=torch.bool, device=device)
            for t in range(max_new_tokens):
                nxt = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long),
                                  _sample(logits, do_sample, temperature))
                generated[:, t] = nxt
                done |= torch.isin(nxt, stop)
                if bool(done.all()) or t + 1 == max_new_tokens:
                    break
                attention = torch.cat([attention, torch.ones((B, 1), dtype=torch.long, device=device)], dim=1)
                logits = step(nxt[:, None], (next_pos + t)[:, None])
            for (ii, ci), row in zip(chunk, generated.tolist()):
                out[ii][ci] = cut_reply(tok, row, stop_list)   # the score function's decoding rule
                remaining[ii] -= 1
                if not remaining[ii]:
                    del prefilled[ii]   # every branch of this prompt is done: free its states
            del cache
    finally:
        if was_training:
            model.train()
    return out
