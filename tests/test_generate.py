"""Asking a run's policy: base vs aligned answers (streamed), sampling settings, critiques and scores.

The run folder holds a real LoRA policy adapter and reward adapter on the tiny Qwen2-VL twin (random
non-zero LoRA B, see test_export.make_run), loaded through the project's loader.

    python -m pytest -q tests/test_generate.py
"""
from __future__ import annotations

import pytest
import torch

from mmrlhf_lite.generate import GenerateError, PolicyChat, Sampling, main
from mmrlhf_lite.models.reward_score import stop_ids
from mmrlhf_lite.models.loading import load_model, save_adapter
from mmrlhf_lite.recipe import load_recipe
from test_export import make_run

Q = "What colour is the square?"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    run = make_run(root, "r", four_bit=False)
    recipe = load_recipe(run / "recipe.yaml", check_paths=False)
    model, _ = load_model(recipe.model, reward_head={"kind": "mlp", "dropout": 0.0})
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "reward_head" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    save_adapter(model, run / "reward" / "final", kind="reward")
    return run


@pytest.fixture(scope="module")
def chat(run):
    return PolicyChat.from_run(run)


def test_base_answers_are_the_base_models_and_tokens_stream(chat, run, images):
    both = chat.compare([images[0]], Q, max_new_tokens=8)
    assert set(both) == {"base", "policy"} and all(both.values())
    # the base answer is what the base model alone says (loaded without any adapter), greedy
    recipe = load_recipe(run / "recipe.yaml", check_paths=False)
    base, processor = load_model(recipe.model, lora=False, trainable=False)
    inputs = chat._inputs([images[0]], Q)
    with torch.no_grad():
        out = base.generate(**inputs, max_new_tokens=8, min_new_tokens=1, do_sample=False,
                            eos_token_id=stop_ids(processor.tokenizer, chat.encoder.end_of_turn), pad_token_id=0)
    n = inputs["input_ids"].shape[1]
    assert both["base"] == processor.tokenizer.decode(out[0, n:], skip_special_tokens=True).strip()
    # streamed: each yield extends the previous one; the last is the whole answer
    seen = list(chat.stream([images[0]], Q, which="policy", max_new_tokens=8))
    assert len(seen) >= 2 and seen[-1] == both["policy"]
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]) if a)


def test_sampling_settings_and_several_images(chat, images):
    kw = dict(max_new_tokens=12, temperature=1.5, top_p=0.95)
    a = chat.answer(images[:2], Q, seed=3, **kw)
    assert a == chat.answer(images[:2], Q, seed=3, **kw)               # same seed, same sample
    samples = {chat.answer(images[:2], Q, seed=s, **kw) for s in range(4)}
    assert len(samples) >= 2                                          # sampling does sample
    with pytest.raises(GenerateError, match="top_p"):
        chat.answer([images[0]], Q, top_p=0)
    with pytest.raises(GenerateError, match="give a question"):
        chat.answer([images[0]], "  ")
    with pytest.raises(GenerateError, match="cannot read an image"):
        chat.answer([images[0].parent / "missing.png"], Q)
    assert Sampling().check().temperature == 0.0


def test_critique_and_score_of_each_answer(chat, images):
    assert chat.has_reward_model and chat.toy
    scored = chat.critique([images[0]], Q, ["It is red.", "It is blue."], mode="generate", max_new_tokens=6)
    assert [r["answer"] for r in scored] == ["It is red.", "It is blue."]
    assert all(isinstance(r["score"], float) and r["critique"] for r in scored)
    assert scored[0]["score"] != scored[1]["score"]


def test_cli(run, images, capsys, tmp_path):
    assert main([str(run), "--image", str(images[0]), "--question", Q, "--max-new-tokens", "6", "--score"]) == 0
    out, err = capsys.readouterr()
    assert "tiny random-init demo model" in err
    lines = out.splitlines()
    assert lines[0].startswith("base model: ") and lines[1].startswith("aligned policy: ")
    assert lines[2].startswith("base: score ") and lines[3].startswith("policy: score ")
    assert main([str(run), "--image", str(tmp_path / "nope.png"), "--question", Q]) == 2
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    assert main([str(empty), "--question", Q]) == 2
    assert "run its `dpo` stage first" in capsys.readouterr().err


def test_policy_tab_handler_streams_growing_prefixes(chat, run, images):
    """The Policy tab's `ask` (a gradio generator): the base answer grows token by token to its final text,
    then the policy's does, the base answer staying whole; the last yield adds the scores. Checked at the
    handler: the tiny model answers 12 tokens faster than a browser can be relied on to show each."""
    from mmrlhf_lite.ui import policy

    yields = list(policy.PolicyHandlers(run.parent).ask(run.name, [str(images[0])], Q, 12, 0, 1, 0, True))
    final = chat.compare([images[0]], Q, max_new_tokens=12)
    base_seen = [b for b, p, _ in yields if not p]
    policy_seen = [p for _, p, _ in yields if p]
    assert len(set(base_seen)) >= 3 and len(set(policy_seen)) >= 3, yields
    for seen, whole in ((base_seen, final["base"]), (policy_seen, final["policy"])):
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen   # each yield extends the last
        assert seen[-1] == whole and any(0 < len(s) < len(whole) for s in seen)  # partial text came first
    assert all(b == final["base"] for b, p, _ in yields if p)  # the policy streams after the base is done
    assert "mm-card" not in yields[-2][2] and "<b>Base model</b> · score" in yields[-1][2]
