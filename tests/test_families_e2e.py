"""Every family's tiny twin runs the pipeline the CLI runs: critique reward-model training, scoring, reference
log-probs and MM-DPO packed; then MM-DPO unpacked on the same reference cache and margins. Checked: losses
finite and lower on the second pass over the same groups than on the first, the trainers' metrics
present, adapters saved with trained (non-zero) LoRA B matrices, and the packed and unpacked first-step
DPO losses equal (same groups, same initial adapter: only the forward's layout differs).

    python -m pytest -q tests/test_families_e2e.py        # about 20-40 s per family on 1 CPU thread
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mmrlhf_lite.models.families import FAMILIES
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline

pytestmark = pytest.mark.slow

STEPS = 8        # two passes over the 4 training groups (one group per optimizer step)
TRAIN_GROUPS = 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread is fastest, and immune to other processes competing for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _overrides(family: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.path=tiny:{family}:xs", "model.device=cpu", "model.load_in_4bit=true", "model.lora_vision=false",
            f"run.dir={run_dir}", "data.demo.groups=5", "data.demo.image_size=56", "data.eval_fraction=0",
            f"data.max_groups={TRAIN_GROUPS}", "reward.critique_mode=given", "run.stages=[reward,score,reference,dpo]",
            *(f"{s}.train.{k}" for s in ("reward", "dpo") for k in (
                f"max_steps={STEPS}", "grad_accum=1", "groups_per_step=1", "logging_steps=1", "warmup_ratio=0",
                "lr_scheduler=constant", f"save_steps={STEPS}")),
            "reward.train.learning_rate=2e-3", "dpo.train.learning_rate=2e-3", *extra]


def _metrics(run_dir: Path, stage: str) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["type"] == "metrics" and e.get("stage") == stage and "loss" in e]


def _lora_b_norm(adapter: Path) -> float:
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    b = [t.float().norm() for k, t in tensors.items() if "lora_B" in k]
    assert b, f"no LoRA B matrices in {adapter}"
    return float(torch.stack(b).norm())


def _check_training(run_dir: Path, stage: str, keys: tuple[str, ...]) -> list[dict]:
    rows = _metrics(run_dir, stage)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), rows
    for r in rows:
        for k in ("loss",) + keys:
            assert k in r and r[k] is not None and math.isfinite(r[k]), (stage, k, r)
    first = sum(r["loss"] for r in rows[:TRAIN_GROUPS]) / TRAIN_GROUPS
    second = sum(r["loss"] for r in rows[TRAIN_GROUPS:]) / TRAIN_GROUPS
    assert second < first, f"{stage}: mean loss over the same groups {first:.4f} -> {second:.4f}"
    return rows


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reward_and_mm_dpo_packed_and_unpacked(family, tmp_path, cache_dir):
    run_a = tmp_path / "packed"
    run_pipeline(load_recipe(None, _overrides(family, run_a, "model.packing=auto"), check_paths=False), echo=False)

    _check_training(run_a, "reward", ("bt_loss", "critique_loss", "pair_accuracy", "reward_margin"))
    dpo_packed = _check_training(run_a, "dpo", ("dpo_loss", "implicit_accuracy", "beta_mean", "sft_nll"))
    for stage in ("reward", "dpo"):
        final = run_a / stage / "final"
        assert (final / "adapter_config.json").exists() and _lora_b_norm(final) > 0, stage
        assert json.loads((run_a / stage / "train_result.json").read_text())["steps"] == STEPS
    meta = json.loads((run_a / "reward" / "final" / "mmrlhf_lite.json").read_text())
    assert meta["reward_head"]["kind"] == "mlp"
    margins = [json.loads(line) for line in (run_a / "score" / "margins.jsonl").read_text().splitlines()]
    assert len(margins) == TRAIN_GROUPS and all(len(m["scores"]) == 4 for m in margins)
    reference = [json.loads(line) for line in (run_a / "cache" / "reference.jsonl").read_text().splitlines()]
    assert len(reference) == 4 * TRAIN_GROUPS and all(r["logp"] < 0 for r in reference)

    # unpacked MM-DPO: same data, cache folder and margins; one row per response. Reference entries are keyed
    # on the packing too, so the unpacked run computes its own (equal within fp noise: the first losses below)
    run_b = tmp_path / "unpacked"
    (run_b / "score").mkdir(parents=True)
    shutil.copy(run_a / "score" / "margins.jsonl", run_b / "score" / "margins.jsonl")
    recipe_b = load_recipe(None, _overrides(family, run_b, "model.packing=unpacked", f"cache.dir={run_a / 'cache'}"),
                           check_paths=False)
    run_pipeline(recipe_b, ["reference", "dpo"], echo=False)
    both = [json.loads(line) for line in (run_a / "cache" / "reference.jsonl").read_text().splitlines()]
    assert len(both) == 8 * TRAIN_GROUPS
    packed_lp = {(r["group_id"], r["response"]): r["logp"] for r in both[:4 * TRAIN_GROUPS]}
    unpacked_lp = {(r["group_id"], r["response"]): r["logp"] for r in both[4 * TRAIN_GROUPS:]}
    assert unpacked_lp.keys() == packed_lp.keys()
    assert all(unpacked_lp[k] == pytest.approx(packed_lp[k], rel=1e-4, abs=1e-3) for k in packed_lp)
    dpo_unpacked = _check_training(run_b, "dpo", ("dpo_loss", "implicit_accuracy", "sft_nll"))
    assert "one row per response (unpacked)" in (run_b / "events.jsonl").read_text()
    assert "packed groups" in (run_a / "events.jsonl").read_text()
    a, b = dpo_packed[0], dpo_unpacked[0]
    for k in ("loss", "dpo_loss", "sft_nll", "logp_chosen", "logp_rejected"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-4), (k, a[k], b[k])
    assert _lora_b_norm(run_b / "dpo" / "final") > 0
