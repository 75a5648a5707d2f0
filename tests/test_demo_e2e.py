"""The demo recipe end to end on CPU (slow; runs in CI): the critique reward model and MM-DPO learn from
the image, measured on held-out groups, and MM-DPO is reported side by side with plain DPO (w = 0).

The score stage uses the dataset's critiques here (`reward.critique_mode=given`) to keep CI time down;
`bash scripts/demo.sh` runs the recipe as shipped (generated critiques). The eval stage still reports
the reward bench in all three critique modes on all held-out groups, and the floors of the `generate`
and `none` modes are asserted there (docs/demo.md, "Reward model").

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
# held-out Acc floors of the shipped demo recipe (docs/demo.md)
FLOOR_GIVEN, FLOOR_GENERATE, FLOOR_NONE = 0.95, 0.85, 0.80
# CPU seconds of the demo run in the fixture: about 3x what it costs on one thread (a regression that makes the
# pipeline several times slower fails here, whatever the machine's load)
DEMO_CPU_S = 600


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children: load-independent, unlike wall."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
        f"run.dir={root / 'mm_dpo'}", f"cache.dir={root / 'cache'}", "reward.critique_mode=given"])
    start, cpu0 = time.time(), _cpu_seconds()
    run_pipeline(recipe, echo=False)
    wall, cpu = time.time() - start, _cpu_seconds() - cpu0
    report = json.loads((root / "mm_dpo" / "eval" / "report.json").read_text())
    return {"root": root, "report": report, "wall": wall, "cpu_s": cpu, "seconds": _stage_seconds(root / "mm_dpo")}


def test_reward_model_learns_from_critiques(demo):
    rm = demo["report"]["reward_model"]
    before, after = rm["before"]["given"]["overall"]["acc"], rm["modes"]["given"]["overall"]["acc"]
    print(f"\nreward model held-out Acc (given): before {before:.3f} after {after:.3f}; "
          f"none {rm['modes']['none']['overall']['acc']:.3f}; generate {rm['modes']['generate']['overall']['acc']:.3f}; "
          f"reward stage {demo['seconds']['reward']:.0f} s")
    assert 0.3 <= before <= 0.7          # an untrained head ranks at chance
    assert set(rm["modes"]) == {"given", "none", "generate"}
    assert after >= FLOOR_GIVEN
    assert rm["modes"]["given"]["overall"]["acc_plus"] >= 0.7
    assert rm["modes"]["generate"]["overall"]["acc"] >= FLOOR_GENERATE
    assert rm["modes"]["none"]["overall"]["acc"] >= FLOOR_NONE
    # the whole run's cost in CPU seconds (its own and its waited-for children's), not wall time: on the shared
    # 2-core machine a wall bound on the reward stage (600 s) failed under load with nothing wrong
    assert demo["cpu_s"] < DEMO_CPU_S, demo["cpu_s"]


def test_reward_margins_follow_the_human_ranking(demo):
    """Spearman(delta, human rank gap) on held-out pairs: the margins MM-DPO scales beta with carry signal."""
    rm = demo["report"]["reward_model"]
    corr = {m: r["delta_rank"]["spearman"] for m, r in rm["modes"].items()}
    print(f"\nheld-out Spearman(delta, rank gap): {corr}; beta_i {demo['report']['margins']['beta']}")
    assert corr["given"] > 0.5 and corr["generate"] > 0.3 and corr["none"] > 0.3
    assert (demo["root"] / "mm_dpo" / "score" / "beta_hist.png").exists()


def test_generated_critiques_name_the_right_answer_more_often(demo):
    rm = demo["report"]["reward_model"]
    before = rm["before"]["generate"]["critique_fact_rate"]["rate"]
    after = rm["modes"]["generate"]["critique_fact_rate"]["rate"]
    print(f"\ncritiques naming the right value: before {before:.3f} after {after:.3f}")
    assert after > before + 0.15


def test_mm_dpo_learns_from_the_image(demo):
    pol = demo["report"]["policy"]
    print(f"\nMM-DPO held-out implicit accuracy {pol['implicit_accuracy']:.3f}; right answers "
          f"{pol['right_answers']}; reward rank {pol['reward_rank']}; well-formed {pol['well_formed']}; "
          f"win rate {pol['win_rate']}; stages {demo['seconds']}")
    assert pol["implicit_accuracy"] >= 0.8
    ra, rr = pol["right_answers"], pol["reward_rank"]
    assert ra["after"] >= ra["before"] + 0.2   # its own answers are right more often
    assert rr["after"] < rr["before"]          # and the reward model ranks them higher among the K
    wr = pol["win_rate"]
    assert wr["win_rate"] is None and wr["withheld"] or wr["win_rate"] > 0.5


def test_plain_dpo_side_by_side(demo):
    """w = 0 on the same data, reward model and caches: nothing is recomputed before training."""
    root = demo["root"]
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [
        f"run.dir={root / 'plain_dpo'}", f"cache.dir={root / 'cache'}", f"reward.model_from={root / 'mm_dpo'}",
        "reward.critique_mode=given", "dpo.w=0", "eval.critique_modes=[]", "eval.policy_samples=0"])
    ctx = run_pipeline(recipe, ["score", "reference", "dpo", "eval"], echo=False)
    for stage in ("score", "reference"):   # every response's score and reference log-prob read from the cache
        st = ctx.run.status(stage)
        assert st["computed"] == 0 and st["reused"] == st["responses"] > 0, (stage, st)
    plain = json.loads((root / "plain_dpo" / "eval" / "report.json").read_text())["policy"]
    mm = demo["report"]["policy"]
    sec = _stage_seconds(root / "plain_dpo")
    print(f"\nheld-out implicit accuracy: MM-DPO (w=0.1) {mm['implicit_accuracy']:.3f} | plain DPO (w=0) "
          f"{plain['implicit_accuracy']:.3f}; dpo stage {demo['seconds']['dpo']:.0f} s vs {sec['dpo']:.0f} s")
    assert plain["implicit_accuracy"] >= 0.75


# Online rounds: no learning test here. The acceptance asked for one whose held-out right answers rise from round 0 to
# round 2 with margin; measured (docs/rounds.md, "Does it learn?", and "The demo's slow test"), no configuration tried
# raises them steadily across seeds, so a threshold would be a coin toss. What rounds must do mechanically (a killed
# round resumes to the same caches, every distinct answer scored once, the guard's numbers recounted from the caches,
# 2 ranks = 1 rank) is tested in tests/test_rounds.py.
