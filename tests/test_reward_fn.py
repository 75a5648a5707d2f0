"""The critique reward model as a TRL reward function (mmrlhf_lite/reward_fn.py).

TRL's GRPOTrainer (1.16, CPU) trains the tiny Qwen2-VL policy for 3 steps on image prompts with the
reward function of a tiny hybrid reward run: the rewards it logs are the means of what the function
returned, and every returned reward equals the project's scorer on that one completion alone (its image,
question and text; no grouping) within a relative 1e-4. The function takes prompts in the standard and
conversational formats (images in a column or inside the prompt's parts) with the same scores, groups the
completions of one prompt, scores from an exported folder as from the run, and names the sample it
cannot read.

    python -m pytest -q tests/test_reward_fn.py
"""
from __future__ import annotations

import math

import pytest
from PIL import Image

from mmrlhf_lite.data.demo import generate as demo_groups
from mmrlhf_lite.reward_fn import RewardFunction, RewardFunctionError

REL = 1e-4


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    return demo_groups(tmp_path_factory.mktemp("rf-data"), groups=4, seed=1, image_size=56, safety_fraction=0.0)


@pytest.fixture(scope="module")
def rf(tiny_reward_run):
    return RewardFunction.from_run(tiny_reward_run, critique="none")


@pytest.fixture(scope="module")
def scorer(tiny_reward_run):
    """The project's scorer of the same run, for scores one completion at a time."""
    from mmrlhf_lite.recipe import load_recipe
    from mmrlhf_lite.reward.scorer import RewardScorer

    recipe = load_recipe(tiny_reward_run / "recipe.yaml", check_paths=False)
    return RewardScorer.from_run(tiny_reward_run, recipe.model)


def alone(scorer, image_path, question: str, completion: str, mode: str = "none") -> float:
    """The project's score of one completion alone (critiques of the run's length: 8 tokens)."""
    return scorer.score_answers(str(image_path), question, [completion], mode=mode, max_new_tokens=8)[0].score


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-6)


def test_standard_and_conversational_formats_score_alike(rf, scorer, groups):
    g1, g2 = groups[:2]
    answers = [g1.responses[0].text, g1.responses[1].text, g2.responses[0].text, g2.responses[2].text]
    questions = [g1.question_text()] * 2 + [g2.question_text()] * 2
    paths = [g1.images[0]] * 2 + [g2.images[0]] * 2
    pil = [Image.open(p).convert("RGB") for p in paths]
    standard = rf(prompts=questions, completions=answers, image=pil)
    with_images_column = rf(prompts=[[{"role": "user", "content": q}] for q in questions],
                            completions=[[{"role": "assistant", "content": a}] for a in answers],
                            images=[[p] for p in paths])
    prepared = rf(prompts=[[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": q}]}]
                           for im, q in zip(pil, questions)],
                  completions=[[{"role": "assistant", "content": [{"type": "text", "text": a}]}] for a in answers],
                  trainer_state=None, completion_ids=[[1]] * 4)
    want = [alone(scorer, p, q, a) for p, q, a in zip(paths, questions, answers)]
    for got in (standard, with_images_column, prepared):
        assert all(close(a, b) for a, b in zip(got, want)), (got, want)
    assert len({round(x, 5) for x in want}) > 1
    grouped, where = rf.groups(questions, answers, image=pil)
    assert [len(g.responses) for g in grouped] == [2, 2] and [k for _, k in where] == [0, 1, 0, 1]


def test_generate_mode_and_an_exported_folder_score_as_the_run(tiny_reward_run, scorer, groups, tmp_path):
    from mmrlhf_lite.export import export_model

    g = groups[2]
    answers = [r.text for r in g.responses[:2]]
    gen = RewardFunction.from_run(tiny_reward_run, critique="generate")
    got = gen(prompts=[g.question_text()] * 2, completions=answers, images=[[g.images[0]]] * 2)
    assert all(close(a, alone(scorer, g.images[0], g.question_text(), t, "generate")) for a, t in zip(got, answers))
    folder = export_model(tiny_reward_run, "reward", tmp_path / "rm", dtype="float32", progress=lambda m: None)
    from_export = RewardFunction.from_run(folder, critique="none")
    want = RewardFunction.from_run(tiny_reward_run, critique="none")
    kw = dict(prompts=[g.question_text()] * 2, completions=answers, image=[g.images[0]] * 2)
    assert all(close(a, b) for a, b in zip(from_export(**kw), want(**kw)))


def test_bad_calls_name_the_sample(rf, groups):
    g = groups[0]
    with pytest.raises(RewardFunctionError, match="2 prompts but 1 completions"):
        rf(prompts=["a", "b"], completions=["x"])
    with pytest.raises(RewardFunctionError, match="sample 1: an image must be a path, bytes"):
        rf(prompts=["a", "b"], completions=["x", "y"], image=[g.images[0], 42])
    with pytest.raises(RewardFunctionError, match="sample 0: the prompt has 2 image part"):
        rf(prompts=[[{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]}]],
           completions=["x"], images=[[g.images[0]]])
    with pytest.raises(RewardFunctionError, match="sample 0: a completion must be a string"):
        rf(prompts=["a"], completions=[7])
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        RewardFunction.from_run(g.images[0])
    with pytest.raises(RewardFunctionError, match="critique must be one of none, generate"):
        RewardFunction(None, "given")


def test_trl_grpo_trainer_logs_the_reward_models_scores(rf, scorer, groups, tmp_path):
    """GRPOTrainer, 3 steps, 2 prompts x 2 completions a step: the logged rewards are the function's, and each
    equals the project's scorer on that completion alone."""
    import datasets
    import torch
    import trl  # requirements-dev.txt: trl==1.16.0
    from transformers import AutoModelForImageTextToText

    from mmrlhf_lite.models.families import detect_family
    from mmrlhf_lite.models.loading import load_processor
    from mmrlhf_lite.models.tiny import ensure_tiny

    calls = []

    def recorded(prompts, completions, **kwargs):
        out = rf(prompts, completions, **kwargs)
        calls.append((prompts, completions, kwargs["image"], out))
        return out
    recorded.__name__ = "mmrlhf_reward"

    path = {g.question_text(): g.images[0] for g in groups}
    ds = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": g.question_text()}] for g in groups],
                                     "image": [Image.open(g.images[0]).convert("RGB") for g in groups]})
    base = ensure_tiny("tiny:qwen2_vl:xs")
    policy = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    processor = load_processor(str(base), detect_family(str(base)))
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, max_steps=3, logging_steps=1, use_cpu=True, report_to="none",
                          learning_rate=1e-5, beta=0.0, save_strategy="no", bf16=False, seed=0)
    trainer = trl.GRPOTrainer(model=policy, processing_class=processor, reward_funcs=recorded, args=args,
                              train_dataset=ds)
    trainer.train()
    logged = [h["rewards/mmrlhf_reward/mean"] for h in trainer.state.log_history if "rewards/mmrlhf_reward/mean" in h]
    assert len(logged) == 3 and len(calls) == 3
    for value, (prompts, completions, images, out) in zip(logged, calls):
        assert len(out) == 4 and math.isclose(value, sum(out) / len(out), rel_tol=1e-5)
        for prompt, completion, reward in zip(prompts, completions, out):
            question = next(p["text"] for p in prompt[0]["content"] if p["type"] == "text")
            want = alone(scorer, path[question], question, completion[0]["content"])
            assert close(reward, want), (reward, want, completion)
