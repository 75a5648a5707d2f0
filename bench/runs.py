"""One measurement: a system at one batch size, on the benchmark's model folder and synthetic groups.

`RunSpec` says what to run; `run(spec)` returns one result row (bench/README.md, "Result rows"). A
system that cannot run here (no CUDA, a package missing) returns `status: skipped` with the reason and
no numbers; an out-of-memory returns `status: oom`. Nothing is estimated.

Systems
    ours            product path: packed groups (mmrlhf_lite DpoTrainer), transformers + bitsandbytes + peft
    ours-unpacked   the same trainer, one row per response (group-aware: every response once, reference cached)
    ours-vcache     packed, and the frozen vision tower's output kept from the reference pass (training never
                    runs the vision encoder; `prefix_embeddings` / `packed_forward_embedded`)
    ours-unsloth    packed, Unsloth FastVisionModel backend (CUDA + unsloth only)
    trl             TRL DPOTrainer + bitsandbytes + peft (CUDA only: its fused LM head is a Triton kernel)
    unsloth-trl     Unsloth FastVisionModel + TRL DPOTrainer (CUDA only)
"""
from __future__ import annotations

import gc
import tempfile
import traceback
from pathlib import Path

import torch

from .data import make_groups
from .measure import GIB, StepTimer, cuda, median, now, peak_memory, reset_peak
from .spec import (BETA, LEARNING_RATE, LORA_ALPHA, LORA_R, OURS, SYSTEMS, TRL_SYSTEMS, RunSpec, group_tokens, is_oom,
                   result_row, skipped, throughput_fields)

def apply_memory_cap(cap_gb: float | None) -> None:
    if cap_gb and cuda():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GIB / total))


def run(spec: RunSpec) -> dict:
    """Run one (system, batch) measurement; never raises for OOM or a missing system (they become rows)."""
    if spec.system not in SYSTEMS:
        raise ValueError(f"unknown system '{spec.system}'; known: {', '.join(SYSTEMS)}")
    if spec.mem_cap_gb and not cuda():
        return skipped(spec, "a memory cap needs CUDA (torch.cuda.set_per_process_memory_fraction)")
    apply_memory_cap(spec.mem_cap_gb)
    try:
        if spec.system in OURS:
            return run_ours(spec, **OURS[spec.system])
        from .trl_systems import run_trl
        return run_trl(spec, **TRL_SYSTEMS[spec.system])
    except Exception as exc:  # noqa: BLE001 - recorded, the harness goes on with the next system
        if is_oom(exc):
            return result_row(spec, "oom", reason=f"{type(exc).__name__}: {str(exc)[:300]}", **peak_memory())
        return result_row(spec, "error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    finally:
        gc.collect()
        if cuda():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# ours

def load_ours(model_dir: str, backend: str, packed: bool, dtype: str = "auto", seed: int = 0):
    from mmrlhf_lite.models.loading import load_model
    from mmrlhf_lite.recipe import ModelConfig

    torch.manual_seed(seed)  # LoRA A init: the same adapter start in every system and run
    cfg = ModelConfig(path=model_dir, backend=backend, device="auto", compute_dtype=dtype, load_in_4bit=True,
                      lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, gradient_checkpointing=True,
                      attn_implementation="sdpa", packing="packed" if packed else "unpacked")
    return load_model(cfg)


def _reference_pass(model, family, encoder, groups, batch: int, packed: bool, vision_cache: bool):
    """Reference log-probs (adapter off, no grad), in steps of `batch` groups, each timed. With the vision
    cache, the same pass also keeps each prompt's input embeddings (the vision tower runs here only)."""
    from mmrlhf_lite.models.logprobs import group_forward
    from mmrlhf_lite.models.vision_cache import packed_forward_embedded, prefix_embeddings

    reference, cache, times, encode_times = {}, {}, [], []
    model.eval()
    try:
        for s in range(0, len(groups), batch):
            chunk = groups[s:s + batch]
            t0 = now()
            encoded = [encoder.encode_policy(g) for g in chunk]
            encode_times.append(now() - t0)
            with torch.no_grad(), model.disable_adapter():
                t0 = now()
                if vision_cache:
                    embeds = prefix_embeddings(model, family, encoded)
                    out = packed_forward_embedded(model, family, encoded, embeds)
                    for e, x in zip(encoded, embeds):
                        x = x.to("cpu")
                        cache[e.group_id] = x.pin_memory() if cuda() else x
                else:
                    out = group_forward(model, family, encoded, packed=packed)
                times.append(now() - t0)
            k = 0
            for g in chunk:
                reference[g.id] = [float(out.logps[k + i]) for i in range(len(g.responses))]
                k += len(g.responses)
    finally:
        model.train()
    return reference, cache, times, encode_times


def _vision_cached_trainer_class():
    from mmrlhf_lite.dpo.loss import mm_dpo_loss
    from mmrlhf_lite.dpo.trainer import DpoTrainer
    from mmrlhf_lite.models.vision_cache import packed_forward_embedded

    class VisionCachedDpoTrainer(DpoTrainer):
        """DpoTrainer whose policy forward starts from the prompts' cached input embeddings."""

        def __init__(self, *args, prefix_cache: dict, **kwargs):
            self.prefix_cache = prefix_cache
            super().__init__(*args, **kwargs)

        def group_loss(self, model, batch, norm=None):
            c = self.cfg
            encoded = batch["encoded"]
            device = next(p for p in model.parameters()).device
            embeds = [self.prefix_cache[e.group_id].to(device, non_blocking=True) for e in encoded]
            out = packed_forward_embedded(model, self.spec, encoded, embeds)
            logps = torch.stack(out.logps)
            sft = None
            if c.gamma > 0:  # as DpoTrainer.group_loss: per pair, the NLL of its SFT response
                sft = torch.stack([-out.token_logps[i].mean() for i in batch["sft_responses"].tolist()])
            loss, metrics = mm_dpo_loss(logps, batch["reference_logps"].to(device), batch["pairs"].to(device),
                                        batch["deltas"].to(device), beta=c.beta, w=c.w, k=c.k,
                                        beta_floor=c.beta_floor, loss_type=c.loss_type,
                                        label_smoothing=c.label_smoothing, sft_nll=sft, alpha=c.alpha, gamma=c.gamma,
                                        n_tokens=torch.tensor([len(t) for t in out.token_logps], device=device),
                                        num_pairs=None if norm is None else norm["pairs"])
            metrics["tokens"] = float(sum(e.packed_len() for e in encoded))
            return loss, metrics

    return VisionCachedDpoTrainer


def run_ours(spec: RunSpec, *, packed: bool, backend: str, vision_cache: bool, layout: str) -> dict:
    from mmrlhf_lite.dpo.trainer import DpoCollator, DpoTrainer, margins_for
    from mmrlhf_lite.events import EventLog
    from mmrlhf_lite.models.encoding import GroupEncoder
    from mmrlhf_lite.models.loading import unsloth_available
    from mmrlhf_lite.recipe import DpoConfig, TrainConfig
    from mmrlhf_lite.training import training_arguments

    if backend == "unsloth" and not unsloth_available():
        return skipped(spec, "unsloth backend needs CUDA and an importable unsloth (FastVisionModel is CUDA only)")
    reset_peak()
    t0 = now()
    model, processor = load_ours(spec.model_dir, backend, packed, seed=spec.seed)
    load_s = now() - t0
    info = model.mmrlhf
    family = info.family
    encoder = GroupEncoder(processor, family, max_length=1 << 20)
    n_steps = spec.warmup + spec.steps
    groups = make_groups(processor.tokenizer, spec.synthetic(), spec.batch * n_steps)

    reference, cache, ref_times, encode_times = _reference_pass(model, family, encoder, groups, spec.batch, packed,
                                                                vision_cache)
    tokens = group_tokens([encoder.encode_policy(g) for g in groups[:spec.batch * 2]])
    dc = DpoConfig(beta=BETA, w=spec.w, k=0.5, pairs="all", margin_source="scores",
                   train=TrainConfig(learning_rate=LEARNING_RATE, max_steps=n_steps, groups_per_step=spec.batch,
                                     grad_accum=1, warmup_ratio=0.0, lr_scheduler="constant",
                                     save_steps=10 ** 9, logging_steps=10 ** 9, save_total_limit=1,
                                     max_length=1 << 20))
    with tempfile.TemporaryDirectory(prefix="mmrlhf-bench-") as tmp:
        deltas = margins_for(groups, "scores", Path(tmp))
        args = training_arguments(dc.train, Path(tmp) / "checkpoints", device=info.device, dtype=info.dtype,
                                  seed=spec.seed, report_to="none")
        kwargs = dict(groups=groups, collate=DpoCollator(encoder, dc, reference, deltas),
                      events=EventLog(None, echo=False), cfg=dc, spec=family, packed=packed)
        if vision_cache:
            trainer = _vision_cached_trainer_class()(model, args, prefix_cache=cache, **kwargs)
        else:
            trainer = DpoTrainer(model, args, **kwargs)
        timer = StepTimer(spec.warmup)
        trainer.add_callback(timer)
        result = trainer.train()
    step_s = median(timer.timed)
    ref_s = median(ref_times[1:] or ref_times)
    pairs_per_step = sum(g.n_pairs for g in tokens) / len(tokens) * spec.batch
    fields = throughput_fields(spec, layout, tokens, pairs_per_step, (step_s + ref_s) if step_s else None)
    fields["pairs_per_s_train_only"] = pairs_per_step / step_s if step_s else None
    return result_row(spec, "ok", backend=info.backend, device=str(info.device), dtype=str(info.dtype).replace("torch.", ""),
                load_s=load_s, first_step_s=timer.first_step_s, step_s_median=step_s, step_s=timer.timed,
                warmup_step_s=timer.times[:spec.warmup], reference_s_per_step=ref_s, reference_s=ref_times,
                encode_s_per_step=median(encode_times), train_loss=result.training_loss,
                **timer.peak_after_warmup, **fields)
