"""Critique generation from a shared prompt (`generation.generate_branches`, `RewardScorer.share_prompt`).

The group's prompt is run once (the vision tower once, `RewardScorer.prompt_embeddings`) and its K x n
critiques are decoded from its key/value states; the scoring pass starts from the same embeddings. Checked
against the per-row path (`generation.generate_after`: one full row per critique through `generate`) on
every family's tiny twin in fp32:

- greedy at batch size 1, the critiques' tokens are identical (with and without the cached embeddings);
- a batch mixing prompts of different lengths (two images, text only) and contexts of different lengths
  gives each row the tokens it gets alone (left padding never shifts a position), and every decoding
  step's logits equal a full forward of the row so far (the model's own positions and mask);
- a critique's score from the cached embeddings equals the ordinary packed forward's (relative 1e-4);
- the vision tower runs once per group for K x n critiques and their scores (K x n + n times per row);
- sampling (n_samples > 1) is reproducible from its seed.

    python -m pytest tests/test_shared_prompt.py -q
"""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mmrlhf_lite.data.groups import PreferenceGroup, Response
from mmrlhf_lite.models.families import FAMILIES
from mmrlhf_lite.models.generation import SharedPrefix, generate_after, generate_branches
from mmrlhf_lite.models.loading import load_model
from mmrlhf_lite.models.wrappers import unwrap
from mmrlhf_lite.recipe import ModelConfig
from mmrlhf_lite.reward.scorer import RewardScorer

NEW_TOKENS = 10


def _image(seed: int) -> bytes:
    img = Image.new("RGB", (64, 48), (40 * seed % 256, 90, 160))
    img.paste((200, 30 * seed % 256, 20), (8 + seed, 8, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _groups() -> list[PreferenceGroup]:
    """Prompts of different lengths: one image and a short question, one image and a long one, text only;
    responses of different lengths (the critique contexts differ in length too)."""
    def group(i, images, question, answers):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        return PreferenceGroup(id=f"g{i}", prompt=[{"role": "user", "content": content}],
                               responses=[Response(a, rank=r + 1) for r, a in enumerate(answers)], images=images)
    return [
        group(0, [_image(1)], "How many circles?", ["Two red circles.", "Three.", "There are two circles at the top left."]),
        group(1, [_image(2)], "What colour is the square in the middle of the picture, and where is the star?",
              ["Blue.", "The square is green and the star is at the bottom right corner.", "Yellow, top."]),
        group(2, [], "Say one colour.", ["Red.", "Green is a colour.", "Blue"]),
    ]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def scorer(request) -> RewardScorer:
    """A reward scorer on the family's tiny twin in fp32, LoRA B random non-zero (the adapter matters)."""
    torch.manual_seed(0)
    model, processor = load_model(ModelConfig(path=f"tiny:{request.param}:xs", load_in_4bit=False,
                                              compute_dtype="float32", device="cpu"),
                                  reward_head={"kind": "mlp", "dropout": 0.0}, trainable=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    sc = RewardScorer(model, processor, max_length=4096)
    assert sc.packed and sc.spec.name == request.param
    return sc


def _items(sc: RewardScorer, groups, embeds=None) -> list[SharedPrefix]:
    inputs = [sc.crit.generation_inputs(g) for g in groups]
    return [SharedPrefix(p, c, embeds[i] if embeds is not None else None) for i, (p, c) in enumerate(inputs)]


def _per_row(sc: RewardScorer, groups, batch_size: int) -> list[list[tuple[str, list[int]]]]:
    inputs = [sc.crit.generation_inputs(g) for g in groups]
    flat = generate_after(sc.model, sc.spec, sc.processor, [(p, c) for p, cs in inputs for c in cs],
                          end_of_turn=sc.encoder.end_of_turn, max_new_tokens=NEW_TOKENS, batch_size=batch_size,
                          return_ids=True)
    it = iter(flat)
    return [[next(it) for _ in cs] for _, cs in inputs]


def _shared(sc: RewardScorer, items, batch_size: int, **kwargs):
    return generate_branches(sc.model, sc.spec, sc.processor, items, end_of_turn=sc.encoder.end_of_turn,
                             max_new_tokens=NEW_TOKENS, batch_size=batch_size, **kwargs)


def test_greedy_batch_size_one_is_token_identical_to_per_row(scorer):
    groups = _groups()
    old = _per_row(scorer, groups, batch_size=1)
    assert sum(len(ids) for g in old for _, ids in g) >= NEW_TOKENS * 6   # real continuations, not instant stops
    assert _shared(scorer, _items(scorer, groups), batch_size=1) == old
    embeds = scorer.prompt_embeddings(groups)
    if scorer.spec.name == "qwen3_vl":     # DeepStack: vision features enter decoder layers, not cacheable
        assert embeds is None
    else:
        assert [e.shape[0] for e in embeds] == [scorer.crit.generation_inputs(g)[0]["input_ids"].shape[1]
                                                for g in groups]
        assert _shared(scorer, _items(scorer, groups, embeds), batch_size=1) == old
    # through the scorer's API, both paths
    assert scorer.generate_critiques(groups, max_new_tokens=NEW_TOKENS, batch_size=1, shared_prefix=False) == \
        scorer.generate_critiques(groups, max_new_tokens=NEW_TOKENS, batch_size=1, prompt_embeds=embeds) == \
        [[[t] for t, _ in g] for g in old]


def test_padded_batch_gives_each_row_its_own_tokens(scorer):
    """8 rows over prompts of three lengths, some contexts repeated: every row as generated alone."""
    groups = _groups()
    items = _items(scorer, groups)
    for item in items:
        item.contexts = item.contexts + item.contexts[:1]
    lengths = {item.prefix["input_ids"].shape[1] for item in items}
    assert len(lengths) == 3
    alone = _shared(scorer, items, batch_size=1)
    assert _shared(scorer, items, batch_size=8) == alone
    assert _shared(scorer, items, batch_size=5) == alone       # a prompt's rows split over two batches


def _full_forward_logits(model, prefix: dict, ids: list[int]) -> torch.Tensor:
    """The next-token logits after prefix + ids from the model's own forward of one ordinary row (its own
    positions, rope index and causal mask): the oracle of every decoding step."""
    from mmrlhf_lite.models.packing import TOKEN_LEVEL_KEYS

    base = unwrap(model).model
    if hasattr(base, "rope_deltas"):
        base.rope_deltas = None
    row = {k: v for k, v in prefix.items() if k != "input_ids"}
    for k in TOKEN_LEVEL_KEYS:
        if k in row:
            row[k] = torch.cat([row[k], torch.zeros((1, len(ids)), dtype=row[k].dtype)], 1)
    input_ids = torch.cat([prefix["input_ids"], torch.tensor([ids], dtype=torch.long)], 1)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False,
                     **row).logits[0, -1].float()


def test_every_step_logits_equal_a_full_forward(scorer, monkeypatch):
    """One batch of all rows (prompts and contexts of different lengths, left-padded): the logits each
    decoding step picks from equal those of a full forward of the row's prompt, context and tokens so far."""
    import mmrlhf_lite.models.generation as generation

    steps = []
    sample = generation._sample
    monkeypatch.setattr(generation, "_sample", lambda logits, *a: steps.append(logits.clone()) or sample(logits, *a))
    items = _items(scorer, _groups())
    out = _shared(scorer, items, batch_size=16)
    rows = [(ii, ci) for ii, item in enumerate(items) for ci in range(len(item.contexts))]
    worst = 0.0
    for b, (ii, ci) in enumerate(rows):
        ids = out[ii][ci][1]
        for t in sorted({0, len(ids) // 2, len(ids) - 1}):    # first, middle and last step of the row
            oracle = _full_forward_logits(scorer.model, items[ii].prefix, items[ii].contexts[ci] + ids[:t])
            worst = max(worst, float((steps[t][b] - oracle).abs().max()))
            assert int(oracle.argmax()) == ids[t]                  # greedy: the oracle picks it too
    assert worst < 1e-4


def test_scores_from_cached_prompt_equal_the_packed_forward(scorer):
    groups = _groups()
    crits = scorer.generate_critiques(groups, max_new_tokens=NEW_TOKENS, batch_size=8)
    plain = scorer.score_with(groups, crits, generated=True)
    embeds = scorer.prompt_embeddings(groups)
    cached = scorer.score_with(groups, crits, generated=True, prompt_embeds=embeds)
    plain, cached = [x.score for x in sum(sum(plain, []), [])], [x.score for x in sum(sum(cached, []), [])]
    for a, b in zip(plain, cached):
        assert abs(a - b) <= 1e-4 * max(abs(a), 1e-3), (a, b)
    assert len({round(x, 4) for x in plain}) > 3      # real, distinct scores


def _count_images(model):
    """Images through the Qwen vision tower (one `grid_thw` row each), counted by a forward pre-hook."""
    counted = []
    visual = unwrap(model).model.visual
    handle = visual.register_forward_pre_hook(lambda m, args, kwargs: counted.append(int(kwargs["grid_thw"].shape[0])),
                                              with_kwargs=True)
    return counted, handle


@pytest.mark.parametrize("share_prompt", [True, False])
def test_vision_tower_runs_once_per_group_for_its_critiques_and_scores(share_prompt):
    torch.manual_seed(0)
    model, processor = load_model(ModelConfig(path="tiny:qwen2_vl:xs", load_in_4bit=False, compute_dtype="float32",
                                              device="cpu"), reward_head={"kind": "mlp", "dropout": 0.0},
                                  trainable=False)
    sc = RewardScorer(model, processor, share_prompt=share_prompt)
    groups = [g for g in _groups() if g.images]
    k, n = len(groups[0].responses), 2
    counted, handle = _count_images(model)
    try:
        scored = sc.score_groups(groups, "generate", n_samples=n, max_new_tokens=4, batch_size=8)
    finally:
        handle.remove()
    assert all(len(sr.scores) == n for g in scored for sr in g)
    # shared: once per group; per row: each of the K x n critique rows, then each sample's scoring pass
    assert sum(counted) == (len(groups) if share_prompt else len(groups) * (k * n + n))


def test_sampling_is_reproducible_from_its_seed():
    torch.manual_seed(0)
    model, processor = load_model(ModelConfig(path="tiny:qwen2_vl:xs", load_in_4bit=False, compute_dtype="float32",
                                              device="cpu"), reward_head={"kind": "mlp", "dropout": 0.0},
                                  trainable=False)
    sc = RewardScorer(model, processor)
    groups = _groups()[:1]
    a = sc.generate_critiques(groups, n_samples=3, temperature=1.0, max_new_tokens=8, seed=5)
    b = sc.generate_critiques(groups, n_samples=3, temperature=1.0, max_new_tokens=8, seed=5)
    assert a == b
    assert any(len(set(samples)) > 1 for samples in a[0])     # sampled, not greedy
