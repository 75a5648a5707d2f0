"""The benchmark harness on CPU: FLOP model by hand, synthetic data sizes, a real tiny run of
`python -m bench.dpo` (schema, gate, skipped systems, chart), the memory-cap search logic, TRL's LoRA
targets, and the frozen-vision-tower cache (`prefix_embeddings` + `packed_forward_embedded`) against the
ordinary packed forward.

    python -m pytest tests/test_bench.py -q
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import flops as F  # noqa: E402
from bench.configs import SHAPES, Shape, TextShape, VisionShape  # noqa: E402
from bench.data import image_size  # noqa: E402

# --------------------------------------------------------------------------------------------------
# FLOP model

SMALL = Shape(name="hand", family="qwen2_vl",
              text=TextShape(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=10, tie_word_embeddings=False),
              vision=VisionShape(depth=1, embed_dim=4, num_heads=1, mlp_hidden=8, mlp_gated=False))


def test_flop_model_by_hand():
    """h=8, I=16, 2 layers, 2 heads of 4, 1 kv head, V=10, LoRA r=2 on all 7 linears.

    Per layer N: q 8*8 + k 8*4 + v 8*4 + o 8*8 + mlp 3*8*16 = 576 -> N = 1152.
    Per layer LoRA: 2*(16 + 12 + 12 + 16 + 24 + 24 + 24) = 256 -> N_r = 512.
    Group: prompt 3, responses (2, 1): T = 6 tokens, 3 target tokens.
    Allowed attention pairs: prompt 3*4/2 = 6; response 2: 2*3 + 3 = 9; response 1: 1*3 + 1 = 4 -> 19.
    Per pair 4 * heads * head_dim * layers = 4*2*4*2 = 64 -> attention fwd 19*64 = 1216.
    Train: linears 4*1152*6 = 27648, LoRA 6*512*6 = 18432, attention 3*1216 = 3648, head 4*8*10*3 = 960
           -> 50688.
    Reference (fwd, adapter off): 2*1152*6 = 13824 + 1216 + 2*8*10*3 = 480 -> 15520.
    Vision, one 28x28 image = 2*2 = 4 patches, D=4: patch embed 2*4*(3*2*14*14)*4 = 37632; block
    2*4*(4*16 + 2*4*8) = 1024; attention 4*4*4*4 = 256; merger, 1 token: 2*(16*16 + 16*8) = 768 -> 39680.
    """
    t = SMALL.text
    assert F.decoder_linear_params(t) == 1152
    assert F.lora_params(t, 2) == 512
    assert F.packed_pairs(3, (2, 1)) == 19
    assert F.attention_flops_per_pair(t) == 64
    assert F.vision_patches(28, 28, SMALL.vision) == 4
    assert F.vision_forward_flops(SMALL.vision, 8, 4) == 39680
    g = F.GroupTokens(prompt=3, responses=(2, 1), image_patches=(4,))
    u = F.useful_group_flops(SMALL, g, lora_r=2)
    assert u["train"].as_dict() == {"linear": 27648, "lora": 18432, "attention": 3648, "head": 960, "vision": 0,
                                    "total": 50688}
    assert u["reference"].total == 15520
    assert u["vision"].total == 39680
    assert u["total"].total == 50688 + 15520 + 39680
    # full fine-tuning convention: backward of the base linears counts weight grads too (6N instead of 4N)
    full = F.useful_group_flops(SMALL, g, lora_r=2, frozen_base=False)["train"]
    assert full.linear == 6 * 1152 * 6
    assert F.mfu(989e12 * 0.25) == pytest.approx(0.25)


def test_executed_flops_by_layout():
    """Packed runs the vision tower once per pass (train + reference): useful + one more vision pass;
    with the vision cache exactly the useful FLOPs; one row per response and TRL's pair rows repeat the
    prompt (and TRL two rows per pair)."""
    g = F.GroupTokens(prompt=3, responses=(2, 1), image_patches=(4,))
    useful = F.useful_group_flops(SMALL, g, lora_r=2)["total"].total
    packed = F.executed_group_flops(SMALL, g, "packed", lora_r=2)["total"].total
    cached = F.executed_group_flops(SMALL, g, "packed-vision-cached", lora_r=2)["total"].total
    assert cached == useful
    assert packed == useful + 39680
    # unpacked rows: [prompt r1] 5 tokens, [prompt r2] 4 tokens; causal pairs 15 + 10
    unpacked = F.executed_group_flops(SMALL, g, "unpacked", lora_r=2)
    assert unpacked["train"].linear == 4 * 1152 * 9
    assert unpacked["train"].attention == 3 * 64 * 25
    assert unpacked["train"].vision == 2 * 39680
    # K=2: one pair = the same two rows as unpacked
    pairs = F.executed_group_flops(SMALL, g, "pairs", lora_r=2)["total"].total
    assert pairs == unpacked["total"].total
    g4 = F.GroupTokens(prompt=1054, responses=(186,) * 4, image_patches=(4096,))
    shape = SHAPES["7b"]
    order = [F.executed_group_flops(shape, g4, layout)["total"].total
             for layout in ("packed-vision-cached", "packed", "unpacked", "pairs")]
    assert order == sorted(order)


def test_real_shapes_parameter_counts():
    """The configs build the published sizes: 2.21B / 8.29B parameters (vision tower ~0.67B)."""
    from transformers import AutoModelForImageTextToText

    from bench.configs import hf_config

    ids = dict(bos=0, pad=0, eos=2, image=5, video=6, vision_start=3, vision_end=4)
    expected = {"2b": 2.209, "7b": 8.291, "2.5-7b": 8.292}
    for name, billions in expected.items():
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(hf_config(SHAPES[name], ids))
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=2e-3)


def test_image_sizes_give_the_requested_tokens():
    assert image_size(1024) == (896, 896)
    assert image_size(256) == (448, 448)
    assert image_size(16) == (112, 112)
    w, h = image_size(12)
    assert (w // 28) * (h // 28) == 12


# --------------------------------------------------------------------------------------------------
# the harness on the tiny model

@pytest.fixture(scope="module")
def bench_model() -> Path:
    from bench.build import ensure_model
    return ensure_model("tiny")


@pytest.fixture(scope="module")
def smoke(bench_model, tmp_path_factory) -> tuple[list[dict], Path]:
    """A real run of `python -m bench.dpo` (in process) on the tiny model: every system, one batch size,
    two timed steps, a memory cap (skipped on CPU), the gate."""
    from bench.dpo import main

    out = tmp_path_factory.mktemp("bench") / "results.jsonl"
    rc = main(["--model", "tiny", "--image-tokens", "4", "--response-tokens", "12", "--groups-per-step", "1",
               "--systems", "ours,ours-unpacked,ours-vcache,ours-unsloth,trl,unsloth-trl", "--steps", "2",
               "--warmup", "1", "--mem-cap-gb", "24", "--isolate", "no", "--gate-groups", "1", "--out", str(out)])
    assert rc == 0
    return [json.loads(line) for line in out.read_text().splitlines()], out


def test_harness_rows(smoke):
    rows, _ = smoke
    kinds = [r["kind"] for r in rows]
    assert kinds == ["env", "gate"] + ["run"] * 6 + ["memcap"] * 6
    assert len({r["run_id"] for r in rows}) == 1 and all(r["schema"] == 1 for r in rows)
    env = rows[0]
    assert env["env"]["device"] == "cpu" and env["env"]["torch"] == torch.__version__
    assert env["command"].startswith("python -m bench.dpo --model tiny")
    runs = {r["system"]: r for r in rows if r["kind"] == "run"}
    for system in ("ours", "ours-unpacked", "ours-vcache"):
        r = runs[system]
        assert r["status"] == "ok", r.get("reason")
        assert len(r["step_s"]) == 2 and len(r["warmup_step_s"]) == 1
        assert r["step_s_median"] > 0 and r["reference_s_per_step"] > 0 and r["first_step_s"] > 0
        assert r["pairs_per_step"] == 6
        # throughput counts the reference pass: pairs / (median step + median reference batch)
        assert r["pairs_per_s"] == pytest.approx(6 / (r["step_s_median"] + r["reference_s_per_step"]))
        assert r["unique_tokens_per_s"] == pytest.approx(r["pairs_per_s"] * r["unique_tokens_per_pair"])
        assert r["mfu"] == pytest.approx(r["pairs_per_s"] * r["useful_tflop_per_pair"] / 989.0)
        assert r["peak_allocated_gib"] is None and r["peak_rss_gib"] > 0   # no CUDA counters on CPU
        assert torch.isfinite(torch.tensor(r["train_loss"]))
    assert runs["ours"]["layout"] == "packed" and runs["ours-unpacked"]["layout"] == "unpacked"
    assert runs["ours-unpacked"]["executed_tflop_per_pair"] > runs["ours"]["executed_tflop_per_pair"] \
        > runs["ours-vcache"]["executed_tflop_per_pair"] == runs["ours"]["useful_tflop_per_pair"]
    # the same synthetic groups everywhere: same prompt and response lengths
    assert runs["ours"]["prompt_tokens_mean"] == runs["ours-unpacked"]["prompt_tokens_mean"]
    assert runs["ours"]["response_tokens_mean"] == runs["ours-vcache"]["response_tokens_mean"]


def test_unavailable_systems_are_recorded_as_skipped(smoke):
    """No CUDA: TRL, Unsloth + TRL, our Unsloth backend and the memory caps are skipped with a reason and
    carry no numbers."""
    rows, _ = smoke
    for r in rows:
        if r["kind"] == "run" and r["system"] in ("trl", "unsloth-trl", "ours-unsloth"):
            assert r["status"] == "skipped" and "CUDA" in r["reason"]
            assert "pairs_per_s" not in r and "step_s_median" not in r
        if r["kind"] == "memcap":
            assert r["status"] == "skipped" and "CUDA" in r["reason"] and "max_batch" not in r


def test_gate_passes_on_cpu(smoke):
    rows, _ = smoke
    gate = rows[1]
    assert gate["passed"] is True and gate["w"] == 0.0
    checks = {c["name"]: c for c in gate["checks"]}
    ind = checks["independent"]
    assert ind["status"] == "ok" and ind["passed"]
    assert ind["max_abs_diff_policy_logp"] < 2e-3 and ind["max_abs_diff_pair_loss"] < 1e-4
    assert ind["policy_vs_reference_max_abs"] > 1e-3     # the adapter is not zero: a real comparison
    assert checks["trl_trainer"]["status"] == "skipped"  # CUDA only


def test_chart_from_the_smoke_run(smoke, tmp_path):
    from PIL import Image

    from bench.chart import draw, load_rows, select_run

    _, path = smoke
    png = draw(select_run(load_rows(path)), tmp_path / "chart.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300


def test_committed_cpu_smoke_result_and_chart(tmp_path):
    """The committed sample is a CPU tiny-model run, labelled so, and its chart redraws."""
    from bench.chart import draw, load_rows, select_run

    path = REPO / "bench" / "results" / "cpu-tiny-smoke.jsonl"
    rows = load_rows(path)
    env = [r for r in rows if r["kind"] == "env"]
    assert env and all(e["env"]["device"] == "cpu" and e["args"]["model"] == "tiny" for e in env)
    assert any(r["kind"] == "run" and r["status"] == "ok" for r in rows)
    assert (REPO / "docs" / "bench-cpu-tiny-smoke.png").stat().st_size > 10_000
    assert draw(select_run(rows), tmp_path / "c.png").exists()


# --------------------------------------------------------------------------------------------------
# memory-cap search, TRL LoRA targets

def test_memcap_search_doubles_then_bisects(monkeypatch):
    import bench.runs
    from bench.memcap import search
    from bench.runs import RunSpec

    monkeypatch.setattr(bench.runs, "cuda", lambda: True)
    calls = []

    def runner(spec):
        calls.append(spec.batch)
        assert spec.mem_cap_gb == 12 and spec.steps == 2
        fits = spec.batch <= 5
        return {"status": "ok" if fits else "oom", "pairs_per_step": 6 * spec.batch,
                "peak_allocated_gib": spec.batch * 2.0}

    row = search(RunSpec(system="ours", model="tiny", model_dir="x", batch=1), 12, runner)
    assert calls == [1, 2, 4, 8, 6, 5]
    assert row["status"] == "ok" and row["max_batch"] == 5 and row["pairs_per_step"] == 30
    assert row["cap_gb"] == 12 and not row["hit_max_batch"]


def test_trl_lora_targets_are_ours(bench_model):
    """TRL gets a peft regex that selects exactly the language-model linears our loader adapts (not
    Qwen2.5-VL's vision MLP, which reuses gate/up/down_proj)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from bench.trl_systems import lora_target_regex
    from mmrlhf_lite.models.families import FAMILIES
    from mmrlhf_lite.models.loading import lora_target_names
    from mmrlhf_lite.models.tiny import ensure_tiny
    from mmrlhf_lite.recipe import ModelConfig

    for family, path in (("qwen2_vl", bench_model), ("qwen2_5_vl", ensure_tiny("tiny:qwen2_5_vl:xs"))):
        model = AutoModelForImageTextToText.from_pretrained(path)
        ours = set(lora_target_names(model, FAMILIES[family], ModelConfig()))
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=lora_target_regex(FAMILIES[family])))
        theirs = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and "lora" not in n}
        assert theirs == ours and len(ours) == 7 * model.config.get_text_config().num_hidden_layers


# --------------------------------------------------------------------------------------------------
# frozen vision tower cache (mmrlhf_lite/models/vision_cache.py)

def _vision_cache_case(family: str, lora_vision: bool = False):
    sys.path.insert(0, str(REPO / "tests"))
    from test_packing import _lora_params, fp32_twin

    return (*fp32_twin(family, lora_vision), _lora_params)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_cache_matches_packed_forward(family):
    """Prompt embeddings computed once (vision tower + projector + token embeddings, no grad) and fed back
    give the same response log-probs, last hidden states and LoRA gradients as the ordinary packed forward
    (mixed batch: image, two-image and text-only groups; whole rows and split rows)."""
    from mmrlhf_lite.models.logprobs import packed_forward
    from mmrlhf_lite.models.vision_cache import packed_forward_embedded, prefix_embeddings

    model, spec, groups, lora_params = _vision_cache_case(family)

    def run(forward):
        model.zero_grad(set_to_none=True)
        out = forward()
        loss = sum(lp / n for lp, n in zip(out.logps, out.n_tokens)) + 0.01 * sum(h.sum() for h in out.last_hidden)
        loss.backward()
        return out, {n: p.grad.detach().clone() for n, p in lora_params(model).items()}

    ref, ref_grads = run(lambda: packed_forward(model, spec, groups, hidden=True))
    embeds = prefix_embeddings(model, spec, groups)
    assert [e.shape[0] for e in embeds] == [g.prefix_len for g in groups]
    assert all(not e.requires_grad for e in embeds)
    max_row = max(g.prefix_len for g in groups) + 45
    for kwargs in ({}, {"max_row_tokens": max_row}):
        out, grads = run(lambda: packed_forward_embedded(model, spec, groups, embeds, hidden=True, **kwargs))
        torch.testing.assert_close(torch.stack(out.logps), torch.stack(ref.logps), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.stack(out.last_hidden), torch.stack(ref.last_hidden), atol=1e-4, rtol=0)
        assert out.n_tokens == ref.n_tokens
        assert max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads) < 1e-4
    assert max(g.abs().max().item() for g in ref_grads.values()) > 1e-2


def test_vision_cache_refuses_when_not_valid():
    """Vision LoRA trains the tower (its output changes every step); Qwen3-VL's DeepStack feeds vision
    features to decoder layers besides the input embeddings: both refuse."""
    from mmrlhf_lite.models.vision_cache import MediaNotCacheable, prefix_embeddings

    model, spec, groups, _ = _vision_cache_case("qwen2_vl", lora_vision=True)
    with pytest.raises(MediaNotCacheable, match="before the decoder train"):
        prefix_embeddings(model, spec, groups)
    model, spec, groups, _ = _vision_cache_case("qwen3_vl")
    with pytest.raises(MediaNotCacheable, match="deepstack"):
        prefix_embeddings(model, spec, groups)
