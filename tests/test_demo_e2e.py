"""The demo recipe end to end on CPU (slow; runs in CI): the critique reward model and MM-DPO learn from
the image, measured on held-out groups, and MM-DPO is reported side by side with plain DPO (w = 0).

The score stage uses the dataset's critiques here (`reward.critique_mode=given`) to keep CI time down;
`bash scripts/demo.sh` runs the recipe as shipped (generated critiques). The eval stage still reports
the reward bench in all three critique modes on 40 held-out groups.

    python -m pytest -q tests/test_demo_e2e.py -s
"""
import json
import time
from pathlib import Path

import pytest

from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.train import run_pipeline

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _stage_seconds(run_dir: Path) -> dict:
    out = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["type"] == "stage_end":
            out[e["stage"]] = e["seconds"]
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [
        f"run.dir={root / 'mm_dpo'}", f"cache.dir={root / 'cache'}", "reward.critique_mode=given",
        "eval.max_groups=40"])
    start = time.time()
    run_pipeline(recipe, echo=False)
    wall = time.time() - start
    report = json.loads((root / "mm_dpo" / "eval" / "report.json").read_text())
    return {"root": root, "report": report, "wall": wall, "seconds": _stage_seconds(root / "mm_dpo")}


def test_reward_model_learns_from_critiques(demo):
    rm = demo["report"]["reward_model"]
    before, after = rm["before"]["given"]["overall"]["acc"], rm["modes"]["given"]["overall"]["acc"]
    print(f"\nreward model held-out Acc (given): before {before:.3f} after {after:.3f}; "
          f"none {rm['modes']['none']['overall']['acc']:.3f}; generate {rm['modes']['generate']['overall']['acc']:.3f}; "
          f"reward stage {demo['seconds']['reward']:.0f} s")
    assert 0.3 <= before <= 0.7          # an untrained head ranks at chance
    assert after >= 0.9
    assert rm["modes"]["given"]["overall"]["acc_plus"] >= 0.7
    assert set(rm["modes"]) == {"given", "none", "generate"}
    assert demo["seconds"]["reward"] < 300


def test_generated_critiques_name_the_right_answer_more_often(demo):
    rm = demo["report"]["reward_model"]
    before = rm["before"]["generate"]["critique_fact_rate"]["rate"]
    after = rm["modes"]["generate"]["critique_fact_rate"]["rate"]
    print(f"\ncritiques naming the right value: before {before:.3f} after {after:.3f}")
    assert after > before + 0.15


def test_mm_dpo_learns_from_the_image(demo):
    pol = demo["report"]["policy"]
    print(f"\nMM-DPO held-out implicit accuracy {pol['implicit_accuracy']:.3f}; "
          f"win rate {pol['win_rate']['win_rate']:.3f}; stages {demo['seconds']}")
    assert pol["implicit_accuracy"] >= 0.8
    assert pol["win_rate"]["win_rate"] > 0.5


def test_plain_dpo_side_by_side(demo):
    """w = 0 on the same data, reward model and caches: nothing is recomputed before training."""
    root = demo["root"]
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [
        f"run.dir={root / 'plain_dpo'}", f"cache.dir={root / 'cache'}", f"reward.model_from={root / 'mm_dpo'}",
        "reward.critique_mode=given", "dpo.w=0", "eval.critique_modes=[]", "eval.policy_samples=0"])
    ctx = run_pipeline(recipe, ["score", "reference", "dpo", "eval"], echo=False)
    assert ctx.run.status("score")["computed"] == 0 and ctx.run.status("reference")["computed"] == 0
    plain = json.loads((root / "plain_dpo" / "eval" / "report.json").read_text())["policy"]
    mm = demo["report"]["policy"]
    sec = _stage_seconds(root / "plain_dpo")
    print(f"\nheld-out implicit accuracy: MM-DPO (w=0.1) {mm['implicit_accuracy']:.3f} | plain DPO (w=0) "
          f"{plain['implicit_accuracy']:.3f}; dpo stage {demo['seconds']['dpo']:.0f} s vs {sec['dpo']:.0f} s")
    assert plain["implicit_accuracy"] >= 0.75
    assert sec["score"] < 30 and sec["reference"] < 30
