"""The `generate` scoring path is wired like `given`: a generated critique that is token-identical to the
dataset's critique gets the same score (fp32, 1e-5), and both equal an independent plain forward of the
full sequence [prompt + image][response + "[Evaluation]:" + assistant header][critique][end of turn] read
by the head at its last token, so boundary and end-of-turn tokens are included. An empty generated critique
(the model ended its turn at once) is its end-of-turn token alone: read at that position, like every other
critique, and counted as empty; it is not silently the `none` score.

Real loading code on the tiny Qwen2-VL (demo size) in fp32, its LoRA fitted for a few steps to one critique
so that its greedy critique is the dataset's, token for token.

    python -m pytest tests/test_critique_consistency.py -q
"""
from __future__ import annotations

import pytest
import torch

from mmrlhf_lite.data.demo import generate as demo_groups
from mmrlhf_lite.models.generation import generate_after
from mmrlhf_lite.models.loading import load_model
from mmrlhf_lite.models.wrappers import unwrap
from mmrlhf_lite.recipe import ModelConfig
from mmrlhf_lite.reward.scorer import RewardScorer
from mmrlhf_lite.reward.trainer import compute_rewards

TOL = 1e-5
STEPS, LR = 60, 5e-3


CRITIQUE = "The response is correct about the colour."


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    gs = demo_groups(tmp_path_factory.mktemp("demo"), groups=3, seed=1, image_size=112, safety_fraction=0.0)
    for g in gs:
        for r in g.responses:
            r.critique = CRITIQUE
    return gs


@pytest.fixture(scope="module")
def scorer(groups):
    """The tiny model after a few steps of the critique LM loss on one critique, so that its greedy
    critique is the dataset's, token for token (a random model writes byte soup that is no text)."""
    torch.manual_seed(0)
    model, processor = load_model(ModelConfig(path="tiny:qwen2_vl", load_in_4bit=False, compute_dtype="float32",
                                              device="cpu"), reward_head={"kind": "mlp", "dropout": 0.0})
    sc = RewardScorer(model, processor, max_length=4096)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    encoded = [sc.crit.encode(g)[0] for g in groups]
    for _ in range(STEPS):
        token_logps = compute_rewards(model, sc.spec, encoded, sc.packed, with_logps=True).critique_token_logps
        loss = -torch.cat(token_logps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return sc


def _plain_score(scorer: RewardScorer, group, ri: int, critique_ids: list[int]) -> float:
    """Independent of packing and of the critique encoder's branch layout: one ordinary row through the
    model's own forward, hidden state of the last token, head."""
    prefix, contexts = scorer.crit.generation_inputs(group)
    ids = prefix["input_ids"][0].tolist() + contexts[ri] + critique_ids
    n_extra = len(ids) - prefix["input_ids"].shape[1]
    kwargs = {k: v for k, v in prefix.items() if k not in ("input_ids", "mm_token_type_ids")}
    if "mm_token_type_ids" in prefix:
        kwargs["mm_token_type_ids"] = torch.cat([prefix["mm_token_type_ids"],
                                                 torch.zeros((1, n_extra), dtype=torch.long)], 1)
    with torch.no_grad():
        out = scorer.model(input_ids=torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                           output_hidden_states=True, **kwargs)
        return float(unwrap(scorer.model).reward_head(out.hidden_states[-1][0, -1]))


def test_generated_critique_identical_to_given_scores_the_same(scorer, groups):
    eot_text = scorer.encoder.end_of_turn
    ge = scorer.encoder
    eot = ge.template_tokens(eot_text)
    crits = scorer.generate_critiques(groups, max_new_tokens=40, batch_size=8)
    # the generation's own ids: the text it returns must re-tokenise to exactly them (token-identical)
    prompts = [scorer.crit.generation_inputs(g) for g in groups]
    raw = generate_after(scorer.model, scorer.spec, scorer.processor,
                         [(p, c) for p, cs in prompts for c in cs], end_of_turn=eot_text, max_new_tokens=40,
                         batch_size=8, return_ids=True)
    flat = [c[0] for g in crits for c in g]
    assert [t for t, _ in raw] == flat
    # a random model also writes byte pieces that decode to U+FFFD and do not re-tokenise to themselves:
    # those are not token-identical to any text and the scorer counts them
    identical = []
    for text, ids in raw:
        generated = ids if ids[-len(eot):] == eot else ids + eot  # scoring appends the end of turn
        identical.append(bool(text) and ge.join(ge.reply_prefix, text, eot_text) == generated)
    assert scorer.retokenized == sum(not ok for ok, (t, _) in zip(identical, raw) if t)
    assert sum(identical) >= 3, "too few generated critiques re-tokenise to themselves for the test"
    # token-identical to the dataset's critique: the text and the ids, end of turn included
    same = [ok and t == CRITIQUE and ids == ge.join(ge.reply_prefix, CRITIQUE, eot_text)
            for ok, (t, ids) in zip(identical, raw)]
    assert sum(same) >= 3, [t for t, _ in raw]
    gen_scores = scorer.score_with(groups, crits, generated=True)
    given = scorer.score_groups(groups, "given")
    k = 0
    for gi, g in enumerate(groups):
        for ri in range(len(g.responses)):
            text, ids = raw[k]
            ok = same[k]
            k += 1
            if not ok:
                continue
            a, b = gen_scores[gi][ri][0].score, given[gi][ri].score
            assert abs(a - b) <= TOL, (gi, ri, a, b)
            plain = _plain_score(scorer, g, ri, ids if ids[-len(eot):] == eot else ids + eot)
            assert abs(a - plain) <= TOL, (gi, ri, a, plain)


def test_empty_generated_critique_is_read_at_its_end_of_turn_and_counted(scorer, groups):
    g = groups[0]
    eot = scorer.encoder.template_tokens(scorer.encoder.end_of_turn)
    empty = [[[""] for _ in g.responses]]
    got = scorer.score_with([g], empty, generated=True)[0]
    none = scorer.score_with([g], None)[0]
    for ri in range(len(g.responses)):
        plain = _plain_score(scorer, g, ri, eot)
        assert abs(got[ri][0].score - plain) <= TOL
        assert abs(got[ri][0].score - none[ri][0].score) > TOL  # not silently the no-critique position
        assert abs(none[ri][0].score - _plain_score(scorer, g, ri, [])) <= TOL
    # score_groups flags an empty generated critique
    from mmrlhf_lite.reward.scorer import ScoredResponse
    assert ScoredResponse(0.0, [0.0], [""], empty_critiques=1).empty_critiques == 1


def test_response_logp_term_matches_a_plain_forward(scorer, groups):
    """reward.response_logp_weight: score = head(h_last) + w * mean log p(response tokens | image, prompt),
    recomputed from one ordinary forward's logits (float64 log-softmax)."""
    head = unwrap(scorer.model).reward_head
    g = groups[1]
    w = 2.5
    head.response_logp_weight = w
    try:
        got = scorer.score_with([g], None)[0]
        for ri, r in enumerate(g.responses):
            prefix, contexts = scorer.crit.generation_inputs(g)
            # the response's tokens carry the space after "[LMM Response]:" (the template's own split)
            own = scorer.encoder.tokens(" " + r.text)
            n_resp = len(own)
            assert contexts[ri][:n_resp] == own
            ids = prefix["input_ids"][0].tolist() + contexts[ri]
            p = prefix["input_ids"].shape[1]
            kwargs = {k: v for k, v in prefix.items() if k not in ("input_ids", "mm_token_type_ids")}
            kwargs["mm_token_type_ids"] = torch.cat([prefix["mm_token_type_ids"],
                                                     torch.zeros((1, len(contexts[ri])), dtype=torch.long)], 1)
            with torch.no_grad():
                out = scorer.model(input_ids=torch.tensor([ids]), output_hidden_states=True, **kwargs)
                logp = out.logits[0].double().log_softmax(-1)
                resp = [logp[p - 1 + t, ids[p + t]].item() for t in range(n_resp)]
                head_value = float(head(out.hidden_states[-1][0, -1]))
                want = head_value + w * sum(resp) / n_resp
            assert abs(got[ri][0].score - want) <= 1e-4, (ri, got[ri][0].score, want)
            # the parts apart: the head's and the response's mean log-prob
            assert abs(got[ri][0].head - head_value) <= 1e-5
            assert abs(got[ri][0].response_logp - sum(resp) / n_resp) <= 1e-4
    finally:
        head.response_logp_weight = 0.0
