"""Packed group forward == the unpacked oracle, for every family in the table.

A group `[prompt with image][r1]..[rK]` with the 4-D branch mask and continued positions must give
each response the log-probs, gradients and last hidden state it gets as an ordinary row of its own.
Checked on each family's tiny xs twin in fp32, with LoRA B matrices set non-zero so that the adapter
takes part, on a batch that mixes image, two-image and text-only groups whose responses run from 1
to 40 tokens (one with a partial target mask, as a critique has), packed whole and split over rows.

    python -m pytest tests/test_packing.py -q
"""
from __future__ import annotations

import random

import pytest
import torch

from mmrlhf_lite.models.encoding import GroupEncoder
from mmrlhf_lite.models.families import FAMILIES
from mmrlhf_lite.models.loading import load_model
from mmrlhf_lite.models.logprobs import group_forward, lm_head_of, token_logps
from mmrlhf_lite.models.packing import Branch, EncodedGroup, packed_mask, plan_rows
from mmrlhf_lite.recipe import ModelConfig

TOL = 1e-4
FILLER = ("the red circle is at the top left of the image and a blue square is below it there are three "
          "green triangles on the right side and one yellow star in the center of the picture")

# (image sizes (w, h), question, branch lengths); the lengths include a 1-token and a 40-token response
GROUP_LAYOUT = (
    ([(100, 80)], "What colour is the circle?", (1, 40, 7)),
    ([], "How many shapes are there?", (12, 1)),
    ([(40, 90), (64, 48)], "Compare the two images.", (3, 25, 1, 40, 9)),
    ([(40, 90)], "Where is the star?", (2, 33, 5, 18)),
)
PARTIAL = (2, 1)  # (group, branch) whose first 10 tokens are context, not target (a critique's prefix)


def _image(size: tuple[int, int], seed: int):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    ImageDraw.Draw(img).rectangle((2, 2, size[0] // 2, size[1] // 3), fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def _groups(encoder: GroupEncoder) -> list[EncodedGroup]:
    """The GROUP_LAYOUT groups, prefixes through the family's processor and chat template."""
    filler = encoder.tokens(FILLER * 2)
    assert len(filler) >= 3 * 4 + 40
    groups = []
    for gi, (sizes, question, lengths) in enumerate(GROUP_LAYOUT):
        parts = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": question}]
        images = [_image(s, 10 * gi + i) for i, s in enumerate(sizes)]
        prefix = encoder.encode_prefix([{"role": "user", "content": parts}], images)
        branches = []
        for bi, n in enumerate(lengths):
            ids = filler[3 * bi:3 * bi + n]
            target = [i >= 10 for i in range(n)] if (gi, bi) == PARTIAL else [True] * n
            branches.append(Branch(ids=ids, target=target))
        groups.append(EncodedGroup(prefix=prefix, branches=branches, group_id=str(gi)))
    return groups


def _lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def _run(model, spec, groups, packed: bool, weights, directions, **kwargs):
    """Log-probs, hidden states and LoRA gradients of sum(w * logp / n_tokens) + sum(v . h_last).

    Per-token means and unit directions v keep the gradients O(1) (plain sums gave entries near 80,
    where fp32 rounding alone is ~1e-5), so the absolute tolerance is a relative one too.
    """
    model.zero_grad(set_to_none=True)
    out = group_forward(model, spec, groups, packed=packed, hidden=True, **kwargs)
    loss = sum(w * lp / n for w, lp, n in zip(weights, out.logps, out.n_tokens)) + sum(
        (v * h).sum() for v, h in zip(directions, out.last_hidden))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in _lora_params(model).items()}
    return out, grads


def fp32_twin(family: str, lora_vision: bool = False):
    """(model, spec, groups) of a family's tiny xs twin in fp32 and train mode, LoRA B random non-zero (so
    the adapters change the forward and get gradients)."""
    torch.manual_seed(0)
    model, processor = load_model(ModelConfig(path=f"tiny:{family}:xs", load_in_4bit=False, compute_dtype="float32",
                                              device="cpu", lora_vision=lora_vision))
    model.train()
    with torch.no_grad():
        for name, p in _lora_params(model).items():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    spec = model.mmrlhf.family
    return model, spec, _groups(GroupEncoder(processor, spec))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(model, spec, groups) of one family's tiny xs twin in fp32, LoRA B random non-zero."""
    model, spec, groups = fp32_twin(request.param)
    assert spec.name == request.param
    return model, spec, groups


@pytest.fixture(scope="module")
def oracle(family):
    """The unpacked pass of the mixed batch, with the random loss weights both passes share."""
    model, spec, groups = family
    n = sum(len(g.branches) for g in groups)
    gen = torch.Generator().manual_seed(1)
    weights = torch.rand(n, generator=gen) + 0.5
    hidden_size = model.config.get_text_config().hidden_size
    directions = torch.nn.functional.normalize(torch.randn(n, hidden_size, generator=gen), dim=-1)
    out, grads = _run(model, spec, groups, False, weights, directions)
    return out, grads, weights, directions


def _assert_same(packed, grads_packed, oracle_out, grads_oracle) -> dict[str, float]:
    for a, b in zip(packed.token_logps, oracle_out.token_logps):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    assert packed.n_tokens == oracle_out.n_tokens
    logp = max((a - b).abs().item() for a, b in zip(packed.logps, oracle_out.logps))
    hidden = max((a - b).abs().max().item() for a, b in zip(packed.last_hidden, oracle_out.last_hidden))
    grad = max((grads_packed[n] - grads_oracle[n]).abs().max().item() for n in grads_oracle)
    assert logp < TOL and hidden < TOL and grad < TOL, (logp, hidden, grad)
    assert set(grads_packed) == set(grads_oracle)
    return {"logp": logp, "hidden": hidden, "grad": grad}


def test_batch_covers_the_cases(family, oracle):
    """The batch is what the docstring claims: 1- to 40-token responses, K = 2..5, real gradients."""
    _, _, groups = family
    out, grads, _, _ = oracle
    lengths = [len(b.ids) for g in groups for b in g.branches]
    assert min(lengths) == 1 and max(lengths) == 40
    assert sorted(len(g.branches) for g in groups) == [2, 3, 4, 5]
    assert ["pixel_values" in g.prefix for g in groups] == [True, False, True, True]
    assert out.n_tokens == [n - 10 if (gi, bi) == PARTIAL else n for gi, (_, _, ls) in enumerate(GROUP_LAYOUT)
                            for bi, n in enumerate(ls)]
    assert all(torch.isfinite(lp) and lp < 0 for lp in out.logps)
    assert max(g.abs().max().item() for g in grads.values()) > 1e-2  # the comparison is not of zeros


def test_packed_matches_unpacked(family, oracle, record_property):
    model, spec, groups = family
    out, grads, weights, directions = oracle
    packed, grads_packed = _run(model, spec, groups, True, weights, directions)
    diffs = _assert_same(packed, grads_packed, out, grads)
    record_property("max_abs_diff", diffs)


def test_split_rows_match_unpacked(family, oracle, record_property):
    """A group longer than max_row_tokens goes over several rows, each repeating the prefix."""
    model, spec, groups = family
    out, grads, weights, directions = oracle
    max_row = max(g.prefix_len for g in groups) + 45
    plan = plan_rows(groups, max_row)
    assert len(plan) > len(groups) and sum(gi == 2 for ((gi, _),) in plan) >= 2
    packed, grads_packed = _run(model, spec, groups, True, weights, directions, max_row_tokens=max_row)
    record_property("max_abs_diff", _assert_same(packed, grads_packed, out, grads))


def test_text_only_batch(family):
    """No pixel inputs at all: the model takes another path (e.g. Qwen3-VL computes no M-RoPE)."""
    model, spec, groups = family
    with torch.no_grad():
        packed = group_forward(model, spec, [groups[1]], packed=True, hidden=True)
        unpacked = group_forward(model, spec, [groups[1]], packed=False, hidden=True)
    torch.testing.assert_close(torch.stack(packed.logps), torch.stack(unpacked.logps), atol=TOL, rtol=0)
    torch.testing.assert_close(torch.stack(packed.last_hidden), torch.stack(unpacked.last_hidden), atol=TOL, rtol=0)


def test_eager_attention_packed_matches_unpacked(family):
    """Eager attention adds the mask to the scores: the packed mask must reach it as 0 / -inf floats."""
    _, spec, groups = family
    cfg = ModelConfig(path=f"tiny:{spec.name}:xs", load_in_4bit=False, compute_dtype="float32", device="cpu",
                      attn_implementation="eager", gradient_checkpointing=False)
    model, _ = load_model(cfg, trainable=False, lora=False)
    with torch.no_grad():
        packed = group_forward(model, spec, groups, packed=True, max_row_tokens=max(g.prefix_len for g in groups) + 45)
        unpacked = group_forward(model, spec, groups, packed=False)
    torch.testing.assert_close(torch.stack(packed.logps), torch.stack(unpacked.logps), atol=TOL, rtol=0)


def test_lm_head_sees_only_target_tokens(family):
    """Full-vocabulary logits are built for the target tokens only, never for image/prompt positions."""
    model, spec, groups = family
    rows = []
    handle = lm_head_of(model).register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    try:
        with torch.no_grad():
            out = group_forward(model, spec, groups, packed=True)
    finally:
        handle.remove()
    n_target = sum(sum(b.target) for g in groups for b in g.branches)
    assert sum(rows) == sum(out.n_tokens) == n_target == sum(sum(ls) for _, _, ls in GROUP_LAYOUT) - 10
    assert n_target < sum(g.packed_len() for g in groups)


def test_4bit_quantises_only_the_language_model(family):
    """4-bit load (CPU bitsandbytes): Linear4bit only under the text decoder, packed == unpacked in eval."""
    bnb = pytest.importorskip("bitsandbytes")
    _, spec, groups = family
    cfg = ModelConfig(path=f"tiny:{spec.name}:xs", load_in_4bit=True, compute_dtype="float32", device="cpu",
                      gradient_checkpointing=False)
    model, _ = load_model(cfg, trainable=False)
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    text = "base_model.model." + spec.text_prefix + "."
    assert all(n.startswith(text) for n in quantised)
    assert len(quantised) == 7 * model.config.get_text_config().num_hidden_layers  # q k v o gate up down
    with torch.no_grad():
        packed = group_forward(model, spec, groups, packed=True)
        unpacked = group_forward(model, spec, groups, packed=False)
    torch.testing.assert_close(torch.stack(packed.logps), torch.stack(unpacked.logps), atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------------
# pure functions

def test_packed_mask_by_hand():
    """Prefix of 2, branches [2, 4) and [4, 5), 2 padding positions."""
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # branch 1 sees the prefix and itself, causally
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # branch 2 does not see branch 1
        [0, 0, 0, 0, 0, 1, 0],  # padding sees only itself (no all-masked row for SDPA)
        [0, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(packed_mask(2, [(2, 4), (4, 5)], 7), expected)


def test_plan_rows_splits_between_branches():
    group = EncodedGroup(prefix={"input_ids": torch.zeros(1, 10, dtype=torch.long)},
                         branches=[Branch([1] * n, [True] * n) for n in (5, 6, 20, 1)])
    assert plan_rows([group, group], None) == [[(0, [0, 1, 2, 3])], [(1, [0, 1, 2, 3])]]
    # 10 + 5 + 6 = 21 fits 22; the 20-token branch overflows into its own row even though 30 > 22
    assert plan_rows([group], 22) == [[(0, [0, 1])], [(0, [2])], [(0, [3])]]


@pytest.mark.parametrize("with_bias", [False, True])
def test_token_logps_chunked_equals_float64_reference(with_bias):
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 50, bias=with_bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=gen))
        if with_bias:
            head.bias.copy_(torch.randn(50, generator=gen))
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=gen)
    upstream = torch.randn(37, generator=gen)

    lp = token_logps(hidden, targets, head, chunk=8)  # 5 chunks, the last one partial
    assert lp.shape == (37,) and lp.dtype == torch.float32
    (lp * upstream).sum().backward()

    h64 = hidden.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    logits = h64 @ w64.T + (head.bias.detach().double() if with_bias else 0)
    ref = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (ref * upstream.double()).sum().backward()

    torch.testing.assert_close(lp.double(), ref.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(token_logps(hidden, targets, head, chunk=1024).double(), ref.detach(),
                                   atol=1e-5, rtol=1e-6)
    assert token_logps(hidden[:0], targets[:0], head).shape == (0,)
