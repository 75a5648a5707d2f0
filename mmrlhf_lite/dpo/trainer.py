"""Stage `dpo`: MM-DPO on preference groups with cached reference log-probs and reward margins.

Each step forwards every response of its groups once (one packed sequence per group: the prompt and
its image tokens once), gathers log-probs on response tokens only, and forms every ranked pair's loss
from the K log-probs (dpo/loss.py). The reference log-probs come from the `reference` cache: no
reference forward pass runs during training. The margins delta come from the reward cache (`score`).

    python -m mmrlhf_lite.train recipes/demo.yaml --stages dpo
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import distributed
from ..cache.reference import reference_logps
from ..models.encoding import GroupEncoder
from ..models.loading import load_model, save_adapter
from ..models.logprobs import group_forward, use_packing
from ..recipe import DpoConfig, TrainConfig
from ..training import GroupTrainer, remove_checkpoints, run_training, seed_everything, training_arguments
from .loss import mm_dpo_loss


def group_pairs(group, mode: str) -> list[tuple[int, int]]:
    return group.pairs() if mode == "all" else group.best_vs_worst()


def margins_for(groups, source: str, run_dir: Path) -> dict[str, list[float]]:
    """Per group id, one delta per pair (in `group_pairs(..., "all")` order)."""
    if source == "none":
        return {g.id: [0.0] * len(g.pairs()) for g in groups}
    if source == "scores":
        out = {}
        for g in groups:
            if any(r.score is None for r in g.responses):
                raise ValueError(f"dpo.margin_source=scores but {g.source or g.id} has responses without a score")
            out[g.id] = [g.responses[b].score - g.responses[w].score for b, w in g.pairs()]
        return out
    from ..reward.scorer import load_margins, margins_key
    table = load_margins(run_dir, by="content")
    by_content = all("content" in rec for rec in table.values())
    out = {}
    for g in groups:
        rec = table.get(margins_key(g) if by_content else g.id)
        if rec is None or len(rec["scores"]) != len(g.responses):
            raise ValueError(f"group {g.id} ({g.source}) has no reward scores: re-run the `score` stage")
        s = rec["scores"]
        out[g.id] = [s[b] - s[w] for b, w in g.pairs()]
    return out


class DpoCollator:
    def __init__(self, encoder: GroupEncoder, cfg: DpoConfig, reference: dict[str, list[float]],
                 deltas: dict[str, list[float]]):
        self.encoder, self.cfg, self.reference, self.deltas = encoder, cfg, reference, deltas

    def __call__(self, groups) -> dict:
        encoded, pairs, deltas, ref, best, pair_group = [], [], [], [], [], []
        off = 0
        for gi, g in enumerate(groups):
            encoded.append(self.encoder.encode_policy(g))
            all_pairs = g.pairs()
            chosen = set(group_pairs(g, self.cfg.pairs))
            for (b, w), d in zip(all_pairs, self.deltas[g.id]):
                if (b, w) in chosen:
                    pairs.append((off + b, off + w))
                    deltas.append(d)
                    pair_group.append(gi)
            ref.extend(self.reference[g.id])
            best.append(off + g.best_index())
            off += len(g.responses)
        return {"encoded": encoded, "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
                "deltas": torch.tensor(deltas, dtype=torch.float32),
                "reference_logps": torch.tensor(ref, dtype=torch.float32),
                "best": torch.tensor(best, dtype=torch.long),
                "pair_group": torch.tensor(pair_group, dtype=torch.long)}


def policy_forward(model, spec, encoded, packed: bool):
    """(summed log-probs (N,), per-response token log-probs) of the policy for encoded groups."""
    out = group_forward(model, spec, encoded, packed=packed, logps=True)
    return torch.stack(out.logps), out.token_logps


class DpoTrainer(GroupTrainer):
    def __init__(self, *args, cfg: DpoConfig, spec, packed: bool, **kwargs):
        self.cfg, self.spec, self.packed = cfg, spec, packed
        super().__init__(*args, **kwargs)

    def step_counts(self, batch) -> dict[str, float]:
        return {"pairs": float(batch["pairs"].shape[0])}

    def group_loss(self, model, batch, norm=None):
        c = self.cfg
        logps, token_logps = policy_forward(model, self.spec, batch["encoded"], self.packed)
        sft = None
        if c.gamma > 0:  # each pair carries the NLL of its group's best response
            best_nll = torch.stack([-token_logps[i].mean() for i in batch["best"].tolist()])
            sft = best_nll[batch["pair_group"].to(best_nll.device)]
        loss, metrics = mm_dpo_loss(logps, batch["reference_logps"].to(logps.device), batch["pairs"].to(logps.device),
                                    batch["deltas"].to(logps.device), beta=c.beta, w=c.w, k=c.k,
                                    beta_floor=c.beta_floor, loss_type=c.loss_type,
                                    label_smoothing=c.label_smoothing, sft_nll=sft, alpha=c.alpha, gamma=c.gamma,
                                    n_tokens=torch.tensor([len(t) for t in token_logps], device=logps.device),
                                    num_pairs=None if norm is None else norm["pairs"])
        metrics["tokens"] = float(sum(e.packed_len() for e in batch["encoded"]))
        return loss, metrics


def policy_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "dpo" / "final"


def run_stage(ctx) -> dict:
    recipe, events = ctx.recipe, ctx.events
    out_dir = ctx.run.stage_dir("dpo")
    final = policy_dir(ctx.run_dir)
    if (out_dir / "train_result.json").exists() and (final / "adapter_config.json").exists():
        return json.loads((out_dir / "train_result.json").read_text())
    dc = recipe.dpo
    train_groups, _ = ctx.data()
    groups = [g for g in train_groups if group_pairs(g, dc.pairs)]
    if len(groups) < len(train_groups):
        events.warning(f"{len(train_groups) - len(groups)} groups have no ranked pair (ties only) and are not used")
    if not groups:
        if recipe.rounds.n > 0:
            events.info("no human-ranked training group: no offline MM-DPO; the online rounds start from the base "
                        "policy")
            return {"skipped": "no human-ranked training group; the rounds start from the base policy"}
        raise ValueError("no training group has a ranked pair for DPO")
    reference = dict(zip((g.id for g in groups), reference_logps(ctx, groups)))
    deltas = margins_for(groups, dc.margin_source if dc.w > 0 else "none", ctx.run_dir)
    return train_policy(ctx, groups, reference, deltas, out_dir, final)


def train_policy(ctx, groups, reference: dict[str, list[float]], deltas: dict[str, list[float]], out_dir: Path,
                 final: Path, *, start_from: Path | None = None, train: TrainConfig | None = None) -> dict:
    """MM-DPO on `groups` (their reference log-probs and pair margins by group id): checkpoints in
    `out_dir/checkpoints` (a stopped run resumes from the last), the policy adapter saved to `final`.
    `start_from`: continue training that saved policy adapter (online rounds) instead of a fresh LoRA;
    `train`: optimisation settings instead of dpo.train (a round's own step count)."""
    recipe, events = ctx.recipe, ctx.events
    dc = recipe.dpo
    train_cfg = train or dc.train
    seed_everything(recipe.run.seed)
    model, processor = load_model(recipe.model, adapter=start_from, trainable=True)
    info = model.mmrlhf
    packed = use_packing(info.family, recipe.model.packing, recipe.model.attn_implementation)
    events.info(f"policy: {info.family.name} via {info.backend} on {info.device}; "
                f"{'packed groups' if packed else 'one row per response (unpacked)'}; "
                f"beta={dc.beta} w={dc.w} k={dc.k} pairs={dc.pairs} margins={dc.margin_source if dc.w > 0 else 'none'}"
                + (f"; continuing from {start_from}" if start_from is not None else ""))
    encoder = GroupEncoder(processor, info.family, max_length=train_cfg.max_length, max_frames=recipe.data.max_frames)
    args = training_arguments(train_cfg, out_dir / "checkpoints", device=info.device, dtype=info.dtype,
                              seed=recipe.run.seed, report_to=recipe.run.report_to)
    trainer = DpoTrainer(model, args, groups=groups, collate=DpoCollator(encoder, dc, reference, deltas),
                         events=events, stop_check=ctx.stop_requested, cfg=dc, spec=info.family, packed=packed)
    start = time.time()
    result = run_training(trainer, out_dir / "checkpoints")
    state = trainer.trainable_state()   # sharded: gathered on every rank; else None (rank 0 reads the model)
    if not distributed.is_main():
        return result  # rank 0 writes the policy and the result
    save_adapter(model, final, state_dict=state, kind="policy", beta=dc.beta, w=dc.w, k=dc.k)
    result["train_seconds"] = round(time.time() - start, 1)
    (out_dir / "train_result.json").write_text(json.dumps(result, indent=2))
    remove_checkpoints(out_dir / "checkpoints")
    return result
