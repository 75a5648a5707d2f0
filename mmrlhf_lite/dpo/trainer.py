"""Stage `dpo`: MM-DPO on preference groups with cached reference log-probs and reward margins.

One DPO step, read top to bottom: `DpoCollator` turns the step's groups into a batch (the encoded groups,
every ranked pair as indices into the flat list of responses, each pair's margin delta, the cached
reference log-probs, each pair's SFT response by `dpo.sft_target`); `DpoTrainer.group_loss` runs
`policy_forward` (one packed sequence per group: the prompt and its image tokens once, log-probs gathered on
response tokens only, models/logprobs.py) and forms every pair's loss from the K log-probs with
`mm_dpo_loss` (dpo/loss.py: the dynamic beta_i from delta, the SFT term). The optimizer step, accumulation,
schedule and checkpoints are transformers.Trainer's (training.GroupTrainer). No reference forward pass runs
during training.

In the run folder it reads the training groups (`data.path`), `<cache>/reference.jsonl` (the `reference`
stage; entries it lost are computed first) and, with `dpo.margin_source: reward`, `score/margins.jsonl`; it
writes `dpo/checkpoints/checkpoint-N/` while it trains (resume points, removed once it is done),
`dpo/final/` (the policy's LoRA adapter and `mmrlhf_lite.json`), `dpo/train_result.json`, its progress and
metrics in `events.jsonl` and, through train.py, `stages/dpo.json`.

    python -m mmrlhf_lite.train recipes/demo.yaml --stages dpo
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import distributed
from ..cache.reference import reference_logps
from ..models.encoding import GroupEncoder
from ..models.loading import load_model, save_adapter
from ..models.logprobs import group_forward, use_packing
from ..recipe import DpoConfig, TrainConfig
from ..training import (GroupTrainer, finished_result, remove_checkpoints, run_training, seed_everything,
                        training_arguments, write_result)
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


def sft_response(group, pair: tuple[int, int], target: str) -> int:
    """Index in `group` of the response whose mean token NLL the SFT term adds to `pair` = (better, worse):
    `chosen`, the pair's better response (REFERENCE.md: alpha * L_dpo + gamma * NLL(chosen)), or `best`,
    the group's rank-1 response (one response for all of the group's pairs)."""
    return pair[0] if target == "chosen" else group.best_index()


class DpoCollator:
    def __init__(self, encoder: GroupEncoder, cfg: DpoConfig, reference: dict[str, list[float]],
                 deltas: dict[str, list[float]]):
        self.encoder, self.cfg, self.reference, self.deltas = encoder, cfg, reference, deltas

    def __call__(self, groups) -> dict:
        encoded, pairs, deltas, ref, sft = [], [], [], [], []
        off = 0
        for g in groups:
            encoded.append(self.encoder.encode_policy(g))
            all_pairs = g.pairs()
            chosen = set(group_pairs(g, self.cfg.pairs))
            for (b, w), d in zip(all_pairs, self.deltas[g.id]):
                if (b, w) in chosen:
                    pairs.append((off + b, off + w))
                    deltas.append(d)
                    sft.append(off + sft_response(g, (b, w), self.cfg.sft_target))
            ref.extend(self.reference[g.id])
            off += len(g.responses)
        return {"encoded": encoded, "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
                "deltas": torch.tensor(deltas, dtype=torch.float32),
                "reference_logps": torch.tensor(ref, dtype=torch.float32),
                "sft_responses": torch.tensor(sft, dtype=torch.long)}


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
        if c.gamma > 0:  # per pair: the mean token NLL of its SFT response (dpo.sft_target, see sft_response)
            sft = torch.stack([-token_logps[i].mean() for i in batch["sft_responses"].tolist()])
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
    done = finished_result(out_dir, final, events)   # finished; killed before marked done
    if done is not None:
        return done
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
    model, processor = load_model(recipe.model, adapter=start_from, trainable=True, shard=True)
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
    state = trainer.trainable_state()   # sharded: gathered on every rank; else None (the model holds it whole)

    def write() -> dict:   # the policy and the result are written once
        save_adapter(model, final, state_dict=state, kind="policy", beta=dc.beta, w=dc.w, k=dc.k)
        result["train_seconds"] = round(time.time() - start, 1)
        write_result(out_dir, result)
        remove_checkpoints(out_dir / "checkpoints")
        return result
    return distributed.on_main("dpo: the policy", write)
