"""Numerics of training: the compute dtype `auto` picks, the context every policy forward runs in, and the
trainer's mixed-precision flags.

- `auto_dtype`: bfloat16 only where the GPU computes it natively (compute capability >= 8.0: A100, A10G,
  L4, RTX 30xx/40xx, H100). `torch.cuda.is_bf16_supported()` is also true on a T4 (sm75), where bf16 is
  emulated: slow, and SDPA falls back to its math kernel. Below 8.0 it is float16, trained with loss scaling
  (`trainer_precision`: transformers' `fp16=True` runs a GradScaler; the LoRA weights and the reward head
  stay float32, so their gradients unscale).
- `policy_forward_context`: the training step and the reference pass run the policy forward in the same
  numerics, so that at step 0 (LoRA B = 0) the policy equals the cached reference: log pi - log pi_ref = 0
  (REFERENCE.md, MM-DPO). The trainers call the decoder directly (models/logprobs.py), not `model.forward`,
  so accelerate's autocast wrapper of `model.forward` never applied to training; docs/memory.md models that
  (weights in the compute dtype, LoRA inputs cast to fp32 by peft). This context pins it: autocast off on
  the model's device type, whatever context a caller (a Trainer, a notebook) entered around it.

    python -m pytest -q tests/test_gpu_paths.py
"""
from __future__ import annotations

import contextlib

import torch

BF16_MIN_CAPABILITY = (8, 0)   # Ampere: native bf16 tensor cores


class NonFiniteLoss(RuntimeError):
    """A training loss came out inf or NaN (training.GroupTrainer): the stage stops before the step's update,
    naming the fix (`overflow_fix`)."""


def auto_dtype(device: torch.device) -> torch.dtype:
    """`compute_dtype: auto` on `device`: float32 on CPU; on CUDA bfloat16 from compute capability 8.0,
    float16 below it."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bfloat16 natively (not `torch.cuda.is_bf16_supported()`, which a T4 passes
    through emulation)."""
    return tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY


def trainer_precision(device: torch.device, dtype: torch.dtype) -> dict[str, bool]:
    """transformers TrainingArguments flags: `fp16` makes the Trainer scale the loss (a GradScaler: float16
    gradients underflow without it); `bf16` needs no scaling. Off on CPU, where the Trainer has no mixed
    precision to offer."""
    cuda = device.type == "cuda"
    return {"bf16": cuda and dtype == torch.bfloat16, "fp16": cuda and dtype == torch.float16}


def policy_forward_context(device: torch.device) -> contextlib.AbstractContextManager:
    """The one context of every policy forward whose log-probs are compared with the reference cache: the
    training step (`training.GroupTrainer.compute_loss`) and the reference pass (`cache/reference.py`).
    Autocast is off on the device's type: the weights' own dtype decides the numerics in both."""
    return torch.autocast(device_type=device.type, enabled=False)


def overflow_fix(dtype: torch.dtype) -> str:
    """What to do about a non-finite loss in `dtype`."""
    if dtype == torch.float16:
        return ("float16 overflows in the activations of some models (Qwen2-based decoders among them): train on "
                "a GPU with bf16 (compute capability >= 8.0, e.g. A10G, L4, RTX 30xx/40xx, A100, H100; "
                "model.compute_dtype=auto picks it there) or set model.compute_dtype=float32 (about twice the "
                "memory for the non-quantised weights, slower)")
    return ("lower the stage's train.learning_rate (or raise train.warmup_ratio), and check the data for "
            "empty or extremely long responses")
