"""The dry-run plan: counts, steps, token lengths from the real processor, over-long samples, stage status.

    python -m pytest -q tests/test_plan.py
"""
from __future__ import annotations

import math

import pytest

from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn
from mmrlhf_lite.models.encoding import GroupEncoder
from mmrlhf_lite.models.families import detect_family
from mmrlhf_lite.models.loading import load_processor
from mmrlhf_lite.plan import format_plan, make_plan, optimizer_steps, percentiles, split_counts
from mmrlhf_lite.recipe import TrainConfig, load_recipe
from mmrlhf_lite.runs import RunDir


def group(gid, ranks, category="general", image=None, texts=None, critiques=None, line=1):
    texts = texts or [f"answer {i} is short" for i in range(len(ranks))]
    critiques = critiques or [None] * len(ranks)
    return PreferenceGroup(id=gid, prompt=[text_to_turn("<image>What is shown?", 1 if image else 0)],
                           responses=[Response(t, rank=r, critique=c) for t, r, c in zip(texts, ranks, critiques)],
                           images=[str(image)] if image else [], category=category, source=f"data.jsonl:{line}")


def test_percentiles_are_nearest_rank_values():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p95": 95, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p95": 7, "max": 7}
    assert percentiles([5, 1, 3, 2, 4]) == {"p50": 3, "p95": 5, "max": 5}
    assert percentiles([]) is None


@pytest.mark.parametrize("n, per_step, accum, epochs, max_steps, expected", [
    (416, 1, 4, 1.0, 0, (104, 104)),
    (417, 1, 4, 1.0, 0, (105, 105)),   # a last partial accumulation is still a step
    (10, 3, 2, 1.0, 0, (2, 2)),        # ceil(10/3) = 4 micro-batches -> 2 steps
    (10, 3, 2, 2.5, 0, (2, 5)),
    (3, 1, 8, 1.0, 0, (1, 1)),         # fewer micro-batches than grad_accum: one step
    (416, 1, 4, 3.0, 50, (104, 50)),   # max_steps wins over epochs
])
def test_optimizer_steps_match_the_trainer_formula(n, per_step, accum, epochs, max_steps, expected):
    cfg = TrainConfig(groups_per_step=per_step, grad_accum=accum, epochs=epochs, max_steps=max_steps)
    s = optimizer_steps(cfg, n)
    assert (s["steps_per_epoch"], s["steps"]) == expected
    assert s["warmup_steps"] == math.ceil(0.05 * expected[1])


def test_split_counts_per_category_with_ties():
    groups = [group("a", [1, 2, 3, 4], "colour"),      # 6 pairs
              group("b", [1, 2, 2], "colour"),         # 2 pairs, 1 tie
              group("c", [1, 1], "safety"),            # 0 pairs, 1 tie (no DPO pair)
              group("d", [2, 1, 3, 3, 3], "safety")]   # 7 pairs, 3 ties
    c = split_counts(groups)
    assert (c["groups"], c["pairs"], c["ties"], c["dpo_pairs"], c["dpo_groups"]) == (4, 15, 5, 15, 3)
    assert c["responses"] == {2: 1, 3: 1, 4: 1, 5: 1}
    assert c["categories"]["colour"] == {"groups": 2, "pairs": 8, "ties": 1, "dpo_pairs": 8, "dpo_groups": 2}
    assert c["categories"]["safety"] == {"groups": 2, "pairs": 7, "ties": 4, "dpo_pairs": 7, "dpo_groups": 1}
    # best_vs_worst: one DPO pair per group that has a ranking
    assert split_counts(groups, "best_vs_worst")["dpo_pairs"] == 3


@pytest.fixture
def recipe(tmp_path, tiny_qwen2_vl_xs):
    def make(*overrides):
        return load_recipe(None, [f"model.path={tiny_qwen2_vl_xs}", f"run.dir={tmp_path / 'run'}", *overrides],
                           check_paths=False)
    return make


@pytest.fixture
def encoder(tiny_qwen2_vl_xs):
    family = detect_family(tiny_qwen2_vl_xs)
    return GroupEncoder(load_processor(str(tiny_qwen2_vl_xs), family), family, max_length=10 ** 9)


def test_plan_tokens_match_the_encoder(recipe, encoder, images):
    train = [group(f"t{i}", [1, 2, 3], "colour", images[i % 3], line=i + 1,
                   texts=["red", "a longer answer about the blue square", "green " * (i + 1)]) for i in range(5)]
    evals = [group("e0", [1, 2], "count", images[0], line=9)]
    plan = make_plan(recipe(), ["reward", "score", "reference", "dpo", "eval"], train, evals)
    encoded = [encoder.encode_policy(g) for g in train + evals]
    seq = sorted(n for e in encoded for n in e.lengths())
    packed = sorted(e.packed_len() for e in encoded)
    t = plan["tokens"]
    assert t["method"] == "processor" and t["groups"] == 6 and plan["model"]["family"] == "qwen2_vl"
    assert t["sequence"] == percentiles(seq) and t["packed"] == percentiles(packed)
    assert t["prompt"] == percentiles([e.prefix_len for e in encoded])
    # at the xs size (56^2 pixels) 56x56 and 64x48 give 4 merged image tokens, the tall 40x72 one 6
    assert t["image"] == percentiles([encoder.image_token_count(e.prefix) for e in encoded])
    assert t["image"] == {"p50": 4, "p95": 6, "max": 6}
    assert t["train_tokens_packed"] == sum(e.packed_len() for e in encoded[:5])
    assert t["train_tokens_unpacked"] == sum(sum(e.lengths()) for e in encoded[:5])
    assert plan["too_long"] == [] and plan["errors"] == []
    assert plan["data"]["train"]["pairs"] == 15 and plan["data"]["eval"]["pairs"] == 1
    assert plan["steps"]["reward"]["steps"] == 2 and plan["steps"]["dpo"]["steps"] == 2  # 5 groups / 4
    text = format_plan(plan)
    assert f"  prompt + one response:  {'p50 %(p50)d, p95 %(p95)d, max %(max)d' % t['sequence']}" in text
    assert "  reward  2 steps (1 epoch(s); 5 groups, 1 per micro-batch x 4 accumulated = 4 per step" in text
    assert text.endswith("plan OK")


def test_over_long_samples_are_listed_by_source(recipe, encoder, images):
    groups = [group("short", [1, 2], image=images[0], line=3),
              group("long", [1, 2], image=images[1], line=7, texts=["ok", "word " * 60])]
    lengths = [max(encoder.encode_policy(g).lengths()) for g in groups]
    limit = lengths[0] + 1
    assert lengths[1] > limit  # only the second one is too long
    plan = make_plan(recipe(f"dpo.train.max_length={limit}"), ["dpo"], groups, [])
    assert [x["source"] for x in plan["too_long"]] == ["data.jsonl:7"]
    msg = plan["too_long"][0]["message"]
    assert msg.startswith(f"data.jsonl:7: prompt + response of response 2 is {lengths[1]} tokens")
    assert msg.endswith(f"> max_length {limit}; raise max_length or lower model.max_pixels "
                        "(never truncated: cutting through image tokens breaks the sample)")
    assert plan["errors"] == ["1 sequence(s) longer than max_length (listed above)"]
    text = format_plan(plan)
    assert f"  [dpo.train.max_length] {msg}" in text
    assert "ERROR: 1 sequence(s) longer than max_length (listed above)" in text
    # the reward stage alone does not check the policy sequence against dpo.train.max_length
    assert make_plan(recipe(f"dpo.train.max_length={limit}"), ["score"], groups, [])["too_long"] == []


def test_unloadable_processor_falls_back_to_chars_over_4(tmp_path):
    recipe = load_recipe(None, ["model.path=Some/hub-model", f"run.dir={tmp_path / 'run'}",
                                "dpo.train.max_length=10"], check_paths=False)
    g = group("g", [1, 2], texts=["x" * 12, "y" * 30])  # prompt "What is shown?" = 14 chars -> 4 tokens
    plan = make_plan(recipe, ["dpo"], [g], [])
    t = plan["tokens"]
    assert t["method"] == "chars/4"
    assert t["note"].startswith("processor of 'Some/hub-model' not loadable (")
    assert t["note"].endswith("lengths are estimated as characters/4 and image tokens are not counted")
    assert t["prompt"]["max"] == 4 and t["response"] == {"p50": 3, "p95": 8, "max": 8}
    assert t["sequence"]["max"] == 12 and t["packed"]["max"] == 15 and t["image"] is None
    assert plan["too_long"][0]["message"] == "data.jsonl:1: about 12 tokens (estimated) > max_length 10"
    assert "tokens per group (1 groups, estimate, characters/4):" in format_plan(plan)


def test_stage_status_done_skipped_and_changed(recipe, tmp_path):
    r = recipe()
    run = RunDir(r.run.dir)
    run.mark_done("reward", r)
    plan = make_plan(r, ["reward", "score"], [group("g", [1, 2])], [])
    assert plan["stages"] == [{"stage": "reward", "status": "done"}, {"stage": "score", "status": "run"}]
    assert "stages: reward (done, skipped), score\n" in format_plan(plan)
    changed = recipe("reward.w_tie=0.5", "model.lora_r=8")
    plan = make_plan(changed, ["reward", "score"], [group("g", [1, 2])], [])
    assert plan["stages"][0] == {"stage": "reward", "status": "changed"}
    assert plan["errors"] == [f"run folder {run.path} has finished stage 'reward' with different settings "
                              "(changed: model.lora_r, reward.w_tie); use a new run.dir, or pass --redo reward "
                              "to recompute it (its outputs are deleted)"]


def test_gpu_mem_is_not_silently_ignored(recipe):
    plan = make_plan(recipe(), ["eval"], [group("g", [1, 2])], [], gpu_mem="16GB")
    m = plan["memory"]
    assert m["available"] and m["budget"] == {"bytes": 16 * 10 ** 9, "source": "--gpu-mem 16GB", "gib": 14.9}
    assert m["fits"] is True and list(m["stages"]) == ["eval"]  # the tiny model: see tests/test_memory.py
    assert plan["notes"] == [] and plan["warnings"] == []
    assert "  budget: 14.9 GiB (--gpu-mem 16GB): fits" in format_plan(plan)
    assert plan["steps"] == {}
