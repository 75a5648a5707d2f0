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


# Online rounds (docs/rounds.md): the measured configuration and the floor set from it
ROUNDS_SETTINGS = ["dpo.alpha=0", "dpo.gamma=1", "dpo.sft_target=best", "dpo.train.max_steps=150", "rounds.n=2", "rounds.steps=150",
                   "rounds.temperature=0.5", "rounds.samples=4", "rounds.max_prompts=200", "rounds.prompts=unranked",
                   "reward.critique_mode=none", "eval.critique_modes=[]"]
# held-out right answers, round 2 minus round 0. NOT steady (docs/rounds.md's table, from a 600-step first policy: right
# answers fall over 3 rounds in all 5 runs). The rounds flow of
# this test (its splits, a reward model trained by recipes/demo.yaml, no kill), run on 2026-12-05 on the 2-core machine:
#   these settings, seed 0: 0.280 -> 0.253 -> 0.280 (+0.000); the last CI run: 0.280 -> 0.307 (+0.027)
#   rounds.max_prompts=100 rounds.steps=120, seeds 0/1/2 (run.seed and the labelled split): +0.080, +0.027, -0.080
#   same + rounds.samples=8 temperature=0.7 max_new_tokens=24, seeds 0/1/2: +0.053, -0.213, -0.080
# on 75 held-out prompts (1 prompt = 0.013): no threshold holds with margin until a configuration is found where
# rounds help across seeds
ROUNDS_GAIN = 0.04
ROUND_1_CPU_S = 600   # the killed child: start-up, round 0 eval, sampling, then 8 scored groups (tens of CPU s)


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used (/proc/<pid>/stat, fields 14 and 15)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_rounds_raise_the_held_out_right_answer_rate_and_a_killed_round_resumes(demo, tmp_path):
    """The reward model of the demo run (trained on every training group) ranks the answers of a policy trained on
    20% of them; the other 80% are prompts without responses. Two rounds raise its held-out right answers; a round
    killed while scoring resumes, with the scores written before the kill kept and every answer scored once."""
    import os
    import signal
    import subprocess
    import sys

    from mmrlhf_lite.rounds.experiment import split_files

    root = demo["root"]
    files = split_files(root / "mm_dpo" / "data" / "demo" / "demo.jsonl", tmp_path / "data", seed=0, labelled=0.2,
                        eval_fraction=0.15)
    run = tmp_path / "rounds"
    overrides = ROUNDS_SETTINGS + [f"run.dir={run}", f"data.path={files['rounds']}", f"data.eval_path={files['eval']}",
                                   f"reward.model_from={root / 'mm_dpo'}", f"cache.dir={tmp_path / 'cache'}"]
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", overrides)
    start = time.time()
    run_pipeline(recipe, ["score", "reference", "dpo"], echo=False)
    # round 1 in a child process, killed once it has scored a few groups
    recipe.save(tmp_path / "rounds.yaml")
    reward = run / "rounds" / "1" / "cache" / "reward.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "mmrlhf_lite.train", str(tmp_path / "rounds.yaml"), "--stages",
                             "rounds", "-q"], env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        # bounded by the child's CPU seconds (its work), not wall time, which a loaded machine stretches; the wall
        # limit only guards against a hang
        hang = time.time() + 3600
        while not (reward.exists() and reward.read_text().count("\n") >= 8):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert _process_cpu_seconds(proc.pid) < ROUND_1_CPU_S, f"round 1 scored nothing in {ROUND_1_CPU_S} CPU s"
            assert time.time() < hang, "round 1 scored nothing within an hour"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = {json.loads(x)["key"]: x for x in reward.read_text().splitlines()}
    ctx = run_pipeline(recipe, ["rounds"], echo=False)
    after = [json.loads(x) for x in reward.read_text().splitlines()]
    assert len({x["key"] for x in after}) == len(after)                      # nothing scored twice
    assert {k: v for k, v in ((json.loads(x)["key"], x) for x in reward.read_text().splitlines()) if k in before} \
        == before                                                           # nothing written before the kill redone
    h = json.loads((run / "rounds" / "summary.json").read_text())["history"]
    samples = [json.loads(x) for x in (run / "rounds" / "1" / "cache" / "samples.jsonl").read_text().splitlines()]
    distinct = sum(len({a.strip() for a in s["answers"] if a.strip()}) for s in samples)
    assert len(after) == distinct                                           # every distinct answer scored
    right = [x["held_out"]["right_answers"] for x in h]
    print(f"\nrounds: held-out right answers {right}, well-formed {[x['held_out']['well_formed'] for x in h]}, "
          f"reward rank {[x['held_out']['reward_rank'] for x in h]}; samples right "
          f"{[x['sampled']['right_answers'] for x in h[1:]]}; dropped {[x['dropped'] for x in h[1:]]}; "
          f"{time.time() - start:.0f} s")
    assert ctx.run.status("rounds")["rounds"] == 2
    assert right[2] >= right[0] + ROUNDS_GAIN
