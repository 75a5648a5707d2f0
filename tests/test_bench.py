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
    assert kinds == ["env", "gate"] + ["run"] * 6 + ["memcap"] * 6 + ["summary"]
    assert len({r["run_id"] for r in rows}) == 1 and all(r["schema"] == 1 for r in rows)
    env = rows[0]
    assert env["env"]["device"] == "cpu" and env["env"]["torch"] == torch.__version__
    assert env["command"].startswith("python -m bench.dpo --model tiny")
    runs = {r["system"]: r for r in rows if r["kind"] == "run"}
    for system in ("ours", "ours-unpacked", "ours-vcache", "trl"):
        r = runs[system]
        assert r["status"] == "ok", r.get("reason")
        assert len(r["step_s"]) == 2 and len(r["warmup_step_s"]) == 1
        assert r["step_s_median"] > 0 and r["first_step_s"] > 0 and r["dtype"] == "float32"
        if system == "trl":   # TRL runs its reference forward inside each step; its batch is in pairs
            assert r["reference_s_per_step"] == 0 and r["pairs_per_step"] == 1 and r["trl"] == trl_version()
            assert r["adapter_dtype"] == "float32"   # TRL 1.16 casts QLoRA adapters to bf16; off CUDA all is fp32
            assert r["pairs_per_s"] == pytest.approx(1 / r["step_s_median"])
        else:
            assert r["reference_s_per_step"] > 0 and r["pairs_per_step"] == 6
            # throughput counts the reference pass: pairs / (median step + median reference batch)
            assert r["pairs_per_s"] == pytest.approx(6 / (r["step_s_median"] + r["reference_s_per_step"]))
        assert r["unique_tokens_per_s"] == pytest.approx(r["pairs_per_s"] * r["unique_tokens_per_pair"])
        assert r["mfu"] == pytest.approx(r["pairs_per_s"] * r["useful_tflop_per_pair"] / 989.0)
        assert r["peak_allocated_gib"] is None and r["peak_rss_gib"] > 0   # no CUDA counters on CPU
        assert torch.isfinite(torch.tensor(r["train_loss"]))
    assert runs["ours"]["layout"] == "packed" and runs["ours-unpacked"]["layout"] == "unpacked"
    assert runs["trl"]["layout"] == "pairs" and runs["trl"]["prompt_tokens_mean"] == runs["ours"]["prompt_tokens_mean"]
    assert runs["ours-unpacked"]["executed_tflop_per_pair"] > runs["ours"]["executed_tflop_per_pair"] \
        > runs["ours-vcache"]["executed_tflop_per_pair"] == runs["ours"]["useful_tflop_per_pair"]
    # the same synthetic groups everywhere: same prompt and response lengths
    assert runs["ours"]["prompt_tokens_mean"] == runs["ours-unpacked"]["prompt_tokens_mean"]
    assert runs["ours"]["response_tokens_mean"] == runs["ours-vcache"]["response_tokens_mean"]


def test_unavailable_systems_are_recorded_as_skipped(smoke):
    """No CUDA: Unsloth + TRL, our Unsloth backend and the memory caps are skipped with a reason and carry
    no numbers (TRL itself runs on CPU)."""
    rows, _ = smoke
    assert {r["system"] for r in rows if r["kind"] == "run" and r["status"] == "skipped"} == {"unsloth-trl",
                                                                                             "ours-unsloth"}
    for r in rows:
        if r["kind"] == "run" and r["system"] in ("unsloth-trl", "ours-unsloth"):
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
    # TRL's own DPOTrainer on CPU (its chunked log-prob kernel has a plain PyTorch path off CUDA)
    trainer = checks["trl_trainer"]
    assert trainer["status"] == "ok" and trainer["passed"] and gate["skipped"] == []
    assert trainer["max_abs_diff_pair_loss"] < 1e-4 and trainer["abs_diff_mean_loss_vs_trainer_compute_loss"] < 1e-4
    assert trainer["max_abs_diff_policy_chosen_logp"] < 2e-3 and trainer["max_abs_diff_reference_rejected_logp"] < 2e-3


def test_summary_of_the_smoke_run(smoke):
    """The run ends with a `summary` row: each system's best batch, ours over TRL, the FLOP model's ratio."""
    rows, _ = smoke
    summary = rows[-1]
    assert summary["kind"] == "summary"
    runs = {r["system"]: r for r in rows if r["kind"] == "run"}
    assert summary["ratio"] == pytest.approx(runs["ours"]["pairs_per_s"] / runs["trl"]["pairs_per_s"])
    assert summary["flop_model_ratio"] == pytest.approx(runs["trl"]["executed_tflop_per_pair"]
                                                        / runs["ours"]["executed_tflop_per_pair"])
    assert set(summary["systems"]) == {"ours", "ours-unpacked", "ours-vcache", "trl"}


def trl_version() -> str:
    from importlib.metadata import version
    return version("trl")


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


def test_cpu_side_by_side_script_tiny(tmp_path):
    """`bash bench/cpu.sh --tiny`: the CPU side-by-side harness on the tiny shape (one process, one timed
    step): both systems produce rows, a profile and the measured peak are in the run, and the last line is
    the ratio line in its exact form."""
    import os
    import subprocess

    from bench.summary import RATIO_LINE

    out = tmp_path / "side.jsonl"
    env = {**os.environ, "BENCH_OUT": str(out), "PYTHON": sys.executable}
    # one torch thread, as everywhere in the suite (conftest): the script's two threads spin on a shared machine, and
    # cost 19.5 CPU s here against 12.3 (arguments after --tiny go to bench.dpo and win)
    proc = subprocess.run(["bash", str(REPO / "bench" / "cpu.sh"), "--tiny", "--threads", "1"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = RATIO_LINE.match(last)
    assert m, last
    assert m.group(2) == "tiny: 4 image tokens, K=4, ~12-token responses"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    runs = {r["system"]: r for r in rows if r["kind"] == "run"}
    assert set(runs) == {"ours", "trl"} and all(r["status"] == "ok" for r in runs.values())
    assert float(m.group(1)) == pytest.approx(runs["ours"]["pairs_per_s"] / runs["trl"]["pairs_per_s"], abs=0.006)
    peak = next(r for r in rows if r["kind"] == "peak")
    assert peak["peak_gflops"] == max(peak["by_size"].values()) > 0 and peak["dtype"] == "float32"
    for r in runs.values():
        assert r["peak_tflops"] == pytest.approx(peak["peak_gflops"] / 1e3)   # MFU against the measured peak
        prof = r["profile"]
        assert prof["time_of"] == "cpu" and prof["categories"]["matmul"]["share"] > 0.05
        assert sum(c["share"] for c in prof["categories"].values()) == pytest.approx(1.0)
        assert len(r["step_s"]) == 1      # the profiled step is not timed


def _fake_run(system, batch, pairs_per_s, executed, useful=1.0, **extra):
    return {"kind": "run", "system": system, "status": "ok", "batch": batch, "batch_unit": "groups",
            "pairs_per_s": pairs_per_s, "executed_tflop_per_pair": executed, "useful_tflop_per_pair": useful,
            "model": "cpu", "image_tokens_target": 256, "k": 4, "response_tokens_target": 64, **extra}


def test_side_by_side_summary_by_hand():
    """Best batch per system, ratio, FLOP-model ratio and shares of the peak, worked by hand: ours best at
    batch 2 (4.0 pairs/s), TRL best at 4 pairs (0.5): 8.00x; TRL executes 9 / 1.1 = 8.18x ours' FLOPs;
    ours executes 4.0 * 1.1 TFLOP/s = 4400 GFLOP/s of a 10000 peak (44%), useful 4000 (MFU 40%)."""
    from bench.summary import RATIO_LINE, side_by_side

    rows = [_fake_run("ours", 1, 3.0, 1.1), _fake_run("ours", 2, 4.0, 1.1),
            _fake_run("trl", 2, 0.4, 9.0), _fake_run("trl", 4, 0.5, 9.0),
            {**_fake_run("trl", 8, 9.9, 9.0), "status": "oom"}]
    summary, lines = side_by_side(rows, peak_gflops=10_000.0)
    assert lines[-1] == "ours/trl pairs/s = 8.00x at cpu: 256 image tokens, K=4, ~64-token responses"
    assert RATIO_LINE.match(lines[-1])
    assert summary["ratio"] == pytest.approx(8.0) and summary["flop_model_ratio"] == pytest.approx(9 / 1.1)
    ours = summary["systems"]["ours"]
    assert ours["batch"] == 2 and ours["executed_share_of_peak"] == pytest.approx(0.44)
    assert ours["mfu_measured_peak"] == pytest.approx(0.40) and summary["systems"]["trl"]["batch"] == 4
    summary, lines = side_by_side([_fake_run("ours", 1, 3.0, 1.1), {**_fake_run("trl", 2, 0, 9.0),
                                                                    "status": "skipped", "reason": "no trl"}])
    assert summary["ratio"] is None and lines[-1].startswith("ours/trl pairs/s: not measured (trl: skipped")


def test_profile_summary_categories():
    """A profiled matmul lands in `matmul`, a softmax in its own category; shares add up to 1."""
    from torch.profiler import ProfilerActivity, profile

    from bench.measure import op_category, profile_summary

    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            torch.mm(a, a).softmax(-1)
    summary = profile_summary(prof, wall_s=1.0)
    assert {"matmul", "softmax / log-softmax"} <= set(summary["categories"])
    assert sum(c["share"] for c in summary["categories"].values()) == pytest.approx(1.0)
    assert summary["top_ops"][0]["s"] >= summary["top_ops"][-1]["s"]
    assert op_category("aten::addmm") == "matmul"
    assert op_category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert op_category("bitsandbytes::dequantize_4bit") == "4-bit dequantisation"


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


# --------------------------------------------------------------------------------------------------
# bench/gpu.sh --dry: the GPU run's script on the tiny shape on CPU

def test_gpu_script_dry_run(tmp_path):
    """`bash bench/gpu.sh --dry` runs every item of the GPU bench in priority order and writes its rows to
    $OUT as it goes: ours at three batch sizes, ours with the vision cache, TRL (its version named), Unsloth
    + TRL (skipped off CUDA), the gate, the memory caps (skipped off CUDA), critique generation, a summary."""
    import os
    import subprocess

    from bench.summary import RATIO_LINE

    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry"], capture_output=True, text=True,
                          env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu-bench.jsonl").read_text().splitlines()]
    items = [r for r in rows if r["kind"] == "item"]
    assert [r["item"] for r in items] == ["model", "ours", "ours-vcache", "trl", "unsloth-trl", "gate", "memcap",
                                          "critiques"]
    assert all(r["status"] == "ok" for r in items), items
    runs = [(r["system"], r["batch"], r["status"]) for r in rows if r["kind"] == "run"]
    assert runs == [("ours", 1, "ok"), ("ours", 2, "ok"), ("ours-vcache", 2, "ok"), ("trl", 2, "ok"),
                    ("unsloth-trl", 2, "skipped")]
    trl = next(r for r in rows if r["kind"] == "run" and r["system"] == "trl")
    assert trl["trl"] == trl_version() and trl["first_step_s"] > 0
    gate = next(r for r in rows if r["kind"] == "gate")
    assert gate["passed"] and gate["dtype"] == "float32"
    assert [(r["cap_gb"], r["status"]) for r in rows if r["kind"] == "memcap"] == [(12.0, "skipped"), (24.0, "skipped")]
    crit = [r for r in rows if r["kind"] == "critiques"]
    assert [r["path"] for r in crit] == ["per row", "shared prompt"] and crit[1]["identical_critiques"] == 4
    summary = rows[-1]
    assert summary["kind"] == "summary" and set(summary["systems"]) == {"ours", "ours-vcache", "trl"}
    assert RATIO_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert (tmp_path / "gpu-bench.log").stat().st_size > 1000


def test_warm_commands_keep_their_exit_code_output_and_are_stopped_with_their_client(tmp_path):
    """bench/warm.py (gpu.sh --dry's items): a command forked from the server prints to the client's stdout, reads its
    stdin, exits with its own code; a client stopped by `timeout` (SIGTERM) or killed (SIGKILL) takes its command's
    process group with it, and the server goes on serving."""
    import os
    import subprocess
    import time

    (tmp_path / "echo_args.py").write_text("import sys\nprint(sys.stdin.read().strip(), *sys.argv[1:])\n"
                                           "sys.exit(int(sys.argv[-1]))\n")
    (tmp_path / "linger.py").write_text("import os, pathlib, subprocess, sys, time\n"
                                        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                                        "pathlib.Path(sys.argv[1]).write_text(f'{os.getpid()} {child.pid}')\n"
                                        "time.sleep(600)\n")
    sock = tmp_path / "warm.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "bench.warm", "serve", str(sock), "json"], cwd=tmp_path, env=env)
    client = [sys.executable, "-m", "bench.warm", "run", str(sock), "-m"]
    try:
        out = subprocess.run(client + ["echo_args", "a b", "3"], input="from stdin", capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=120)
        assert (out.returncode, out.stdout) == (3, "from stdin a b 3\n"), out.stderr
        for stop in ("TERM", "KILL"):
            pids = tmp_path / f"pids-{stop}"
            proc = subprocess.run(["timeout", "-s", stop, "5", *client, "linger", str(pids)], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode in ((124,) if stop == "TERM" else (137, -9)), proc.stderr   # timeout ran out
            deadline = time.time() + 30
            while any(_alive(int(p)) for p in pids.read_text().split()):
                assert time.time() < deadline, f"{stop}: the command or its child outlived the client"
                time.sleep(0.1)
        out = subprocess.run(client + ["echo_args", "0"], input="", capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=120)
        assert (out.returncode, out.stdout) == (0, " 0\n"), out.stderr
    finally:
        server.kill()
        server.wait(timeout=60)


def _alive(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has: it waits only for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
