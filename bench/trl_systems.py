"""The baselines: TRL 1.15 DPOTrainer on vision preference pairs, with bitsandbytes + peft or with Unsloth.

Written against TRL 1.15's DPOTrainer / DPOConfig (read from its source, not run here: no CUDA in the
session that wrote it). The settings are the issue's table: nf4 + double quant, bf16 compute, LoRA r=16
(alpha 32, no dropout) on the language model's q/k/v/o/gate/up/down, gradient checkpointing, beta 0.1,
sigmoid loss, the reference log-probs from the same model with the adapter disabled (TRL cannot
precompute them for vision data, so it runs that forward every step), `max_length=None` (TRL's default
1024 would cut through image tokens at 1024 image tokens per prompt).

Data: TRL's standard (non-conversational) vision rows, one per ranked pair of each synthetic group:
`images`, `prompt` (rendered with the model's chat template), `chosen`, `rejected` (text + end of turn),
which its `DataCollatorForVisionPreference` tokenises into the same tokens our encoder makes
(bench/gate.py checks this on whatever machine has TRL importable).

Skipped, with the reason recorded, where CUDA or the packages are missing.
"""
from __future__ import annotations

import math
import tempfile

import torch

from .data import trl_pair_rows
from .measure import StepTimer, cuda, median, now, reset_peak

TRL_VERSION_TESTED = "1.15.0"


def lora_target_regex(family) -> str:
    """peft regex (full match) for the language model's linears only: Qwen2.5-VL's vision MLP reuses the
    gate/up/down_proj names, so a plain name list would put LoRA on the vision tower too."""
    prefix = family.text_prefix.replace(".", r"\.")
    return rf"(.*\.)?{prefix}\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def bnb_config(family, dtype=torch.bfloat16):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(family.skip_4bit))


def dpo_config(spec, out_dir: str, *, n_steps: int, model_init: bool, bf16: bool = True, dtype: str = "bfloat16"):
    from trl import DPOConfig

    kwargs = dict(
        output_dir=out_dir, per_device_train_batch_size=spec.batch, gradient_accumulation_steps=1,
        max_steps=n_steps, learning_rate=5e-5, lr_scheduler_type="constant", warmup_steps=0,
        bf16=bf16, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=10 ** 9, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=spec.seed,
        beta=0.1, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False,
    )
    if model_init:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        kwargs["model_init_kwargs"] = {"dtype": dtype, "attn_implementation": "sdpa", "device_map": {"": device}}
    return DPOConfig(**kwargs)


def pair_dataset(rows: list[dict]):
    """A `datasets.Dataset` with the columns TRL's vision collator reads (images, prompt, chosen, rejected)."""
    from datasets import Dataset
    return Dataset.from_list([{k: r[k] for k in ("images", "prompt", "chosen", "rejected")} for r in rows])


def build_trainer(spec, model_dir: str, family, processor, rows, out_dir: str, *, unsloth: bool, n_steps: int,
                  callbacks=(), bf16: bool = True, dtype: str = "bfloat16"):
    """TRL's DPOTrainer on `rows`: TRL's normal path (model path + quantization_config + peft_config) or
    an Unsloth FastVisionModel with its own LoRA."""
    from peft import LoraConfig
    from trl import DPOTrainer

    from .spec import LORA_ALPHA, LORA_R

    ds = pair_dataset(rows)
    if unsloth:
        from unsloth import FastVisionModel

        model, _ = FastVisionModel.from_pretrained(model_dir, load_in_4bit=True, dtype=getattr(torch, dtype),
                                                   max_seq_length=8192, use_gradient_checkpointing="unsloth")
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
            finetune_mlp_modules=True, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none", random_state=spec.seed,
            use_gradient_checkpointing="unsloth")
        FastVisionModel.for_training(model)
        args = dpo_config(spec, out_dir, n_steps=n_steps, model_init=False, bf16=bf16)
        return DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=processor,
                          callbacks=list(callbacks))
    args = dpo_config(spec, out_dir, n_steps=n_steps, model_init=True, bf16=bf16, dtype=dtype)
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                             target_modules=lora_target_regex(family))
    return DPOTrainer(model=model_dir, args=args, train_dataset=ds, processing_class=processor,
                      callbacks=list(callbacks), quantization_config=bnb_config(family, getattr(torch, dtype)),
                      peft_config=peft_config)


def run_trl(spec, *, unsloth: bool, layout: str) -> dict:
    from .spec import group_tokens, result_row, skipped, throughput_fields

    name = "Unsloth + TRL" if unsloth else "TRL"
    if not cuda():
        return skipped(spec, f"{name} needs CUDA: TRL's DPOTrainer computes log-probs with a Triton kernel "
                             "(fused LM head) and Unsloth's FastVisionModel is CUDA only")
    if unsloth:
        try:
            import unsloth  # noqa: F401 - must be imported before transformers/trl to patch them
        except Exception as exc:  # noqa: BLE001
            return skipped(spec, f"unsloth is not importable: {type(exc).__name__}: {exc}")
    try:
        import trl
    except Exception as exc:  # noqa: BLE001
        return skipped(spec, f"trl is not importable: {type(exc).__name__}: {exc}")

    from mmrlhf_lite.models.encoding import GroupEncoder
    from mmrlhf_lite.models.families import detect_family
    from mmrlhf_lite.models.loading import load_processor

    from .data import make_groups

    family = detect_family(spec.model_dir)
    processor = load_processor(spec.model_dir, family)
    encoder = GroupEncoder(processor, family, max_length=1 << 20)
    n_steps = spec.warmup + spec.steps
    n_pairs = spec.batch * n_steps
    pairs_per_group = spec.k * (spec.k - 1) // 2
    groups = make_groups(processor.tokenizer, spec.synthetic(), math.ceil(n_pairs / pairs_per_group))
    rows = trl_pair_rows(groups, encoder)[:n_pairs]
    tokens = group_tokens([encoder.encode_policy(g) for g in groups[:2]])
    timer = StepTimer(spec.warmup)
    reset_peak()
    with tempfile.TemporaryDirectory(prefix="mmrlhf-bench-trl-") as tmp:
        t0 = now()
        trainer = build_trainer(spec, spec.model_dir, family, processor, rows, tmp, unsloth=unsloth,
                                n_steps=n_steps, callbacks=[timer])
        load_s = now() - t0
        result = trainer.train()
    step_s = median(timer.timed)
    fields = throughput_fields(spec, layout, tokens, float(spec.batch), step_s)
    return result_row(spec, "ok", backend="unsloth" if unsloth else "transformers", device=torch.cuda.get_device_name(0),
                dtype="bfloat16", trl=trl.__version__, trl_version_tested=TRL_VERSION_TESTED, load_s=load_s,
                first_step_s=timer.first_step_s, step_s_median=step_s, step_s=timer.timed,
                warmup_step_s=timer.times[:spec.warmup], reference_s_per_step=0.0,
                reference_note="TRL runs the reference forward inside every step (adapter disabled)",
                train_loss=result.training_loss, **timer.peak_after_warmup, **fields)
