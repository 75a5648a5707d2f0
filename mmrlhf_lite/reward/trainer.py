"""Stage `reward`: train the critique reward model (LoRA + scalar head) on preference groups.

Per group, one packed forward scores all K responses: each branch is response + critique, the
critique tokens carry the LM loss and the last token feeds the head; every pair's Bradley-Terry term
comes from the K rewards (reward/loss.py). The image is encoded once per group.

In the run folder it reads the training groups (`data.path`; the demo set in `data/demo/`) and writes
`reward/checkpoints/checkpoint-N/` while it trains (resume points, removed once it is done),
`reward/final/` (the LoRA adapter, the head and `mmrlhf_lite.json`: what the score and eval stages load),
`reward/train_result.json` (loss, steps, seconds, held-out accuracy with the dataset's critiques), its
progress and metrics in `events.jsonl`, and, through train.py, `stages/reward.json`. With
`reward.model_from` it trains nothing and the other stages read that run's `reward/final/`.

    python -m mmrlhf_lite.train recipes/demo.yaml --stages reward
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed
from ..events import EventLog
from ..models.encoding import GroupEncoder
from ..models.loading import load_model, save_adapter
from ..models.wrappers import unwrap
from ..models.logprobs import group_forward, use_packing
from ..models.reward_score import TEMPLATE_VERSION, hybrid_score
from ..recipe import RewardConfig
from ..training import (GroupTrainer, finished_result, remove_checkpoints, run_training, seed_everything,
                        training_arguments, write_result)
from .loss import bradley_terry, reward_loss, step_counts
from .prompt import CritiqueEncoder


def pair_tensors(groups, offsets: list[int], margin_scale: float = 0.0):
    """Flat (P, 2) ranked pairs, (T, 2) tie pairs and (P,) margins for responses laid out group after group."""
    pairs, ties, margins = [], [], []
    for g, off in zip(groups, offsets):
        for b, w in g.pairs():
            pairs.append((off + b, off + w))
            sb, sw = g.responses[b].score, g.responses[w].score
            margins.append(margin_scale * (sb - sw) if margin_scale and sb is not None and sw is not None else 0.0)
        for i, j in g.ties():
            ties.append((off + i, off + j))
    as_idx = lambda x: torch.tensor(x, dtype=torch.long).reshape(-1, 2)  # noqa: E731
    return as_idx(pairs), as_idx(ties), torch.tensor(margins, dtype=torch.float32)


class RewardCollator:
    def __init__(self, critique_encoder: CritiqueEncoder, margin_scale: float, response_targets: bool = False):
        self.enc = critique_encoder
        self.margin_scale = margin_scale
        self.response_targets = response_targets

    def __call__(self, groups) -> dict:
        encoded, offsets, n, critiques = [], [], 0, 0
        for g in groups:
            e, parts = self.enc.encode(g, response_targets=self.response_targets)
            encoded.append(e)
            critiques += sum(1 for p in parts if p.critique)
            offsets.append(n)
            n += len(g.responses)
        pairs, ties, margins = pair_tensors(groups, offsets, self.margin_scale)
        return {"encoded": encoded, "pairs": pairs, "ties": ties, "critiques": critiques,
                "margins": margins if self.margin_scale else None}


def response_logp_weight(model) -> float:
    """The head's weight on the response's mean token log-prob (0 = the paper's head alone)."""
    return float(getattr(unwrap(model).reward_head, "response_logp_weight", 0.0) or 0.0)


@dataclass
class Rewards:
    """What one forward of the critique reward model gives, per branch (response), in input order.

    `scores` = `head` + response_logp_weight * `response_logp` (the hybrid score when the weight is > 0;
    the paper's head alone at 0). The parts are kept apart: the centring loss acts on the head's part only,
    the evaluation reports each part's accuracy, and the log-prob part has its own ranking loss."""
    scores: torch.Tensor                 # (N,)
    head: torch.Tensor                   # (N,) head(h at the branch's last token)
    response_logp: torch.Tensor | None   # (N,) mean log p(response tokens); None when no branch marks them
    critique_token_logps: list[torch.Tensor] = field(default_factory=list)  # per branch (n_critique,); [] unless asked


def compute_rewards(model, spec, encoded, packed: bool, with_logps: bool) -> Rewards:
    """The rewards of a list of encoded critique groups (one packed or unpacked forward).

    reward = head(h at the branch's last token) [+ response_logp_weight * mean log p(response tokens)
    when the branches mark the response's tokens as targets (CritiqueEncoder.encode(response_targets=True))].
    `with_logps`: also return each branch's critique token log-probs (the critique LM loss)."""
    n_resp = [getattr(b, "n_response", 0) for e in encoded for b in e.branches]
    need_resp = any(n_resp)
    out = group_forward(model, spec, encoded, packed=packed, logps=with_logps or need_resp, hidden=True)
    head = unwrap(model).reward_head
    head_rewards = rewards = head(torch.stack(out.last_hidden))
    crit = [t[n:] for t, n in zip(out.token_logps, n_resp)] if with_logps else []
    resp = None
    if need_resp:
        resp = torch.stack([t[:n].mean() if n else t.new_zeros(()) for t, n in zip(out.token_logps, n_resp)])
        rewards = hybrid_score(head_rewards, resp, response_logp_weight(model))
    return Rewards(scores=rewards, head=head_rewards, response_logp=resp, critique_token_logps=crit)


class RewardTrainer(GroupTrainer):
    def __init__(self, *args, cfg: RewardConfig, spec, packed: bool, **kwargs):
        self.cfg, self.spec, self.packed = cfg, spec, packed
        super().__init__(*args, **kwargs)

    def step_counts(self, batch) -> dict[str, float]:
        return step_counts(batch["pairs"], batch["ties"], batch["critiques"] if self.cfg.w_crit > 0 else 0)

    def group_loss(self, model, batch, norm=None):
        c = self.cfg
        out = compute_rewards(model, self.spec, batch["encoded"], self.packed, c.w_crit > 0)
        rewards, token_logps, head_rewards = out.scores, out.critique_token_logps, out.head
        pairs = batch["pairs"].to(rewards.device)
        margins = None if batch["margins"] is None else batch["margins"].to(rewards.device)
        loss, parts = reward_loss(rewards, pairs, batch["ties"].to(rewards.device),
                                  token_logps if c.w_crit > 0 else [], w_rank=c.w_rank, w_tie=c.w_tie,
                                  w_center=c.w_center, w_crit=c.w_crit, center_rewards=head_rewards, margins=margins,
                                  norm=norm)
        if c.response_logp_weight > 0 and c.w_response_rank > 0:
            # the log-prob part ranked on its own: once the head reads the critiques' verdicts the joint
            # ranking loss is near 0 and would leave the LM's own reading of the image untrained
            lm_part = rewards - head_rewards
            lm_bt = bradley_terry(lm_part, pairs, margins, (norm or {}).get("ranked"))
            loss = loss + c.w_response_rank * lm_bt
            with torch.no_grad():
                parts["response_bt_loss"] = bradley_terry(lm_part, pairs, margins).item()
            if pairs.numel():
                parts["response_pair_accuracy"] = (lm_part[pairs[:, 0]] > lm_part[pairs[:, 1]]).float().mean().item()
        return loss, parts


def head_settings(rc: RewardConfig) -> dict:
    return {"kind": rc.head, "dropout": rc.head_dropout, "response_logp_weight": rc.response_logp_weight}


def trainable_groups(groups, events: EventLog):
    keep = [g for g in groups if g.pairs() or g.ties()]
    if len(keep) < len(groups):
        events.warning(f"{len(groups) - len(keep)} groups have no ranked or tied pair and are not used")
    if not keep:
        raise ValueError("no training group has a ranked or tied pair")
    return keep


@torch.no_grad()
def given_critique_accuracy(model, spec, crit: CritiqueEncoder, groups, packed: bool, batch: int = 4) -> float | None:
    """Held-out pair accuracy with the dataset's critiques (teacher-forced; no generation)."""
    model.eval()
    right = total = 0
    for s in range(0, len(groups), batch):
        chunk = groups[s:s + batch]
        encoded = [crit.encode(g, response_targets=response_logp_weight(model) > 0)[0] for g in chunk]
        rewards = compute_rewards(model, spec, encoded, packed, with_logps=False).scores
        off = 0
        for g in chunk:
            for b, w in g.pairs():
                right += int(rewards[off + b] > rewards[off + w])
                total += 1
            off += len(g.responses)
    return right / total if total else None


def run_stage(ctx) -> dict:
    recipe, events = ctx.recipe, ctx.events
    if recipe.reward.model_from:
        if not (ctx.reward_model_dir() / "adapter_config.json").exists():
            raise FileNotFoundError(f"reward.model_from: no trained reward model in {ctx.reward_model_dir()}")
        events.info(f"using the reward model of {recipe.reward.model_from}; nothing to train")
        return {"model_from": recipe.reward.model_from}
    out_dir = ctx.run.stage_dir("reward")
    final = out_dir / "final"
    done = finished_result(out_dir, final, events)   # finished; killed before marked done
    if done is not None:
        return done
    train_groups, eval_groups = ctx.data()
    seed_everything(recipe.run.seed)
    train_groups = trainable_groups(train_groups, events)
    rc = recipe.reward
    model, processor = load_model(recipe.model, reward_head=head_settings(rc), shard=True)
    info = model.mmrlhf
    packed = use_packing(info.family, recipe.model.packing, recipe.model.attn_implementation)
    events.info(f"reward model: {info.family.name} via {info.backend} on {info.device}, "
                f"{'packed groups' if packed else 'one row per response (unpacked)'}")
    encoder = GroupEncoder(processor, info.family, max_length=rc.train.max_length, max_frames=recipe.data.max_frames)
    crit = CritiqueEncoder(encoder)
    args = training_arguments(rc.train, out_dir / "checkpoints", device=info.device, dtype=info.dtype,
                              seed=recipe.run.seed, report_to=recipe.run.report_to)
    trainer = RewardTrainer(model, args, groups=train_groups, collate=RewardCollator(crit, rc.margin_scale, rc.response_logp_weight > 0),
                            events=events, stop_check=ctx.stop_requested, cfg=rc, spec=info.family, packed=packed)
    start = time.time()
    result = run_training(trainer, out_dir / "checkpoints")
    state = trainer.trainable_state()   # sharded: gathered on every rank; else None (the model holds it whole)
    held_out = [g for g in eval_groups if g.pairs()]
    acc = distributed.forward(model, lambda: given_critique_accuracy(model, info.family, crit, held_out, packed)
                              ) if held_out else None

    def write() -> dict:   # the model and the result are written once
        save_adapter(model, final, state_dict=state, kind="reward", template=TEMPLATE_VERSION, head=rc.head)
        result["train_seconds"] = round(time.time() - start, 1)
        if acc is not None:
            result["eval_pair_accuracy_given"] = acc
            events.metrics(step=result["steps"], eval_pair_accuracy_given=acc)
        write_result(out_dir, result)
        remove_checkpoints(out_dir / "checkpoints")
        return result
    return distributed.on_main("reward: the model", write)


def reward_model_dir(run_dir: str | Path) -> Path:
    """A run folder's critique reward model: its own `reward/final`, or that of its `reward.model_from`."""
    run_dir = Path(run_dir)
    own = run_dir / "reward" / "final"
    recipe_file = run_dir / "recipe.yaml"
    if not own.exists() and recipe_file.exists():
        import yaml
        source = ((yaml.safe_load(recipe_file.read_text()) or {}).get("reward") or {}).get("model_from")
        if source:
            return Path(source) / "reward" / "final"
    return own
