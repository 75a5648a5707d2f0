"""GPU code paths, held on CPU: what the code asks of torch (`torch.cuda.is_available`,
`get_device_capability`) is patched where a path is reachable only on a GPU; the models are the real tiny ones.

- unsloth is looked up, never imported, by a transformers run (importing it patches libraries process-wide);
- `compute_dtype: auto` is bf16 only from compute capability 8.0 (a T4 reports bf16 "supported" through
  emulation), fp16 with loss scaling below it; an inf/NaN loss stops training with the fix;
- the reference pass runs the policy forward in the training step's numerics: the step-0 log-ratio is 0.

    python -m pytest -q tests/test_gpu_paths.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline

REPO = Path(__file__).resolve().parents[1]
TINY_DPO = ["model.path=tiny:qwen2_vl:xs", "model.load_in_4bit=false", "model.device=cpu",
            "data.demo.groups=8", "data.demo.image_size=56", "data.eval_fraction=0", "data.demo.safety_fraction=0",
            "dpo.margin_source=none", "dpo.w=0", "dpo.gamma=0", "dpo.train.groups_per_step=2",
            "dpo.train.grad_accum=1", "dpo.train.logging_steps=1", "dpo.train.save_steps=100"]


def _dpo_metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["type"] == "metrics" and e.get("stage") == "dpo":
            out[e["step"]] = e
    return out


# --------------------------------------------------------------------------------------------------
# unsloth: found, not imported

FAKE_UNSLOTH = '''
import os, pathlib
pathlib.Path(os.environ["FAKE_UNSLOTH_MARK"]).write_text("imported")
'''

CHECK_NO_IMPORT = '''
import logging, sys
import torch
import peft, bitsandbytes  # noqa: F401 - imported before CUDA is faked: they probe torch's CUDA bindings
torch.cuda.is_available = lambda: True                 # the CUDA branch of every backend question is reachable
torch.cuda.get_device_capability = lambda device=None: (9, 0)
torch.cuda.is_bf16_supported = lambda *a, **k: True
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from mmrlhf_lite.cache.reference import policy_settings
from mmrlhf_lite.models.loading import load_model, unsloth_available
from mmrlhf_lite.recipe import ModelConfig
gpu = ModelConfig(path=sys.argv[1], device="cuda", backend="auto", load_in_4bit=False)
print("available", unsloth_available())
print("settings", policy_settings(gpu)["backend"], policy_settings(gpu)["compute_dtype"])
model, _ = load_model(ModelConfig(path=sys.argv[1], device="cpu", backend="auto", load_in_4bit=False))
print("loaded", model.mmrlhf.backend)
print("unsloth in sys.modules", "unsloth" in sys.modules)
'''


def test_a_transformers_run_never_imports_unsloth(tmp_path, tiny_qwen2_vl_xs):
    """With unsloth installed (a fake package that records its import), `backend: auto` on a GPU and the cache
    keys see that it is there (the auto note is logged) but never import it."""
    site = tmp_path / "site"
    (site / "unsloth").mkdir(parents=True)
    (site / "unsloth" / "__init__.py").write_text(FAKE_UNSLOTH)
    mark = tmp_path / "imported"
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(CHECK_NO_IMPORT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "FAKE_UNSLOTH_MARK": str(mark)}
    res = subprocess.run([sys.executable, str(script), str(tiny_qwen2_vl_xs)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert "available True" in lines
    assert "settings transformers bfloat16" in lines
    assert "loaded transformers" in lines
    assert any("model.backend=auto uses transformers" in x for x in lines)   # the note: unsloth would run here
    assert "unsloth in sys.modules False" in lines
    assert not mark.exists()


# --------------------------------------------------------------------------------------------------
# compute dtype: bf16 from compute capability 8.0, fp16 + loss scaling below, inf/NaN stops

@pytest.mark.parametrize("capability, want", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                              ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                              ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_bf16_from_compute_capability_8_only(monkeypatch, capability, want):
    """A T4 (7.5) says bf16 is supported (emulated): auto must still pick fp16 there."""
    from mmrlhf_lite.models.loading import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda")) == want
    # the exported scorer (models/reward_score.py, copied into exports without the project) picks the same
    from mmrlhf_lite.models.reward_score import auto_dtype
    assert getattr(torch, auto_dtype("cuda")) == want and auto_dtype("cpu") == "float32"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32


def test_explicit_bf16_on_a_t4_warns(monkeypatch, caplog):
    from mmrlhf_lite.models.loading import resolve_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with caplog.at_level("WARNING"):
        assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    assert "emulated" in caplog.text and "7.5 < 8.0" in caplog.text


def test_fp16_trains_with_loss_scaling_on_fp32_trainable_weights(tiny_qwen2_vl_xs):
    """transformers' fp16=True scales the loss (GradScaler), which refuses to unscale fp16 gradients: every
    trainable weight of an fp16 base (LoRA, the reward head) must be fp32."""
    from mmrlhf_lite.models.loading import load_model
    from mmrlhf_lite.models.precision import trainer_precision
    from mmrlhf_lite.recipe import ModelConfig

    assert trainer_precision(torch.device("cuda"), torch.float16) == {"bf16": False, "fp16": True}
    assert trainer_precision(torch.device("cuda"), torch.bfloat16) == {"bf16": True, "fp16": False}
    assert trainer_precision(torch.device("cpu"), torch.float16) == {"bf16": False, "fp16": False}
    model, _ = load_model(ModelConfig(path=str(tiny_qwen2_vl_xs), device="cpu", load_in_4bit=False,
                                      compute_dtype="float16"), reward_head={"kind": "mlp", "dropout": 0.0})
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and "reward_head" not in n}
    assert frozen == {torch.float16}            # (peft keeps the head's untrained original beside its copy)


def test_a_non_finite_loss_stops_training_naming_the_fix(tmp_path, capsys):
    """A real tiny run whose weights blow up (learning rate 1e30): the first inf/NaN loss stops the stage,
    the CLI prints one line naming the step and the fix, no traceback, exit code 1; checkpoints stay."""
    from mmrlhf_lite import train

    args = TINY_DPO + ["dpo.train.max_steps=6", "dpo.train.learning_rate=1e30", "dpo.train.warmup_ratio=0",
                       "dpo.train.lr_scheduler=constant", "dpo.train.save_steps=1", "dpo.gamma=1",
                       f"run.dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}"]
    recipe = load_recipe(None, args)
    recipe.save(tmp_path / "recipe.yaml")
    code = train.main([str(tmp_path / "recipe.yaml"), "--stages", "reference,dpo", "-q"])
    err = capsys.readouterr().err
    assert code == 1, err
    line = next(x for x in err.splitlines() if x.startswith("error: dpo: the loss is"))
    assert "Traceback" not in err
    assert " at step " in line and "in float32" in line and "lower the stage's train.learning_rate" in line
    step = int(line.split(" at step ")[1].split()[0])
    assert 1 < step <= 6                          # step 1 is finite (lr applies after it)
    # no inf/NaN ever reached the logged metrics; the steps before it were checkpointed
    metrics = _dpo_metrics(tmp_path / "run")
    assert sorted(metrics) == list(range(1, step))
    checkpoints = sorted(int(p.name.split("-")[1])
                         for p in (tmp_path / "run" / "dpo" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] == step - 1
    end = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
           if '"stage_end"' in x][-1]
    assert end["stage"] == "dpo" and end["status"] == "error"


def test_fp16_overflow_message_names_bf16_and_float32():
    from mmrlhf_lite.models.precision import overflow_fix

    text = overflow_fix(torch.float16)
    assert "compute capability >= 8.0" in text and "model.compute_dtype=float32" in text
    assert "Qwen2" in text


# --------------------------------------------------------------------------------------------------
# reference pass: the training step's numerics

def test_step0_log_ratio_is_zero_whatever_context_the_trainer_enters(tmp_path, monkeypatch):
    """The trainer's loss context is made to autocast in bf16 on the CPU (as accelerate's mixed precision
    does around `model.forward`, over fp32 weights): the policy forward of the training step and of the
    reference pass run in one context (models/precision.py), so at step 0 the policy equals the cached
    reference. (Before, the training forward ran in bf16 and the reference in fp32: max |log-ratio| 4.9e-3.)"""
    import transformers

    entered = {"n": 0}

    def autocasting_context(self):
        entered["n"] += 1
        return torch.autocast("cpu", dtype=torch.bfloat16)
    monkeypatch.setattr(transformers.Trainer, "compute_loss_context_manager", autocasting_context)
    recipe = load_recipe(None, TINY_DPO + ["dpo.train.max_steps=1", f"run.dir={tmp_path / 'run'}",
                                           f"cache.dir={tmp_path / 'cache'}"])
    run_pipeline(recipe, ["reference", "dpo"], echo=False)
    assert entered["n"] == 1
    step1 = _dpo_metrics(tmp_path / "run")[1]
    assert step1["abs_log_ratio_max"] <= 1e-6, step1
    assert step1["loss"] == pytest.approx(0.6931472, abs=1e-6)    # log 2: every pair's h = 0
