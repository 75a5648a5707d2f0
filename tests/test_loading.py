"""Model loading: QLoRA on CPU trains only what it should; checkpointing is exact; LoRA targets; adapters.

All on the tiny xs models (random weights, a second or so per load).

    python -m pytest -q tests/test_loading.py
"""
from __future__ import annotations

import pytest
import torch

from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn
from mmrlhf_lite.models.encoding import GroupEncoder
from mmrlhf_lite.models.loading import ModelLoadError, load_model, lora_target_names, save_adapter
from mmrlhf_lite.models.wrappers import unwrap
from mmrlhf_lite.models.logprobs import group_forward
from mmrlhf_lite.recipe import ModelConfig

HEAD = {"kind": "mlp", "dropout": 0.0}


def cfg_for(path, **kw) -> ModelConfig:
    return ModelConfig(path=str(path), device="cpu", **kw)


@pytest.fixture
def groups(images):
    texts = ["The square is red.", "It is a blue circle on the left.", "I see green."]
    return [PreferenceGroup(id=f"g{i}", prompt=[text_to_turn("<image>What colour is the square?", 1)],
                            responses=[Response(t, rank=r + 1) for r, t in enumerate(texts[i:] + texts[:i])],
                            images=[str(images[i])], source=f"t.jsonl:{i + 1}") for i in range(2)]


def encode(model, processor, groups):
    spec = model.mmrlhf.family
    enc = GroupEncoder(processor, spec, max_length=4096)
    return spec, [enc.encode_policy(g) for g in groups]


def forward(model, processor, groups, *, packed=True):
    """(per-response summed log-probs (n,), rewards (n,) or None) for all responses of `groups`."""
    spec, encoded = encode(model, processor, groups)
    out = group_forward(model, spec, encoded, packed=packed, logps=True, hidden=True)
    logps = torch.stack(out.logps)
    head = getattr(unwrap(model), "reward_head", None)
    rewards = head(torch.stack(out.last_hidden)) if head is not None else None
    return logps, rewards


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter's raw data (for 4-bit weights: the packed uint8 bytes) plus 4-bit quant states."""
    snap = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is not None:
            snap[f"{name}.weight.absmax"] = qs.absmax.detach().clone()
            if qs.state2 is not None:  # double quantisation: the absmax of the absmax
                snap[f"{name}.weight.absmax2"] = qs.state2.absmax.detach().clone()
    return snap


def test_qlora_step_changes_lora_and_head_only(tiny_qwen2_vl_xs, groups):
    model, processor = load_model(cfg_for(tiny_qwen2_vl_xs, lora_r=4), reward_head=HEAD)
    model.train()
    four_bit = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit" and n.endswith("base_layer")]
    assert len(four_bit) == 14  # 2 layers x 7 projections, all of them under the language model
    assert all(".language_model." in n for n in four_bit)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 14 * 2 + 4  # lora_A + lora_B per projection, the head's two Linear layers
    assert all((".lora_A." in n or ".lora_B." in n) and ".language_model." in n
               or ".reward_head.modules_to_save." in n for n in trainable)
    before = snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # step 1 moves lora_B (initialised at zero, so lora_A has no gradient yet); step 2 both
        logps, rewards = forward(model, processor, groups)
        loss = -logps.mean() + rewards.mean()  # every head weight, its last bias too, gets a gradient
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable
    frozen = set(before) - trainable
    # what must not move, by name: 4-bit bytes and their quant states, vision tower, embeddings, LM head,
    # and the frozen original of the reward head that peft keeps next to the trained copy
    for suffix, count in ((".base_layer.weight", 14), (".base_layer.weight.absmax", 14),
                          (".base_layer.weight.absmax2", 14), ("embed_tokens.weight", 1), ("lm_head.weight", 1)):
        assert sum(n.endswith(suffix) for n in frozen) == count, suffix
    for needle, count in (("model.visual.", 19), ("reward_head.original_module.", 4)):
        assert sum(needle in n for n in frozen) == count, needle
    assert all(after[n].dtype == torch.uint8 for n in frozen if n.endswith(".base_layer.weight"))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_qwen2_vl_xs, groups):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, processor = load_model(cfg_for(tiny_qwen2_vl_xs, load_in_4bit=False, compute_dtype="float32",
                                              gradient_checkpointing=checkpointing), reward_head=HEAD)
        model.train()
        assert unwrap(model).model.language_model.gradient_checkpointing is checkpointing
        torch.manual_seed(1)
        for name, p in model.named_parameters():  # non-zero lora_B: every LoRA weight gets a gradient
            if ".lora_B." in name:
                p.data.normal_(0, 0.05)
        logps, rewards = forward(model, processor, groups)
        loss = -logps.mean() + rewards.square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert torch.allclose(loss_on, loss_off, atol=1e-5, rtol=0)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == 32
    for name in grads_off:
        assert grads_off[name].abs().sum() > 0, name
        assert torch.allclose(grads_on[name], grads_off[name], atol=1e-5, rtol=0), name


def test_lora_targets_exclude_the_vision_tower_by_default(tiny_qwen2_5_vl_xs):
    model, _ = load_model(cfg_for(tiny_qwen2_5_vl_xs, load_in_4bit=False), lora=False)
    spec = model.mmrlhf.family
    # the trap this guards against: Qwen2.5-VL's vision MLP reuses the language model's projection names
    vision_named_like_lm = [n for n, _ in model.named_modules()
                            if n.startswith("model.visual.") and n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj",
                                                                                             "down_proj")]
    assert len(vision_named_like_lm) == 3
    names = lora_target_names(model, spec, cfg_for(tiny_qwen2_5_vl_xs))
    assert len(names) == 14 and all(n.startswith("model.language_model.layers.") for n in names)
    with_vision = lora_target_names(model, spec, cfg_for(tiny_qwen2_5_vl_xs, lora_vision=True))
    vision = sorted(set(with_vision) - set(names))
    assert vision_named_like_lm[0] in vision and all(n.startswith("model.visual.") for n in vision)
    n_vision_linears = sum(1 for n, m in model.named_modules()
                           if n.startswith("model.visual.") and isinstance(m, torch.nn.Linear))
    assert len(vision) == n_vision_linears == 7  # qkv, proj, gate/up/down_proj, the merger's 2 layers


def test_lora_vision_puts_adapters_on_the_vision_tower(tiny_qwen2_5_vl_xs):
    model, _ = load_model(cfg_for(tiny_qwen2_5_vl_xs, lora_vision=True, lora_r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(".visual." in n for n in trainable) == 7 * 2
    assert sum(".language_model." in n for n in trainable) == 14 * 2


def test_unknown_lora_targets_are_a_clear_error(tiny_qwen2_vl_xs):
    with pytest.raises(ModelLoadError) as info:
        load_model(cfg_for(tiny_qwen2_vl_xs, load_in_4bit=False, lora_target_modules=["qkv_proj"]))
    assert str(info.value) == ("no linear layer named ['qkv_proj'] under 'model.language_model'; "
                               "check model.lora_target_modules")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_unsloth_backend_on_cpu_is_a_clear_error(tiny_qwen2_vl_xs):
    with pytest.raises(ModelLoadError) as info:
        load_model(cfg_for(tiny_qwen2_vl_xs, backend="unsloth"))
    assert str(info.value) == ("model.backend=unsloth needs a CUDA GPU (FastVisionModel is CUDA only); "
                               "use model.backend=transformers (4-bit also works on CPU) or auto")


def test_cuda_device_without_a_gpu_is_a_clear_error(tiny_qwen2_vl_xs):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    with pytest.raises(ModelLoadError, match="model.device is 'cuda' but no CUDA GPU is visible"):
        load_model(ModelConfig(path=str(tiny_qwen2_vl_xs), device="cuda"))


def test_missing_model_folder_offline(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(cfg_for("Some/hub-model"))
    assert str(info.value) == ("model.path 'Some/hub-model' is not a local folder, not in the Hugging Face cache, "
                               "and the hub is offline (HF_HUB_OFFLINE=1)")


def test_4bit_no_grad_eval_pass_matches_the_training_pass(tiny_qwen2_vl_xs, groups):
    """FACTS.md: on AVX512-BF16 CPUs an eval-mode no-grad Linear4bit switches to a kernel that crashes
    offline; the loader turns it off, so scoring/reference passes run and agree with training passes."""
    model, processor = load_model(cfg_for(tiny_qwen2_vl_xs), reward_head=HEAD)
    import bitsandbytes as bnb

    linear4bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 14 and all(m.support_avx512bf16_for_cpu is False for m in linear4bit)
    model.train()
    train_logps, train_rewards = forward(model, processor, groups)
    model.eval()
    with torch.no_grad():
        eval_logps, eval_rewards = forward(model, processor, groups)
    assert eval_logps.shape == (6,) and torch.isfinite(eval_logps).all() and (eval_logps < 0).all()
    assert torch.allclose(eval_logps, train_logps.detach(), atol=1e-4, rtol=0)
    assert torch.allclose(eval_rewards, train_rewards.detach(), atol=1e-5, rtol=0)


def test_saved_adapter_reproduces_log_probs_and_reward_head(tiny_qwen2_vl_xs, groups, tmp_path):
    cfg = cfg_for(tiny_qwen2_vl_xs, lora_r=4)
    model, processor = load_model(cfg, reward_head={"kind": "mlp", "dropout": 0.1})
    torch.manual_seed(3)
    for name, p in model.named_parameters():  # a trained-looking adapter: non-zero lora_B, moved head
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.05)
    model.eval()
    with torch.no_grad():
        logps, rewards = forward(model, processor, groups)
    head_state = {k: v.clone() for k, v in unwrap(model).reward_head.modules_to_save["default"].state_dict().items()}
    out = save_adapter(model, tmp_path / "adapter", stage="reward")
    meta = (out / "mmrlhf_lite.json").read_text()
    assert ('"reward_head": {\n    "kind": "mlp",\n    "dropout": 0.1,\n    "response_logp_weight": 0.0\n  }'
            in meta) and '"stage": "reward"' in meta

    loaded, processor2 = load_model(cfg, adapter=out, trainable=False)  # head kind/dropout from the JSON
    assert not any(p.requires_grad for p in loaded.parameters())
    head = unwrap(loaded).reward_head
    assert head.kind == "mlp" and head.dropout_p == 0.1
    loaded_state = head.modules_to_save["default"].state_dict()
    assert loaded_state.keys() == head_state.keys()
    assert all(torch.equal(loaded_state[k], head_state[k]) for k in head_state)
    with torch.no_grad():
        logps2, rewards2 = forward(loaded, processor2, groups)
    assert torch.allclose(logps2, logps, atol=1e-5, rtol=0)
    assert torch.allclose(rewards2, rewards, atol=1e-6, rtol=0)

    # the check has teeth: without the adapter the same inputs give other log-probs
    base, _ = load_model(cfg, lora=False, trainable=False)
    with torch.no_grad():
        base_logps, _ = forward(base, processor, groups)
    assert (base_logps - logps).abs().max() > 1e-2


@pytest.mark.parametrize("lora_vision", [False, True])
def test_checkpointing_keeps_a_frozen_vision_tower_off_the_autograd_graph(tiny_qwen2_vl_xs, groups, lora_vision):
    """transformers' gradient_checkpointing_enable hooks the vision tower's patch embedding to require grads,
    which stored its activations and back-propagated through it for nothing; the loader removes that hook.
    With LoRA on the tower its adapters still get gradients; the text LoRA gets them either way."""
    model, processor = load_model(cfg_for(tiny_qwen2_vl_xs, gradient_checkpointing=True, lora_vision=lora_vision))
    base = unwrap(model)
    patch_embed = next(m for n, m in base.named_modules() if n.endswith("visual.patch_embed"))
    seen = []
    patch_embed.register_forward_hook(lambda module, inputs, output: seen.append(output.requires_grad) and None)
    model.train()
    spec = model.mmrlhf.family
    encoded = [GroupEncoder(processor, spec, max_length=4096).encode_policy(g) for g in groups]
    out = group_forward(model, spec, encoded, packed=True)
    torch.stack(out.logps).sum().backward()
    assert seen and not any(seen)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("visual" not in n and "lora_" in n for n in with_grad)
    assert any("visual" in n for n in with_grad) == lora_vision


def test_auto_backend_picks_transformers_even_where_unsloth_would_run(tiny_qwen2_vl_xs, monkeypatch, caplog):
    """`auto` must not pick the unverified unsloth path on CUDA; it says why. `unsloth` stays available."""
    from mmrlhf_lite.models import loading
    from mmrlhf_lite.models.families import FAMILIES

    monkeypatch.setattr(loading, "unsloth_available", lambda: True)
    spec = FAMILIES["qwen2_vl"]
    with caplog.at_level("WARNING", logger=loading.__name__):
        assert loading.resolve_backend(cfg_for(tiny_qwen2_vl_xs), torch.device("cuda"), spec) == "transformers"
    assert loading.AUTO_BACKEND_NOTE in caplog.text
    assert loading.resolve_backend(cfg_for(tiny_qwen2_vl_xs, backend="unsloth"), torch.device("cuda"),
                                   spec) == "unsloth"
    caplog.clear()
    assert loading.resolve_backend(cfg_for(tiny_qwen2_vl_xs), torch.device("cpu"), spec) == "transformers"
    assert loading.AUTO_BACKEND_NOTE not in caplog.text


def test_a_load_while_an_earlier_model_is_still_referenced_is_named_in_a_warning(tiny_qwen2_vl_xs, caplog):
    """The pre-flight counts one model in memory at a time; a load while another is alive says which one."""
    import bitsandbytes  # noqa: F401  imported here, not inside a load: on this CPU its import logs a warning
    # whose exception (kept by pytest's log capture) holds the importing frames, and so the model of a load

    from mmrlhf_lite.models import loading

    cfg = cfg_for(tiny_qwen2_vl_xs, load_in_4bit=False)
    first, _ = load_model(cfg, lora=False)
    with caplog.at_level("WARNING", logger=loading.__name__):
        second, _ = load_model(cfg, lora=False)
    said = [r.getMessage() for r in caplog.records if "still in memory" in r.getMessage()]
    assert len(said) == 1 and str(tiny_qwen2_vl_xs) in said[0] and "1 loaded before is" in said[0], said
    assert loading.models_in_memory() == [str(tiny_qwen2_vl_xs)] * 2
    del first, second   # dropped: the next load finds nothing alive and says nothing
    caplog.clear()
    with caplog.at_level("WARNING", logger=loading.__name__):
        third, _ = load_model(cfg, lora=False)
    assert not [r for r in caplog.records if "still in memory" in r.getMessage()]
    assert loading.models_in_memory() == [str(tiny_qwen2_vl_xs)]
