"""Correctness gate, run with the benchmark: our per-pair DPO loss and log-probs against independent ones.

Checks (each a dict with the largest differences, its tolerance and `passed`; skipped ones say why):

- `independent`: ours (packed group forward, LoRA on / off for policy / reference, `mm_dpo_loss` with
  w = 0 per pair) against a plain computation written here: one ordinary row per response through the
  model's own full forward (`model(**inputs).logits` over the whole vocabulary), log-softmax, gather,
  sum, and -log sigmoid(beta * h) in float64. Runs everywhere (CPU tiny model included).
- `trl_collation`: TRL's `DataCollatorForVisionPreference` on our pair rows makes exactly our prompt and
  completion tokens and the same pixel values. Runs wherever `trl` imports (CPU too).
- `trl_batch`: our log-probs against log-probs read from TRL's collated batch (left-padded, flushed
  left, as TRL forwards it) through the model's full forward. Wherever `trl` imports.
- `trl_trainer`: ours against TRL's own DPOTrainer on the same model object (TRL's normal path: model
  path, quantization_config, peft_config): TRL's fused-LM-head log-probs (policy; reference with the
  adapter disabled), its per-pair sigmoid loss and `trainer.compute_loss` on the batch. CUDA + TRL only.

LoRA B matrices are set to seeded random values first, so that policy and reference differ.
Tolerances: float32 compute (the default): sums of log-probs within 2e-3 + 1e-5 * |sum|, per-pair
losses within 1e-4; bfloat16: 2e-2 * |sum| and 5e-2.
"""
from __future__ import annotations

import tempfile
import traceback

import torch
import torch.nn.functional as F

from .data import trl_pair_rows

BETA = 0.1


def tolerances(dtype: str) -> dict[str, float]:
    if dtype == "float32":
        return {"logp_abs": 2e-3, "logp_rel": 1e-5, "loss_abs": 1e-4}
    return {"logp_abs": 0.0, "logp_rel": 2e-2, "loss_abs": 5e-2}


def _logp_ok(a: torch.Tensor, b: torch.Tensor, tol: dict) -> tuple[float, bool]:
    a, b = a.double().cpu(), b.double().cpu()
    diff = (a - b).abs()
    return float(diff.max()), bool((diff <= tol["logp_abs"] + tol["logp_rel"] * b.abs()).all())


def randomize_lora(model, std: float = 0.05, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).mul_(std).to(p))


def pairs_of(groups) -> list[tuple[int, int]]:
    """Global (better, worse) response indices, group by group, in `PreferenceGroup.pairs()` order."""
    out, off = [], 0
    for g in groups:
        out += [(off + b, off + w) for b, w in g.pairs()]
        off += len(g.responses)
    return out


# --------------------------------------------------------------------------------------------------
# ours

def ours_logps(model, family, encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) summed response log-probs through our packed forward."""
    from mmrlhf_lite.models.logprobs import packed_forward

    with torch.no_grad():
        policy = torch.stack(packed_forward(model, family, encoded).logps)
        with model.disable_adapter():
            reference = torch.stack(packed_forward(model, family, encoded).logps)
    return policy.float().cpu(), reference.float().cpu()


def ours_pair_losses(policy, reference, pairs) -> tuple[torch.Tensor, float]:
    """Per-pair MM-DPO losses with w = 0 (plain DPO beta), no SFT term, and their mean over all pairs."""
    from mmrlhf_lite.dpo.loss import mm_dpo_loss

    p = torch.tensor(pairs, dtype=torch.long)
    per_pair = torch.stack([mm_dpo_loss(policy, reference, p[i:i + 1], torch.zeros(1), beta=BETA, w=0.0,
                                        gamma=0.0)[0] for i in range(len(pairs))])
    mean, _ = mm_dpo_loss(policy, reference, p, torch.zeros(len(pairs)), beta=BETA, w=0.0, gamma=0.0)
    return per_pair, float(mean)


def hand_pair_losses(policy, reference, pairs) -> torch.Tensor:
    """-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) in float64."""
    pol, ref = policy.double(), reference.double()
    return torch.stack([-F.logsigmoid(BETA * ((pol[b] - ref[b]) - (pol[w] - ref[w]))) for b, w in pairs])


# --------------------------------------------------------------------------------------------------
# independent oracle

def _row_inputs(prefix: dict, branch_ids: list[int]) -> dict:
    from mmrlhf_lite.models.packing import TOKEN_LEVEL_KEYS

    n = len(branch_ids)
    out = {}
    for k, v in prefix.items():
        if k == "input_ids":
            out[k] = torch.cat([v, torch.tensor([branch_ids], dtype=v.dtype)], dim=1)
        elif k in TOKEN_LEVEL_KEYS:
            out[k] = torch.cat([v, torch.zeros((1, n), dtype=v.dtype)], dim=1)
        else:
            out[k] = v
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


def full_forward_logps(model, encoded) -> torch.Tensor:
    """Summed response log-probs, one ordinary row per response, full-vocabulary logits."""
    from mmrlhf_lite.models.wrappers import unwrap

    device = next(model.parameters()).device
    base = unwrap(model).model
    out = []
    with torch.no_grad():
        for e in encoded:
            for b in e.branches:
                if hasattr(base, "rope_deltas"):
                    base.rope_deltas = None
                inputs = {k: v.to(device) for k, v in _row_inputs(e.prefix, b.ids).items()}
                logits = model(**inputs, use_cache=False).logits[0].float()        # (L, V)
                P = e.prefix_len
                lp = logits[P - 1:-1].log_softmax(-1)                               # predicts tokens P..L-1
                tok = torch.tensor(b.ids, device=device)
                mask = torch.tensor(b.target, device=device)
                out.append((lp.gather(1, tok[:, None]).squeeze(1) * mask).sum())
    return torch.stack(out).cpu()


def check_independent(model, family, groups, encoded, dtype: str) -> dict:
    tol = tolerances(dtype)
    pairs = pairs_of(groups)
    policy, reference = ours_logps(model, family, encoded)
    with torch.no_grad():
        naive_policy = full_forward_logps(model, encoded)
        with model.disable_adapter():
            naive_reference = full_forward_logps(model, encoded)
    ours_losses, _ = ours_pair_losses(policy, reference, pairs)
    naive_losses = hand_pair_losses(naive_policy, naive_reference, pairs)
    d_pol, ok_pol = _logp_ok(policy, naive_policy, tol)
    d_ref, ok_ref = _logp_ok(reference, naive_reference, tol)
    d_loss = float((ours_losses.double() - naive_losses).abs().max())
    policy_moved = float((policy - reference).abs().max())
    return {"name": "independent", "status": "ok", "pairs": len(pairs), "responses": len(policy),
            "max_abs_diff_policy_logp": d_pol, "max_abs_diff_reference_logp": d_ref,
            "max_abs_diff_pair_loss": d_loss, "policy_vs_reference_max_abs": policy_moved,
            "logp_magnitude": float(policy.abs().max()), "tolerance": tol,
            "passed": ok_pol and ok_ref and d_loss <= tol["loss_abs"] and policy_moved > 0}


# --------------------------------------------------------------------------------------------------
# TRL

def trl_importable() -> str | None:
    try:
        import trl  # noqa: F401
        from trl.trainer.dpo_trainer import DataCollatorForVisionPreference  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"trl is not importable: {type(exc).__name__}: {exc}"
    return None


def _trl_rows_tokens(batch: dict, i: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of row i of a TRL batch (padding and flush-left removed)."""
    ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
    comp = batch["completion_mask"][i][batch["attention_mask"][i].bool()].bool().tolist()
    start = comp.index(True)
    return ids[:start], ids[start:]


def trl_collate(processor, rows):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    collator = DataCollatorForVisionPreference(processor=processor, max_length=None)
    examples = [{"images": list(r["images"]), "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                for r in rows]
    return collator(examples)


def check_trl_collation(processor, groups, encoded, encoder) -> tuple[dict, dict | None, list]:
    reason = trl_importable()
    if reason:
        return {"name": "trl_collation", "status": "skipped", "reason": reason}, None, []
    rows = trl_pair_rows(groups, encoder)
    batch = trl_collate(processor, rows)
    by_id = {e.group_id: e for e in encoded}
    n = len(rows)
    mismatches = []
    for i, r in enumerate(rows):
        e = by_id[r["group_id"]]
        b, w = r["pair"]
        for side, idx in ((i, b), (n + i, w)):
            prompt, completion = _trl_rows_tokens(batch, side)
            if prompt != e.prefix["input_ids"][0].tolist():
                mismatches.append(f"row {side}: prompt tokens differ")
            if completion != e.branches[idx].ids:
                mismatches.append(f"row {side}: completion tokens differ ({len(completion)} vs {len(e.branches[idx].ids)})")
    ours_pixels = torch.cat([e.prefix["pixel_values"] for r in rows for e in [by_id[r["group_id"]]]] * 2)
    pixel_diff = float((batch["pixel_values"].float() - ours_pixels.float()).abs().max())
    check = {"name": "trl_collation", "status": "ok", "rows": 2 * n, "mismatches": mismatches[:10],
             "max_abs_diff_pixel_values": pixel_diff, "passed": not mismatches and pixel_diff == 0.0}
    return check, batch, rows


def trl_batch_logps(model, batch) -> torch.Tensor:
    """Summed completion log-probs of each row of a TRL batch through the model's full forward (the same
    inputs TRL's DPOTrainer feeds; its fused LM head needs Triton, the full logits do not)."""
    from mmrlhf_lite.models.wrappers import unwrap

    device = next(model.parameters()).device
    keys = [k for k in batch if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")]
    base = unwrap(model).model
    out = []
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):  # one row at a time: full logits of a batch are large
            if hasattr(base, "rope_deltas"):
                base.rope_deltas = None
            row = {k: batch[k][i:i + 1] for k in keys if k not in ("pixel_values", "image_grid_thw")}
            n_img = batch["image_grid_thw"].shape[0] // batch["input_ids"].shape[0]
            thw = batch["image_grid_thw"][i * n_img:(i + 1) * n_img]
            sizes = thw.prod(-1).tolist()
            start = sum(batch["image_grid_thw"][:i * n_img].prod(-1).tolist())
            row["pixel_values"] = batch["pixel_values"][start:start + sum(sizes)]
            row["image_grid_thw"] = thw
            logits = model(**{k: v.to(device) for k, v in row.items()}, use_cache=False).logits[0].float()
            lp = logits[:-1].log_softmax(-1)
            tgt = batch["input_ids"][i, 1:].to(device)
            mask = batch["completion_mask"][i, 1:].to(device).bool()
            out.append((lp.gather(1, tgt[:, None]).squeeze(1) * mask).sum())
    return torch.stack(out).cpu()


def check_trl_batch(model, family, groups, encoded, batch, rows, dtype: str) -> dict:
    if batch is None:
        return {"name": "trl_batch", "status": "skipped", "reason": trl_importable() or "no TRL batch"}
    tol = tolerances(dtype)
    policy, _ = ours_logps(model, family, encoded)
    trl = trl_batch_logps(model, batch)
    n = len(rows)
    index = {}
    off = 0
    for g in groups:
        index[g.id] = off
        off += len(g.responses)
    chosen = torch.stack([policy[index[r["group_id"]] + r["pair"][0]] for r in rows])
    rejected = torch.stack([policy[index[r["group_id"]] + r["pair"][1]] for r in rows])
    d_c, ok_c = _logp_ok(chosen, trl[:n], tol)
    d_r, ok_r = _logp_ok(rejected, trl[n:], tol)
    return {"name": "trl_batch", "status": "ok", "rows": 2 * n, "max_abs_diff_chosen_logp": d_c,
            "max_abs_diff_rejected_logp": d_r, "tolerance": tol, "passed": ok_c and ok_r}


def check_trl_trainer(spec, model_dir: str, groups, encoder, dtype: str) -> dict:
    """Ours vs TRL's DPOTrainer itself (fused LM head, its loss) on the same model object. CUDA + TRL."""
    if not torch.cuda.is_available():
        return {"name": "trl_trainer", "status": "skipped",
                "reason": "TRL's DPOTrainer needs CUDA (its fused LM head is a Triton kernel)"}
    reason = trl_importable()
    if reason:
        return {"name": "trl_trainer", "status": "skipped", "reason": reason}
    from trl.trainer.utils import use_adapter

    from mmrlhf_lite.models.families import detect_family

    from .trl_systems import build_trainer

    tol = tolerances(dtype)
    family = detect_family(model_dir)
    rows = trl_pair_rows(groups, encoder)
    with tempfile.TemporaryDirectory(prefix="mmrlhf-gate-trl-") as tmp:
        trainer = build_trainer(spec, model_dir, family, encoder.processor, rows, tmp, unsloth=False,
                                n_steps=1, bf16=dtype == "bfloat16", dtype=dtype)
        model = trainer.model
        randomize_lora(model)
        model.eval()
        examples = [trainer.train_dataset[i] for i in range(len(rows))]
        batch = trainer._prepare_inputs(trainer.data_collator(examples))
        model_kwargs = {k: v for k, v in batch.items()
                        if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        seq = batch["completion_mask"].shape[1] - 1
        with torch.no_grad(), trainer.compute_loss_context_manager():
            trl_policy = model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs[:, -seq:].sum(1)
            with use_adapter(trainer.accelerator.unwrap_model(model), adapter_name=None):
                trl_ref = model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs[:, -seq:].sum(1)
            trl_loss = float(trainer.compute_loss(model, batch))
        n = len(rows)
        trl_pair = -F.logsigmoid(BETA * ((trl_policy[:n] - trl_ref[:n]) - (trl_policy[n:] - trl_ref[n:]))).float().cpu()
        encoded = [encoder.encode_policy(g) for g in groups]
        policy, reference = ours_logps(model, family, encoded)
    pairs = pairs_of(groups)
    ours_losses, ours_mean = ours_pair_losses(policy, reference, pairs)
    d_pc, ok_pc = _logp_ok(torch.stack([policy[b] for b, _ in pairs]), trl_policy[:n].float(), tol)
    d_pr, ok_pr = _logp_ok(torch.stack([policy[w] for _, w in pairs]), trl_policy[n:].float(), tol)
    d_rc, ok_rc = _logp_ok(torch.stack([reference[b] for b, _ in pairs]), trl_ref[:n].float(), tol)
    d_rr, ok_rr = _logp_ok(torch.stack([reference[w] for _, w in pairs]), trl_ref[n:].float(), tol)
    d_loss = float((ours_losses - trl_pair).abs().max())
    d_mean = abs(ours_mean - trl_loss)
    return {"name": "trl_trainer", "status": "ok", "pairs": n, "max_abs_diff_policy_chosen_logp": d_pc,
            "max_abs_diff_policy_rejected_logp": d_pr, "max_abs_diff_reference_chosen_logp": d_rc,
            "max_abs_diff_reference_rejected_logp": d_rr, "max_abs_diff_pair_loss": d_loss,
            "abs_diff_mean_loss_vs_trainer_compute_loss": d_mean, "tolerance": tol,
            "passed": all((ok_pc, ok_pr, ok_rc, ok_rr)) and d_loss <= tol["loss_abs"] and d_mean <= tol["loss_abs"]}


# --------------------------------------------------------------------------------------------------

def run_gate(spec, n_groups: int = 2, dtype: str | None = None) -> dict:
    """All checks on `n_groups` synthetic groups of the run's shape; one `kind: gate` row."""
    from mmrlhf_lite.models.encoding import GroupEncoder

    from .data import make_groups
    from .runs import load_ours

    dtype = dtype or "float32"
    checks = []
    try:
        model, processor = load_ours(spec.model_dir, "transformers", packed=True, dtype=dtype,
                                      seed=spec.seed)
        family = model.mmrlhf.family
        randomize_lora(model, seed=spec.seed)
        model.eval()
        encoder = GroupEncoder(processor, family, max_length=1 << 20)
        groups = make_groups(processor.tokenizer, spec.synthetic(), n_groups)
        encoded = [encoder.encode_policy(g) for g in groups]
        checks.append(check_independent(model, family, groups, encoded, dtype))
        collation, batch, rows = check_trl_collation(processor, groups, encoded, encoder)
        checks.append(collation)
        checks.append(check_trl_batch(model, family, groups, encoded, batch, rows, dtype))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        checks.append(check_trl_trainer(spec, spec.model_dir, groups, encoder, dtype))
    except Exception as exc:  # noqa: BLE001 - a crashed gate is a failed gate, recorded
        checks.append({"name": "error", "status": "error", "reason": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-3000:], "passed": False})
    ran = [c for c in checks if c.get("status") != "skipped"]
    return {"kind": "gate", "model": spec.model, "dtype": dtype, "groups": n_groups, "w": 0.0, "beta": BETA,
            "checks": checks, "passed": bool(ran) and all(c.get("passed") for c in ran),
            "skipped": [c["name"] for c in checks if c.get("status") == "skipped"]}
