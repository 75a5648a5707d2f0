"""Online MM-DPO rounds on the xs tiny model (fast; the learning claim is in test_demo_e2e.py): what a round
writes, that it is built from the stages' caches, that degenerate and tied prompts are dropped and counted, that a
killed round resumes to the same caches, that raising rounds.n continues, and that a run without human-ranked data
starts from the base policy.

    python -m pytest -q tests/test_rounds.py
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmrlhf_lite.cache.reference import reference_keys
from mmrlhf_lite.cache.store import JsonlStore
from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn
from mmrlhf_lite.events import read_events
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.rounds.ranking import (answer_group, answer_records, check_answer_ranker, distinct_answers,
                                        rank_answers)
from mmrlhf_lite.train import run_pipeline

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.path=tiny:qwen2_vl:xs", "model.device=cpu", "data.demo.groups=16", "data.demo.image_size=56",
         "data.demo.safety_fraction=0", "data.eval_fraction=0.25", "reward.train.max_steps=3",
         "reward.train.groups_per_step=2", "reward.train.grad_accum=1", "reward.max_new_tokens=6",
         "reward.critique_mode=given", "dpo.train.max_steps=3", "dpo.train.groups_per_step=2",
         "dpo.train.grad_accum=1", "dpo.train.learning_rate=1e-2", "eval.max_new_tokens=6",
         "eval.critique_modes=[]", "rounds.samples=3", "rounds.max_new_tokens=6", "rounds.steps=2",
         "rounds.temperature=1.5", "run.seed=0"]
OFFLINE = ["reward", "score", "reference", "dpo"]


def _recipe(run_dir: Path, *extra: str):
    return load_recipe(None, SMALL + [f"run.dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> Path:
    """The offline stages, done once; each test copies the folder."""
    run = tmp_path_factory.mktemp("offline") / "run"
    run_pipeline(_recipe(run), OFFLINE, echo=False)
    return run


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "run.lock").unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="module")
def two_rounds(offline, tmp_path_factory) -> Path:
    run = _copy(offline, tmp_path_factory.mktemp("rounds") / "run")
    run_pipeline(_recipe(run, "rounds.n=2"), ["rounds"], echo=False)
    return run


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_two_rounds_write_each_step_from_the_stages_caches(offline, two_rounds):
    run = two_rounds
    summary = json.loads((run / "rounds" / "summary.json").read_text())
    assert [h["round"] for h in summary["history"]] == [0, 1, 2]
    assert summary["history"][0]["start_policy"] == str(run / "dpo" / "final")
    recipe = _recipe(run)
    train, evals = _data(recipe)
    assert len(train) >= 10 and evals
    for r in (1, 2):
        folder = run / "rounds" / str(r)
        h = json.loads((folder / "round.json").read_text())
        assert h == summary["history"][r]
        samples = _lines(folder / "cache" / "samples.jsonl")
        assert len(samples) == h["prompts"] == len(train) and all(len(s["answers"]) == 3 for s in samples)
        assert h["samples"] == 3 * len(train)
        margins = _lines(folder / "score" / "margins.jsonl")
        assert len(margins) == h["groups"] and h["groups"] + sum(h["dropped"].values()) == h["prompts"]
        assert sum(len(m["pairs"]) for m in margins) == h["pairs"] > 0
        reward = {(x["group_id"], x["response"]): x for x in _lines(folder / "cache" / "reward.jsonl")}
        answers = {x["group_id"]: _distinct(x["answers"]) for x in samples}
        for m in margins:
            # generated critiques are kept (the recipe scores with `given`; sampled answers have none: generate)
            assert m["critiques"] == [reward[(m["group_id"], i)]["critiques"] for i in range(len(m["scores"]))]
            assert all(len(c) == 1 and isinstance(c[0], str) for c in m["critiques"])
            assert m["scores"] == [reward[(m["group_id"], i)]["score"] for i in range(len(m["scores"]))]
            assert len(m["scores"]) == len(answers[m["group_id"]])
            for p in m["pairs"]:
                assert p["delta"] == m["scores"][p["better"]] - m["scores"][p["worse"]] > 0
        # the reference of round r is pi_{r-1} (dpo.reference: previous): the keys hold its adapter
        start = run / "dpo" / "final" if r == 1 else run / "rounds" / "1" / "dpo" / "final"
        keys = {x["key"] for x in _lines(folder / "cache" / "reference.jsonl")}
        by_id = {g.id: g for g in train}
        margin_groups = [PreferenceGroup(id=m["group_id"], prompt=by_id[m["group_id"]].prompt,
                                         images=by_id[m["group_id"]].images,
                                         responses=[Response(t) for t in answers[m["group_id"]]]) for m in margins]
        want = {k for ks in reference_keys(margin_groups, recipe.model, recipe.data.max_frames, start) for k in ks}
        assert want and want <= keys
        assert not want & {k for ks in reference_keys(margin_groups, recipe.model, recipe.data.max_frames) for k in ks}
        # pi_r moved away from pi_{r-1}
        before = load_file(start / "adapter_model.safetensors")
        after = load_file(folder / "dpo" / "final" / "adapter_model.safetensors")
        assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-4
        # the ranker check recounted from the margins file: right-vs-wrong pairs of distinct answers, ordered by score
        from mmrlhf_lite.data.demo import answer_correct
        won = n = 0
        for m in margins:
            ok = [answer_correct(by_id[m["group_id"]], t) for t in answers[m["group_id"]]]
            for i, a in enumerate(m["scores"]):
                for j, b in enumerate(m["scores"]):
                    if ok[i] is True and ok[j] is False:
                        won, n = won + (a > b) + 0.5 * (a == b), n + 1
        assert h["dropped"]["tied"] == 0 and h["sampled"]["ranker_pairs"] == n
        assert h["sampled"]["ranker_right"] == (pytest.approx(won / n) if n else None)
        report = json.loads((folder / "eval" / "report.json").read_text())
        assert report["implicit_accuracy"] == h["held_out"]["implicit_accuracy"]
        assert "before" not in report["reward_score"]   # a round answers with its own policy only
    md = (run / "rounds" / "report.md").read_text()
    held, sampled = md.split("The answers each round sampled", 1)
    assert held.count("\n| ") == 4 and "| round | right answers |" in held   # header + rounds 0, 1, 2
    assert sampled.count("\n| ") == 3 and "| KL to pi_0 |" in sampled     # header + rounds 1, 2
    assert "| reward model: right > wrong (pairs) | its top answer right (prompts) |" in sampled
    assert json.loads((run / "stages" / "rounds.json").read_text())["rounds"] == 2


def _data(recipe):
    from mmrlhf_lite.data import prepare_data
    from mmrlhf_lite.events import EventLog

    return prepare_data(recipe, recipe.run.dir, EventLog(None, echo=False), dry_run=True)


def _distinct(answers: list[str]) -> list[str]:
    """A prompt's distinct non-empty answers in sampling order (what the round scores), recounted here."""
    out: list[str] = []
    for a in answers:
        if a.strip() and a.strip() not in out:
            out.append(a.strip())
    return out


def test_every_event_of_a_round_names_it_and_each_round_ends_with_one_metrics_event(two_rounds):
    events, _ = read_events(two_rounds)
    rounds = [e for e in events if e.get("stage") == "rounds"]
    per_round = [e for e in rounds if e["type"] == "metrics" and "rounds_implicit_accuracy" in e]
    assert [(e["step"], e["round"]) for e in per_round] == [(0, 0), (1, 1), (2, 2)]
    parts = {(e.get("round"), e.get("part")) for e in rounds if e["type"] == "progress"}
    for r in (1, 2):
        assert {(r, "sample"), (r, "score"), (r, "reference"), (r, "dpo")} <= parts
    assert any(e.get("round") == 0 for e in rounds if e["type"] == "progress")


def test_degenerate_and_tied_prompts_are_dropped_and_counted():
    g = PreferenceGroup(id="p", prompt=[text_to_turn("q", 0)], responses=[])
    prompts = [g] * 4
    answers = [["Red.", " Red. ", "Red."],     # one distinct answer: degenerate
               ["", "  ", ""],                 # nothing but empty answers: degenerate
               ["Red.", "Blue.", ""],          # two distinct, tied scores: dropped as tied
               ["Red.", "Blue.", "Blue."]]     # kept
    distinct = distinct_answers(prompts, answers)
    assert [(d.texts, d.counts, d.empty) for d in distinct] == [
        (["Red."], [3], 0), ([], [], 3), (["Red.", "Blue."], [1, 1], 1), (["Red.", "Blue."], [1, 2], 0)]
    records = [[{"score": 0.5, "critiques": ["c"]}], None, [{"score": 0.2, "critiques": ["a"]},
                                                              {"score": 0.25, "critiques": ["b"]}],
               [{"score": 1.0, "critiques": ["good"]}, {"score": -1.0, "critiques": ["bad"]}]]
    ranked = rank_answers(distinct, records, min_gap=0.1)
    assert ranked.dropped == {"degenerate": 2, "tied": 1, "unknown": 0}
    [kept] = ranked.groups
    assert [r.text for r in kept.responses] == ["Red.", "Blue."] and kept.pairs() == [(0, 1)]
    assert [r.critique for r in kept.responses] == ["good", "bad"] and kept.best_index() == 0
    # with no gap the near-tie is a pair
    assert rank_answers(distinct, records, min_gap=0.0).dropped == {"degenerate": 2, "tied": 0, "unknown": 0}
    assert answer_group(distinct[3]).responses == [Response("Red."), Response("Blue.")]


def test_the_round_summary_counts_what_the_caches_hold(two_rounds):
    """The dropped counts of a round equal a recount from its samples and reward caches."""
    folder = two_rounds / "rounds" / "1"
    h = json.loads((folder / "round.json").read_text())
    samples = _lines(folder / "cache" / "samples.jsonl")
    distinct = [{a.strip() for a in s["answers"] if a.strip()} for s in samples]
    degenerate = sum(len(d) < 2 for d in distinct)
    scores: dict[str, list[float]] = {}
    for x in _lines(folder / "cache" / "reward.jsonl"):
        scores.setdefault(x["group_id"], []).append(x["score"])
    tied = sum(1 for v in scores.values() if len(v) >= 2 and max(v) == min(v))
    assert h["dropped"] == {"degenerate": degenerate, "tied": tied, "unknown": 0}   # the reward ranker: none


def _train_cli(recipe: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmrlhf_lite.train", str(recipe), "-q", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _by_key(path: Path, field: str) -> dict:
    return {x["key"]: x[field] for x in _lines(path)}


def test_a_round_killed_while_scoring_resumes_to_the_same_caches(offline, two_rounds, tmp_path):
    run = _copy(offline, tmp_path / "run")
    recipe = _recipe(run, "rounds.n=1")
    recipe.save(tmp_path / "recipe.yaml")
    reward = run / "rounds" / "1" / "cache" / "reward.jsonl"
    proc = _train_cli(tmp_path / "recipe.yaml", "--stages", "rounds")
    try:
        deadline = time.time() + 600
        while not (reward.exists() and reward.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "no reward entry within 600 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)   # mid-scoring: the samples are all cached, some scores are
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = _by_key(reward, "score")
    assert 2 <= len(partial) < len(_by_key(two_rounds / "rounds" / "1" / "cache" / "reward.jsonl", "score"))
    assert not (run / "rounds" / "1" / "round.json").exists()
    run_pipeline(recipe, ["rounds"], echo=False)   # the resume, in-process: the pipeline the command runs
    # the scores written before the kill are kept, and the caches equal those of the round that was not killed
    done = two_rounds / "rounds" / "1" / "cache"
    for name, field in (("samples.jsonl", "answers"), ("reward.jsonl", "score"), ("reference.jsonl", "logp")):
        got, want = _by_key(run / "rounds" / "1" / "cache" / name, field), _by_key(done / name, field)
        assert got.keys() == want.keys(), name
        for k in want:
            assert got[k] == (want[k] if field == "answers" else pytest.approx(want[k], rel=1e-4, abs=1e-4)), name
    assert {k: partial[k] for k in partial} == {k: _by_key(reward, "score")[k] for k in partial}
    a = json.loads((run / "rounds" / "1" / "round.json").read_text())
    b = json.loads((two_rounds / "rounds" / "1" / "round.json").read_text())
    assert (a["groups"], a["pairs"], a["dropped"]) == (b["groups"], b["pairs"], b["dropped"])


def test_raising_rounds_n_continues_after_the_last_finished_round(two_rounds, tmp_path):
    run = _copy(two_rounds, tmp_path / "run")
    stamps = {r: (run / "rounds" / str(r) / "round.json").stat().st_mtime_ns for r in (0, 1, 2)}
    ctx = run_pipeline(_recipe(run, "rounds.n=2"), ["rounds"], echo=False)   # nothing to do: skipped
    assert ctx.run.status("rounds")["rounds"] == 2
    events, _ = read_events(run)
    assert "stage rounds already done with these settings; skipped (--redo rounds recomputes)" in [
        e.get("message") for e in events]
    ctx = run_pipeline(_recipe(run, "rounds.n=3"), ["rounds"], echo=False)
    assert ctx.run.status("rounds")["rounds"] == 3
    assert {r: (run / "rounds" / str(r) / "round.json").stat().st_mtime_ns for r in (0, 1, 2)} == stamps
    r3 = json.loads((run / "rounds" / "3" / "round.json").read_text())
    assert r3["start_policy"] == str(run / "rounds" / "2" / "dpo" / "final")
    # a key of the rounds changes: a finished rounds stage is not silently reused
    from mmrlhf_lite.runs import RunFolderError
    with pytest.raises(RunFolderError, match="rounds.samples"):
        run_pipeline(_recipe(run, "rounds.n=3", "rounds.samples=4"), ["rounds"], echo=False)


def test_prompts_only_data_starts_from_the_base_policy(offline, tmp_path):
    """No human-ranked training group: reward model from another run, the offline dpo stage says it has nothing
    to train, the rounds start from the base model and train on the prompts."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(x) for x in (offline / "data" / "demo" / "demo.jsonl").read_text().splitlines()]
    for r in rows:
        r["images"] = [str(offline / "data" / "demo" / p) for p in r["images"]]
    (data / "prompts.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "responses"}) + "\n"
                                                for r in rows[:10]))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:13]))
    run = tmp_path / "run"
    recipe = _recipe(run, f"data.path={data / 'prompts.jsonl'}", f"data.eval_path={data / 'eval.jsonl'}",
                     f"reward.model_from={offline}", "rounds.n=1", "reward.critique_mode=none")
    ctx = run_pipeline(recipe, ["reward", "score", "reference", "dpo", "eval", "rounds"], echo=False)
    assert ctx.run.status("dpo")["skipped"].startswith("no human-ranked training group")
    assert not (run / "dpo" / "final").exists()
    h = json.loads((run / "rounds" / "summary.json").read_text())["history"]
    assert [x["start_policy"] for x in h] == ["base", "base"]
    assert h[1]["prompts"] == 10 and (run / "rounds" / "1" / "dpo" / "final" / "adapter_config.json").exists()
    # scored without critiques (reward.critique_mode none): empty critique lists, kept as such
    assert all(m["critiques"] == [[] for _ in m["scores"]] for m in _lines(run / "rounds" / "1" / "score" /
                                                                          "margins.jsonl"))
    # without rounds, the same prompts are the data error they always were
    from mmrlhf_lite.data.errors import DataError
    with pytest.raises(DataError, match="rounds.n > 0"):
        run_pipeline(_recipe(tmp_path / "run2", f"data.path={data / 'prompts.jsonl'}"), ["reference"], echo=False)


def test_the_answer_ranker_orders_right_above_wrong_whatever_the_reward_model_says():
    """rounds.ranker answer: every right answer above every wrong one (delta 1), right-right and wrong-wrong pairs
    tied; a prompt whose right answer the data does not know is dropped as unknown; the reward model's score and
    critiques are kept beside."""
    from mmrlhf_lite.data.demo import answer_correct

    def prompt(pid, meta):
        return PreferenceGroup(id=pid, prompt=[text_to_turn("Which colour?", 0)], responses=[], category="majority",
                               meta=meta)
    meta = {"answer": "red", "choices": ["red", "green", "blue"]}
    prompts = [prompt("a", meta), prompt("b", meta), prompt("c", meta), prompt("d", {"answer": "red"}),
               prompt("e", meta)]
    answers = [["Green.", "Red.", "Blue.", "It is red."],   # 2 right, 2 wrong: 4 pairs
               ["Red.", "It is red."],                     # all right: tied
               ["Green.", "Blue."],                        # all wrong: tied
               ["Red.", "Green."],                         # the data cannot tell: unknown
               ["Red.", "Red."]]                           # one distinct answer: degenerate
    distinct = distinct_answers(prompts, answers)
    # the reward model prefers the wrong answers, by a lot
    reward = [[{"score": s, "critiques": [f"c{s}"]} for s in scores]
              for scores in ([5.0, -5.0, 4.0, -4.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [0.0])]
    by_reward = rank_answers(distinct, reward, min_gap=0.0)
    assert sorted(by_reward.groups[0].pairs()) == [(0, 1), (0, 2), (0, 3), (2, 1), (2, 3), (3, 1)]
    ranking = answer_records(distinct, reward, answer_correct)
    assert ranking[3] is None and ranking[1] == [{"score": 1.0, "reward": 1.0, "critiques": ["c1.0"]},
                                                {"score": 1.0, "reward": 2.0, "critiques": ["c2.0"]}]
    ranked = rank_answers(distinct, ranking, min_gap=0.0)
    assert ranked.dropped == {"degenerate": 1, "tied": 2, "unknown": 1}
    [kept] = ranked.groups
    assert [r.text for r in kept.responses] == ["Green.", "Red.", "Blue.", "It is red."]
    assert sorted(kept.pairs()) == [(1, 0), (1, 2), (3, 0), (3, 2)]
    assert [r.score for r in kept.responses] == [0.0, 1.0, 0.0, 1.0]
    assert [r.critique for r in kept.responses] == ["c5.0", "c-5.0", "c4.0", "c-4.0"]
    assert sorted(kept.explicit_ties) == [(0, 2), (1, 3)]
    assert [rec["reward"] for rec in ranked.records[0]] == [5.0, -5.0, 4.0, -4.0]
    # a gap of 1 or more ties everything: the answer ranker's scores are 1 and 0
    assert rank_answers(distinct, ranking, min_gap=1.0).dropped["tied"] == 3
    # no prompt whose right answer the data knows: refused before anything is sampled, naming what is missing
    check_answer_ranker(prompts, answer_correct, 1)
    with pytest.raises(ValueError, match=r"round 2: rounds.ranker is `answer`, but none of the round's 1 prompts "
                                         r"names its right answer .*rounds.ranker=reward"):
        check_answer_ranker([prompts[3]], answer_correct, 2)


def test_a_round_ranked_by_the_data_s_answer_trains_right_over_wrong(offline, two_rounds, tmp_path):
    """rounds.ranker answer, end to end: the round's margins hold scores 1 / 0 and every pair puts the answer the
    data calls right above a wrong one (delta 1); the reward model still scored every answer (its cache and the
    ranker check). The round's samples are written into its cache first (the tiny random policy is rarely right):
    every value the demo's questions ask for, so each prompt has exactly one right answer."""
    from mmrlhf_lite.data.demo import KINDS, _values, answer_correct
    from mmrlhf_lite.data.readers import load_groups

    run = _copy(offline, tmp_path / "run")
    cache = run / "rounds" / "1" / "cache"
    cache.mkdir(parents=True)
    answers = [f"It is {v}." for kind in KINDS for v in _values(kind)]
    lines = [{**x, "answers": answers} for x in _lines(two_rounds / "rounds" / "1" / "cache" / "samples.jsonl")]
    (cache / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_pipeline(_recipe(run, "rounds.n=1", "rounds.ranker=answer"), ["rounds"], echo=False)
    folder = run / "rounds" / "1"
    summary = json.loads((folder / "round.json").read_text())
    assert summary["prompts"] == len(lines) and summary["samples"] == len(lines) * len(answers)   # none sampled
    assert summary["dropped"] == {"degenerate": 0, "tied": 0, "unknown": 0} and summary["groups"] == len(lines)
    groups = _lines(folder / "score" / "margins.jsonl")
    rows = {g.id: g for g in load_groups(folder / "groups.jsonl").groups}
    assert len(groups) == len(rows) == len(lines)
    for rec in groups:
        verdicts = [answer_correct(rows[rec["group_id"]], r.text) for r in rows[rec["group_id"]].responses]
        assert verdicts.count(True) == 1 and verdicts.count(False) == len(answers) - 1
        assert rec["scores"] == [1.0 if v else 0.0 for v in verdicts]
        right = verdicts.index(True)
        assert sorted((p["better"], p["worse"], p["delta"]) for p in rec["pairs"]) == [
            (right, w, 1.0) for w in range(len(answers)) if w != right]
    assert len(JsonlStore(folder / "cache" / "reward.jsonl")) == len(lines) * len(answers)   # all scored
    assert summary["sampled"]["ranker_pairs"] == sum(len(g["pairs"]) for g in groups)
    row = next(x for x in (run / "rounds" / "report.md").read_text().splitlines() if x.startswith("| 1 |"))
    assert row.endswith("| 0 / 0 / 0 |"), row
    [metrics] = [e for e in read_events(run)[0] if e.get("type") == "metrics" and e.get("stage") == "rounds"
                 and e.get("step") == 1 and "rounds_groups" in e]
    assert metrics["rounds_dropped_unknown"] == 0 and metrics["rounds_groups"] == len(lines)


def test_a_prompt_s_meta_can_name_the_right_answer_for_any_data():
    g = PreferenceGroup(id="q", prompt=[text_to_turn("Which colour?", 0)], responses=[], category="majority",
                        meta={"answer": "Red", "choices": ["red", "green", "blue"]})
    from mmrlhf_lite.data.demo import answer_correct
    assert answer_correct(g, "Most of the dots are red. The dots are big.") is True
    assert answer_correct(g, "Most of the dots are green.") is False
    assert answer_correct(g, "Red or blue.") is False          # two of the choices is no answer
    assert answer_correct(g, "The dots are big.") is False     # none of them either
    g.meta = {"answer": "red"}                                  # without its choices it cannot tell
    assert answer_correct(g, "red") is None


def test_the_guard_numbers_of_a_round_recount_from_its_caches(two_rounds):
    """Round 2 samples from pi_1: its mean reward is the count-weighted mean of the reward cache's scores, and its KL
    to pi_0 the count-weighted mean of log pi_1 - log pi_0 read from the reference cache (keys of each adapter)."""
    run = two_rounds
    recipe = _recipe(run)
    train, _ = _data(recipe)
    by_id = {g.id: g for g in train}
    folder = run / "rounds" / "2"
    h = json.loads((folder / "round.json").read_text())
    samples = {x["group_id"]: x["answers"] for x in _lines(folder / "cache" / "samples.jsonl")}
    reward = {(x["group_id"], x["response"]): x["score"] for x in _lines(folder / "cache" / "reward.jsonl")}
    logp = {x["key"]: x["logp"] for x in _lines(folder / "cache" / "reference.jsonl")}
    pi0, pi1 = run / "dpo" / "final", run / "rounds" / "1" / "dpo" / "final"
    scores, ratios, n_empty = [], [], 0
    for gid, answers in samples.items():
        texts = _distinct(answers)
        n_empty += sum(not a.strip() for a in answers)
        if not texts:
            continue
        counts = [sum(a.strip() == t for a in answers) for t in texts]
        g = PreferenceGroup(id=gid, prompt=by_id[gid].prompt, images=by_id[gid].images,
                            responses=[Response(t) for t in texts])
        [k1] = reference_keys([g], recipe.model, recipe.data.max_frames, pi1)
        [k0] = reference_keys([g], recipe.model, recipe.data.max_frames, pi0)
        for i, c in enumerate(counts):
            scores += [reward[(gid, i)]] * c
            ratios += [logp[k1[i]] - logp[k0[i]]] * c
    sm = h["sampled"]
    assert sm["samples"] == sum(len(a) for a in samples.values())
    assert sm["empty"] == pytest.approx(n_empty / sm["samples"])
    assert sm["reward_score"] == pytest.approx(sum(scores) / len(scores), rel=1e-9)
    assert sm["kl_to_initial"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-9)
    assert sm["kl_to_initial"] != 0.0
    r1 = json.loads((run / "rounds" / "1" / "round.json").read_text())["sampled"]
    assert r1["kl_to_initial"] == 0.0          # round 1 samples from pi_0 itself


def test_the_stop_rule_ends_the_rounds_before_the_next_one(two_rounds, tmp_path):
    """Finished rounds whose held-out reward rose while right answers fell, twice: with patience 2 round 3 does
    not run, the stage says why, and the summary records it."""
    run = _copy(two_rounds, tmp_path / "run")
    for r, (reward, right) in enumerate([(0.1, 0.6), (0.2, 0.5), (0.3, 0.4)]):
        path = run / "rounds" / str(r) / "round.json"
        h = json.loads(path.read_text())
        h["held_out"].update(reward_score=reward, right_answers=right)
        path.write_text(json.dumps(h))
    ctx = run_pipeline(_recipe(run, "rounds.n=3", "rounds.patience=2"), ["rounds"], echo=False)
    assert not (run / "rounds" / "3").exists()
    st = ctx.run.status("rounds")
    assert st["rounds"] == 2 and st["stopped_early"].startswith("stopped after round 2: for 2 round(s) in a row")
    events, _ = read_events(run)
    warned = [e["message"] for e in events if e["type"] == "warning" and e.get("stage") == "rounds"]
    assert any("right_answers 0.5 -> 0.4" in w and w.endswith("rounds 3..3 not run") for w in warned)
    summary = json.loads((run / "rounds" / "summary.json").read_text())
    assert summary["stopped_early"] == st["stopped_early"] and len(summary["history"]) == 3


def test_given_the_same_samples_two_ranks_write_the_same_score_and_reference_caches(offline, two_rounds, tmp_path):
    """torchrun --nproc_per_node 2 on round 1 with the one-process round's samples in its cache: the ranks split the
    scoring and the reference pass, and their caches hold the one process's entries (critiques included)."""
    from test_distributed import _finish, _launch

    run = _copy(offline, tmp_path / "run")
    (run / "rounds" / "1" / "cache").mkdir(parents=True)
    shutil.copy(two_rounds / "rounds" / "1" / "cache" / "samples.jsonl", run / "rounds" / "1" / "cache")
    _recipe(run, "rounds.n=1").save(tmp_path / "rounds.yaml")
    rc, out = _finish(_launch(tmp_path / "rounds.yaml", "rounds"))
    assert rc == 0, out[-4000:]
    events, _ = read_events(run)
    assert any(e["type"] == "run_start" and e.get("world_size") == 2 for e in events)
    for part in ("score", "reference"):  # each rank computed a share
        [m] = [e for e in events if e["type"] == "metrics" and e.get("part") == part and "groups_per_s" in e][-1:]
        assert m["rank0_groups_per_s"] > 0 and m["rank1_groups_per_s"] > 0, part
    one, two = two_rounds / "rounds" / "1" / "cache", run / "rounds" / "1" / "cache"
    assert _by_key(two / "samples.jsonl", "answers") == _by_key(one / "samples.jsonl", "answers")  # none sampled
    for name, field in (("reward.jsonl", "score"), ("reward.jsonl", "critiques"), ("reference.jsonl", "logp")):
        a, b = _by_key(one / name, field), _by_key(two / name, field)
        assert a.keys() == b.keys() and a, name
        for k in a:
            assert b[k] == (a[k] if field == "critiques" else pytest.approx(a[k], rel=1e-4, abs=1e-4)), (name, k)
    # both ranks scored: progress counted every rank's groups, and the round's groups and margins are the same
    a = json.loads((two_rounds / "rounds" / "1" / "round.json").read_text())
    b = json.loads((run / "rounds" / "1" / "round.json").read_text())
    assert (a["groups"], a["pairs"], a["dropped"]) == (b["groups"], b["pairs"], b["dropped"])
    ma, mb = (_lines(r / "rounds" / "1" / "score" / "margins.jsonl") for r in (two_rounds, run))
    assert [m["group_id"] for m in ma] == [m["group_id"] for m in mb]
    for x, y in zip(ma, mb):
        assert y["scores"] == pytest.approx(x["scores"], rel=1e-4, abs=1e-4) and y["critiques"] == x["critiques"]


def test_the_dry_run_says_what_the_rounds_will_do(tmp_path, capsys):
    from mmrlhf_lite.train import dry_run, main

    recipe = _recipe(tmp_path / "run", "rounds.n=2", "rounds.max_prompts=5")
    plan = dry_run(recipe, list(recipe.run.stages))
    train, evals = _data(recipe)
    assert plan["rounds"] == {"n": 2, "samples": 3, "prompts": len(train), "which": "all", "max_prompts": 5,
                              "steps": 2, "reference": "previous", "held_out": len(evals), "held_out_prompts": 0,
                              "ranker": "reward"}
    out = capsys.readouterr().out
    assert "stages: reward, score, reference, dpo, eval, rounds\n" in out
    assert (f"rounds: 2 online round(s), 3 answers for each of {len(train)} prompts (rounds.prompts all, 5 a round), "
            f"2 MM-DPO steps each, reference: the previous policy; held out: {len(evals)} groups, 0 prompts\n"
            "  ranked by the reward model\n") in out
    # the answer ranker: how many prompts the data can judge (every demo prompt here: no safety prompts)
    plan = dry_run(_recipe(tmp_path / "run", "rounds.n=2", "rounds.ranker=answer"), list(recipe.run.stages))
    assert plan["rounds"]["ranker"] == "answer" and plan["rounds"]["answer_known"] == len(train) > 0
    assert not plan["errors"] and (f"  ranked by the data's own answer ({len(train)} of the prompts name it; the others "
                                   "are dropped as unknown)") in capsys.readouterr().out
    # without rounds: no rounds line, and the stage is not listed
    plan = dry_run(_recipe(tmp_path / "run"), list(recipe.run.stages))
    assert plan["rounds"] is None and "rounds:" not in capsys.readouterr().out
    # --rounds N on the command line sets rounds.n
    recipe.save(tmp_path / "r.yaml")
    assert main([str(tmp_path / "r.yaml"), "--dry-run", "--rounds", "4"]) == 0
    assert "rounds: 4 online round(s)" in capsys.readouterr().out
    assert main([str(tmp_path / "r.yaml"), "--dry-run", "--rounds", "-1"]) == 2


def test_a_round_s_groups_are_a_data_file_with_the_answers_scores_and_critiques(two_rounds):
    """rounds/<r>/groups.jsonl loads with the data readers: the margins' groups, answers ranked by their scores,
    each answer's critique, the pairs MM-DPO trained on."""
    from mmrlhf_lite.data.readers import load_groups

    folder = two_rounds / "rounds" / "1"
    res = load_groups(folder / "groups.jsonl")
    margins = _lines(folder / "score" / "margins.jsonl")
    assert res.formats == {str(folder / "groups.jsonl"): "ranked"} and len(res.groups) == len(margins)
    for g, m in zip(res.groups, margins):
        assert g.id == m["group_id"] and [r.score for r in g.responses] == m["scores"]
        assert [r.critique for r in g.responses] == [" | ".join(c) or None for c in m["critiques"]]
        assert [{"better": b, "worse": w} for b, w in g.pairs()] == [{k: p[k] for k in ("better", "worse")}
                                                                      for p in m["pairs"]]
        assert all(Path(p).is_file() for p in g.images)


def test_the_rounds_report_counts_each_kind_of_dropped_prompt():
    """rounds/report.md's dropped column: degenerate / tied / unknown answer; a round written before the answer
    ranker (no `unknown` key) reads 0 there, and round 0 (nothing sampled) '-'."""
    from mmrlhf_lite.rounds import format_rounds

    held = {"right_answers": 0.5, "well_formed": 0.9, "reward_rank": 1.5, "reward_score": -3.0, "implicit_accuracy": 0.8}
    history = [{"round": 0, "held_out": held},
               {"round": 1, "held_out": held, "groups": 9, "pairs": 20,
                "dropped": {"degenerate": 4, "tied": 2, "unknown": 3}},
               {"round": 2, "held_out": held, "groups": 8, "pairs": 18, "dropped": {"degenerate": 5, "tied": 1}}]
    rows = [x for x in format_rounds(history).splitlines() if x.startswith("| ")]
    assert rows[0].endswith("| dropped (degenerate / tied / unknown answer) |")
    assert [r.rsplit("|", 2)[1].strip() for r in rows[1:4]] == ["-", "4 / 2 / 3", "5 / 1 / 0"]


def test_the_plan_refuses_the_answer_ranker_when_no_prompt_names_its_answer(tmp_path):
    """The dry run (and the UI's pre-flight, which reads the same plan) says before anything runs that
    rounds.ranker answer has nothing to judge with; prompts that name their answer are counted."""
    from mmrlhf_lite.plan import rounds_plan

    def prompt(pid, meta):
        return PreferenceGroup(id=pid, prompt=[text_to_turn("Which colour?", 0)], responses=[], meta=meta)
    blind = [prompt("a", None), prompt("b", {"answer": "red"})]     # without its choices the check cannot tell
    recipe = _recipe(tmp_path / "run", "rounds.n=1", "rounds.ranker=answer")
    plan = rounds_plan(recipe, ["rounds"], [], [], (blind, []))
    assert plan["answer_known"] == 0 and plan["error"].startswith(
        "rounds.ranker is `answer`, but none of the 2 prompts the rounds sample names its right answer")
    known = blind + [prompt("c", {"answer": "red", "choices": ["red", "blue"]})]
    plan = rounds_plan(recipe, ["rounds"], [], [], (known, []))
    assert plan["answer_known"] == 1 and "error" not in plan
    assert "error" not in rounds_plan(_recipe(tmp_path / "run", "rounds.n=1"), ["rounds"], [], [], (blind, []))
