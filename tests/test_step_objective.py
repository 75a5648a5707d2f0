"""The optimizer-step objective does not depend on how the step's groups are split: 1 group x 4
accumulation steps, 2 x 2 and 4 x 1 give the same gradients (every pair weighs the same), for MM-DPO
with its SFT term and for the reward model with its tie, center and critique terms. Groups of different
sizes (1, 6, 2 and 1 ranked pairs, one tie) make a per-micro-batch mean differ from the step's mean.

Real loading code on the tiny offline Qwen2-VL; the trainers are built as the stages build them.
"""
import random

import pytest
import torch
from transformers import TrainerCallback

from mmrlhf_lite.data.demo import generate
from mmrlhf_lite.data.groups import Response
from mmrlhf_lite.dpo.loss import mm_dpo_loss
from mmrlhf_lite.events import EventLog
from mmrlhf_lite.models.encoding import GroupEncoder
from mmrlhf_lite.models.loading import load_model
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.reward.loss import reward_loss, step_counts
from mmrlhf_lite.training import seed_everything, training_arguments

BASE = ["model.path=tiny:qwen2_vl:xs", "model.load_in_4bit=false", "model.device=cpu", "model.lora_dropout=0",
        "data.demo.image_size=56"]
SPLITS = [(1, 4), (2, 2), (4, 1)]       # (groups per micro-batch, accumulation steps): 4 groups per step


class _Grads(TrainerCallback):
    """The summed gradients the first optimizer step uses (max_grad_norm = 1e9: never clipped)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad and p.grad is not None}


def _groups(tmp_path):
    """Four demo groups with 2, 4, 3 and 2 responses; the third has a tie (ranks 1, 2, 2)."""
    groups = [g for g in generate(tmp_path / "demo", groups=8, seed=3, image_size=56, safety_fraction=0)][:4]
    for g, k in zip(groups, (2, 4, 3, 2)):
        g.responses = sorted(g.responses, key=lambda r: r.rank)[:k]
    g = groups[2]
    g.responses = [g.responses[0], g.responses[1], Response(g.responses[2].text, rank=g.responses[1].rank,
                                                            score=g.responses[1].score,
                                                            critique=g.responses[2].critique)]
    assert [len(g.pairs()) for g in groups] == [1, 6, 2, 1] and len(groups[2].ties()) == 1
    return groups


def _dpo_trainer(tmp_path, groups, overrides, out_name):
    """The stage's collator and trainer on `groups` (margins from the groups' scores, random reference)."""
    from mmrlhf_lite.dpo.trainer import DpoCollator, DpoTrainer, margins_for

    recipe = load_recipe(None, BASE + overrides + [f"run.dir={tmp_path / 'run'}"])
    dc = recipe.dpo
    rng = random.Random(0)
    reference = {g.id: [rng.uniform(-30, -10) for _ in g.responses] for g in groups}
    deltas = margins_for(groups, "scores", tmp_path)
    seed_everything(0)
    model, processor = load_model(recipe.model)
    info = model.mmrlhf
    encoder = GroupEncoder(processor, info.family, max_length=dc.train.max_length, max_frames=4)
    args = training_arguments(dc.train, tmp_path / out_name, device=info.device, dtype=info.dtype,
                              seed=0, report_to="none")
    collator = DpoCollator(encoder, dc, reference, deltas)
    trainer = DpoTrainer(model, args, groups=groups, collate=collator,
                         events=EventLog(None, echo=False), cfg=dc, spec=info.family, packed=True)
    return trainer, collator, reference


def _grads_dpo(tmp_path, groups, b, a):
    trainer, _, _ = _dpo_trainer(tmp_path, groups, [f"dpo.train.groups_per_step={b}", f"dpo.train.grad_accum={a}",
                                                    "dpo.train.max_steps=1", "dpo.train.max_grad_norm=1e9",
                                                    "dpo.gamma=0.5", "dpo.w=0.5"], f"dpo-{b}x{a}")
    cb = _Grads()
    trainer.add_callback(cb)
    trainer.train()
    return cb.grads


def _grads_reward(tmp_path, groups, b, a):
    from mmrlhf_lite.reward.prompt import CritiqueEncoder
    from mmrlhf_lite.reward.trainer import RewardCollator, RewardTrainer

    recipe = load_recipe(None, BASE + [f"reward.train.groups_per_step={b}", f"reward.train.grad_accum={a}",
                                       "reward.train.max_steps=1", "reward.train.max_grad_norm=1e9",
                                       "reward.w_tie=0.5", "reward.w_center=0.1", "reward.w_crit=1.0",
                                       f"run.dir={tmp_path / 'run'}"])
    rc = recipe.reward
    seed_everything(0)
    model, processor = load_model(recipe.model, reward_head={"kind": rc.head, "dropout": 0.0})
    info = model.mmrlhf
    crit = CritiqueEncoder(GroupEncoder(processor, info.family, max_length=rc.train.max_length, max_frames=4))
    args = training_arguments(rc.train, tmp_path / f"reward-{b}x{a}", device=info.device, dtype=info.dtype,
                              seed=0, report_to="none")
    trainer = RewardTrainer(model, args, groups=groups, collate=RewardCollator(crit, rc.margin_scale),
                            events=EventLog(None, echo=False), cfg=rc, spec=info.family, packed=True)
    cb = _Grads()
    trainer.add_callback(cb)
    trainer.train()
    return cb.grads


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_gradients_do_not_depend_on_the_split(tmp_path, stage):
    groups = _groups(tmp_path)
    run = _grads_dpo if stage == "dpo" else _grads_reward
    grads = {split: run(tmp_path, groups, *split) for split in SPLITS}
    ref = grads[(4, 1)]
    assert ref and any(g.abs().max() > 0 for g in ref.values())
    for split in SPLITS[:2]:
        got = grads[split]
        assert got.keys() == ref.keys()
        for name in ref:
            scale = ref[name].abs().max().item()   # fp32 sums in another order: relative to the tensor's scale
            err = (got[name] - ref[name]).abs().max().item()
            assert err <= 1e-4 * scale + 1e-9, (stage, split, name, err, scale)


@pytest.mark.parametrize("target", [None, "chosen", "best"])
def test_dpo_step_loss_adds_the_nll_of_each_pairs_chosen_response(tmp_path, target):
    """The stage's loss on 4 groups (1, 6, 2 and 1 ranked pairs) against the formula written out in float64
    from the policy's own log-probs: mean over pairs of -log sigmoid(beta h_i) + gamma * NLL_i, where NLL_i
    is the mean token NLL of pair i's chosen (better) response, the paper's and the default (target None),
    or of its group's rank-1 response (`best`). In the 4-response group the pairs (1, 2), (1, 3) and (2, 3)
    have a chosen response that is not the best, so the two targets give different losses."""
    from mmrlhf_lite.dpo.trainer import policy_forward

    groups = _groups(tmp_path)
    overrides = ["dpo.gamma=0.5", "dpo.w=0", "dpo.beta=0.1"] + ([f"dpo.sft_target={target}"] if target else [])
    trainer, collator, reference = _dpo_trainer(tmp_path, groups, overrides, "dpo-sft")
    model = trainer.model
    with torch.no_grad():
        loss, metrics = trainer.group_loss(model, collator(groups))
        logps, token_logps = policy_forward(model, trainer.spec, [collator.encoder.encode_policy(g) for g in groups],
                                            packed=True)
    expected, nlls = {}, {}
    for sft_target in ("chosen", "best"):
        terms, off = [], 0
        for g in groups:
            ranks = g.ranks()
            best = min(range(len(ranks)), key=lambda i: ranks[i])
            for b, w in g.pairs():
                ratio = [logps[off + i].double().item() - reference[g.id][i] for i in (b, w)]
                sft = b if sft_target == "chosen" else best
                nll = -sum(token_logps[off + sft].double().tolist()) / len(token_logps[off + sft])
                nlls[(sft_target, g.id, b, w)] = nll
                terms.append(math_log1p_exp(-0.1 * (ratio[0] - ratio[1])) + 0.5 * nll)
            off += len(g.responses)
        assert len(terms) == 10
        expected[sft_target] = sum(terms) / len(terms)
    want = target or "chosen"
    # float32 forwards: about 1e-7 relative; the two targets' losses lie 1e-4 apart on this model
    assert abs(expected["chosen"] - expected["best"]) > 50 * 2e-6
    assert loss.item() == pytest.approx(expected[want], abs=2e-6)
    assert metrics["sft_nll"] == pytest.approx(sum(v for k, v in nlls.items() if k[0] == want) / 10, abs=2e-6)
    four = groups[1]
    assert len({nlls[(want, four.id, b, w)] for b, w in four.pairs()}) == (1 if want == "best" else 3)


# -- the pure functions: the shares of a split step add up to the step's mean (float64, by hand) ------------

def test_dpo_shares_add_up_to_the_pair_mean_with_the_sft_term():
    """Group A: 1 pair (loss log 2 at h = 0), best NLL 2; group B: 3 pairs (h = 0), best NLL 4.
    Step mean over the 4 pairs of (L_i + gamma NLL_i): log 2 + 0.5 * (2 + 3 * 4) / 4 = log 2 + 1.75."""
    import math

    zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
    a, _ = mm_dpo_loss(zeros(2), zeros(2), torch.tensor([[0, 1]]), zeros(1), w=0.0, gamma=0.5,
                       sft_nll=torch.tensor([2.0], dtype=torch.float64), num_pairs=4)
    b, _ = mm_dpo_loss(zeros(3), zeros(3), torch.tensor([[0, 1], [0, 2], [1, 2]]), zeros(3), w=0.0, gamma=0.5,
                       sft_nll=torch.full((3,), 4.0, dtype=torch.float64), num_pairs=4)
    assert (a + b).item() == pytest.approx(math.log(2) + 1.75, abs=1e-12)
    whole, _ = mm_dpo_loss(zeros(5), zeros(5), torch.tensor([[0, 1], [2, 3], [2, 4], [3, 4]]), zeros(4), w=0.0,
                           gamma=0.5, sft_nll=torch.tensor([2.0, 4.0, 4.0, 4.0], dtype=torch.float64))
    assert whole.item() == pytest.approx(math.log(2) + 1.75, abs=1e-12)
    # the per-micro-batch mean this replaces: (log 2 + 1) / 2 + (log 2 + 2) / 2 = log 2 + 1.5
    assert (a + b).item() != pytest.approx(math.log(2) + 1.5, abs=1e-6)


def test_reward_shares_add_up_to_the_step_means():
    g = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    p1, t1 = torch.tensor([[0, 1]]), torch.zeros(0, 2, dtype=torch.long)
    p2, t2 = torch.tensor([[0, 1], [0, 2]]), torch.tensor([[1, 2]])
    c1 = [torch.randn(4, generator=g, dtype=torch.float64)]
    c2 = [torch.randn(3, generator=g, dtype=torch.float64), torch.zeros(0, dtype=torch.float64),
          torch.randn(5, generator=g, dtype=torch.float64)]
    n1, n2 = step_counts(p1, t1, c1), step_counts(p2, t2, c2)
    norm = {k: n1[k] + n2[k] for k in n1}
    assert norm == {"ranked": 3.0, "tied": 1.0, "all": 4.0, "critiques": 3.0}
    kw = dict(w_rank=1.0, w_tie=0.5, w_center=0.1, w_crit=1.0)
    a, _ = reward_loss(r1, p1, t1, c1, norm=norm, **kw)
    b, _ = reward_loss(r2, p2, t2, c2, norm=norm, **kw)
    # independent: the step's means written out over the flat rewards [r1, r2]
    r = torch.cat([r1, r2]).tolist()
    ranked = [(0, 1), (2, 3), (2, 4)]
    bt = sum(math_log1p_exp(-(r[i] - r[j])) for i, j in ranked) / 3
    tie = (r[3] - r[4]) ** 2
    center = sum((r[i] + r[j]) ** 2 for i, j in ranked + [(3, 4)]) / 4
    crit = 2 * sum(-t.mean().item() for t in c1 + c2 if t.numel()) / 3
    assert (a + b).item() == pytest.approx(bt + 0.5 * tie + 0.1 * center + crit, abs=1e-12)


def math_log1p_exp(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), float64."""
    import math
    return math.log1p(math.exp(x))
