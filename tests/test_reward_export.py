"""An exported reward model scores exactly as the run does (DESIGN.md, "One score function").

On the tiny Qwen2-VL with a reward adapter (random non-zero LoRA B and head) at `response_logp_weight`
w = 0 and w = 2: `python -m mmrlhf_lite.evaluate reward` scores demo rows in modes none, given and
generate (greedy, generation batch size 1); the run is exported; a copy of the exported folder, in a fresh
interpreter (`-I`) in which `mmrlhf_lite` cannot be imported, scores the same rows through its
`load_reward_model.py` (the project's `reward_score.py`, copied verbatim, run through a plain unpacked
forward): every score equals the project's packed scores within a relative 1e-4, every generated critique
is the same text, token for token. The command line prints the same scores. (One fresh interpreter scores with every
exported folder in turn and runs the command line.) At w > 0 the old export
(head alone) is off: the test also checks that the head alone misses the score by far more than the
tolerance.

    python -m pytest -q tests/test_reward_export.py
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmrlhf_lite.data.demo import generate as demo_groups

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "given", "generate")
REL = 1e-4

# A fresh interpreter that cannot import the project; it scores every job's rows with that job's exported folder, and
# runs a folder's command line (`python load_reward_model.py ...`, as __main__, its stdout captured). One process
# for all the folders: each loader is imported under a name of its own, with its own folder's reward_score.py.
FRESH = r"""
import contextlib, importlib.util, io, json, runpy, sys
sys.modules["mmrlhf_lite"] = None          # any import of the project fails from here on
results = []
for i, job in enumerate(json.load(open(sys.argv[1]))):
    folder = job["folder"]
    sys.modules.pop("reward_score", None)   # the loader imports its own folder's copy
    spec = importlib.util.spec_from_file_location(f"load_reward_model_{i}", folder + "/load_reward_model.py")
    L = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(L)
    out = []
    for row in job["rows"]:
        for mode in row["modes"]:
            got = L.score_answers(row["images"], row["question"], row["answers"], mode,
                                  row["critiques"] if mode == "given" else None)   # greedy critiques at the run's batch 1
            out.append({"id": row["id"], "mode": mode, "scores": [s.score for s in got], "head": [s.head for s in got],
                        "response_logp": [s.response_logp for s in got], "critiques": [s.critique for s in got]})
    cli = None
    if job.get("cli"):
        sys.modules.pop("reward_score", None)
        sys.argv = [folder + "/load_reward_model.py", *job["cli"]]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = exc.code
        cli = {"code": code, "stdout": printed.getvalue()}
    results.append({"scores": out, "cli": cli})
assert not any(m == "mmrlhf_lite" or m.startswith("mmrlhf_lite.") for m in sys.modules if sys.modules[m] is not None)
print("RESULT " + json.dumps(results))
"""


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _export(weight: float, tmp_path_factory, reward_run_factory):
    """(run, its evaluate-reward records by (id, mode), the rows, a copy of the exported folder, w)."""
    from mmrlhf_lite.evaluate.__main__ import SCORES_FILE, main as evaluate
    from mmrlhf_lite.export import export_model

    root = tmp_path_factory.mktemp(f"export-w{weight:g}")
    groups = demo_groups(root / "data", groups=3, seed=2, image_size=56, safety_fraction=0.0)
    data = root / "data" / "rows.jsonl"
    data.write_text("".join(json.dumps(g.to_record()) + "\n" for g in groups))
    run = reward_run_factory(root, weight)
    assert evaluate(["reward", str(run), "--data", str(data), "--critique", ",".join(MODES),
                     "--out", str(root / "eval")]) == 0
    records = {(r["id"], r["mode"]): r for r in map(json.loads, (root / "eval" / SCORES_FILE).read_text().splitlines())}
    assert len(records) == len(groups) * len(MODES)
    out = export_model(run, "reward", root / "exported", dtype="float32", progress=lambda m: None)
    copy = root / "elsewhere" / "rm"
    shutil.copytree(out, copy)
    rows = [{"id": g.id, "images": [str(p) for p in g.images], "question": g.question_text(),
             "answers": [r.text for r in g.responses], "critiques": [r.critique for r in g.responses],
             "modes": list(MODES), "pairs": g.pairs()} for g in groups]
    return run, records, rows, copy, weight


def _cli_args(row: dict) -> list[str]:
    """The command line of the test of it: mode generate (critiques printed, then the scores), every answer and image."""
    return (["--question", row["question"], "--critique", "generate"]
            + [a for ans in row["answers"] for a in ("--answer", ans)] + [a for img in row["images"] for a in ("--image", img)])


@pytest.fixture(scope="module")
def both(tmp_path_factory, reward_run_factory) -> dict:
    """Per weight (0 and 2): the exported run, and what one fresh process computed with the exported folder (every
    row, every mode); for w = 2 also the command line on the first row (`cli`) and the merged export's scores of the
    first two rows in mode none (`merged`: (folder, scores))."""
    from mmrlhf_lite.export import export_model

    made = {w: _export(w, tmp_path_factory, reward_run_factory) for w in (0.0, 2.0)}
    run2, _, rows2, _, _ = made[2.0]
    merged = export_model(run2, "reward", run2.parent / "merged", merge=True, dtype="float32", progress=lambda m: None)
    jobs = [{"folder": str(made[w][3]), "rows": made[w][2], "cli": _cli_args(made[w][2][0]) if w else None}
            for w in (0.0, 2.0)]
    jobs.append({"folder": str(merged), "rows": [dict(r, modes=["none"]) for r in rows2[:2]]})
    jobs_file = run2.parent / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH, str(jobs_file)], capture_output=True, text=True,
                          timeout=600, env=_env(), cwd=str(run2.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w2, m = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    return {0.0: (made[0.0], w0["scores"], None, None), 2.0: (made[2.0], w2["scores"], w2["cli"], (merged, m["scores"]))}


@pytest.fixture(params=[0.0, 2.0], ids=["w0", "w2"])
def exported(request, both):
    """(run, its evaluate-reward records by (id, mode), the rows, a copy of the exported folder, w)."""
    return both[request.param][0]


@pytest.fixture
def fresh(exported, both):
    """What the fresh process computed for the `exported` weight: (scores, command line, merged export)."""
    return both[exported[4]][1:]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-6)


def test_exported_scorer_scores_as_evaluate_reward_in_every_mode(exported, fresh):
    run, records, rows, folder, weight = exported
    settings = json.loads((folder / "reward_score.json").read_text())
    assert settings["response_logp_weight"] == weight
    assert (folder / "reward_score.py").read_bytes() == (REPO / "mmrlhf_lite" / "models" / "reward_score.py").read_bytes()
    got = fresh[0]
    assert len(got) == len(records)
    for g in got:
        want = records[(g["id"], g["mode"])]
        assert all(_close(a, b) for a, b in zip(g["scores"], want["scores"])), (g["mode"], g["scores"], want["scores"])
        assert all(_close(a, b) for a, b in zip(g["head"], want["head"])), (g["mode"], g["head"], want["head"])
        if g["mode"] == "generate":  # greedy, batch size 1: the same critique text, hence the same tokens
            assert g["critiques"] == [c[0] for c in want["critiques"]]
        if weight:
            assert all(_close(a, b) for a, b in zip(g["response_logp"], want["response_logp"]))
            # the head alone (what the old export scored with) is far from the score
            assert min(abs(s - h) for s, h in zip(g["scores"], g["head"])) > 100 * REL * max(map(abs, g["scores"]))
        else:
            assert g["response_logp"] == [None] * len(g["scores"]) and g["scores"] == g["head"]
    assert len({round(s, 6) for s in got[0]["scores"]}) > 1  # the answers get different scores


def test_exported_command_line_prints_each_answers_score(exported, fresh):
    """The command line (once, on the hybrid model, in mode generate: critiques printed, then the scores)."""
    run, records, rows, folder, weight = exported
    if not weight:
        pytest.skip("the command line is run once, on the hybrid score")
    row = rows[0]
    want = records[(row["id"], "generate")]
    cli = fresh[1]
    assert cli["code"] == 0, cli
    lines = cli["stdout"].splitlines()
    score_lines, critique_lines = lines[-len(row["answers"]):], lines[:-len(row["answers"])]
    assert [ln.split("\t", 1)[1] for ln in score_lines] == row["answers"]
    assert all(math.isclose(float(ln.split("\t")[0]), b, rel_tol=REL, abs_tol=1e-6)
               for ln, b in zip(score_lines, want["scores"])), (lines, want["scores"])
    assert critique_lines[0] == "critique 1: " + want["critiques"][0][0].split("\n")[0]


def test_model_card_says_how_it_scores(exported):
    run, records, rows, folder, weight = exported
    card = (folder / "README.md").read_text()
    assert "load_reward_model.py --image" in card
    if weight:
        assert "**A hybrid reward model**" in card and f"+ {weight:g} x the answer's mean token log-prob" in card
    else:
        assert "hybrid" not in card and "head on the critique alone" in card


def test_merged_reward_export_scores_alike(exported, fresh):
    run, records, rows, _, weight = exported
    if not weight:
        pytest.skip("the merged path is checked once, on the hybrid score")
    out, got = fresh[2]
    assert not (out / "adapter_config.json").exists()
    assert len(got) == 2
    for g in got:
        want = records[(g["id"], "none")]["scores"]
        assert all(_close(a, b) for a, b in zip(g["scores"], want)), (g["scores"], want)


def test_evaluate_reward_gives_each_parts_accuracy(exported):
    """Per critique mode: the accuracy of the sum, and for a hybrid score of the head alone and of the log-prob
    term alone, each equal to a count by hand over the per-response parts; the table and the eval report
    show them, labelled."""
    from mmrlhf_lite.evaluate.report import format_report

    run, records, rows, _, weight = exported
    out = run.parent / "eval"   # where the fixture's evaluate reward wrote
    bench = json.loads((out / "reward_bench.json").read_text())
    md = (out / "reward_bench.md").read_text()

    def by_hand(part: str, mode: str) -> float:
        right = total = 0
        for row in rows:
            values = records[(row["id"], mode)][part]
            for b, w in row["pairs"]:
                right += values[b] > values[w]
                total += 1
        return right / total

    for mode in MODES:
        res = bench["results"][mode]
        assert res["overall"]["acc"] == by_hand("scores", mode)
        if weight:
            assert res["parts"]["head"]["overall"]["acc"] == by_hand("head", mode)
            assert res["parts"]["response_logp"]["overall"]["acc"] == by_hand("response_logp", mode)
            for label in ("hybrid sum", "head alone", "log-prob term alone"):
                assert f"| {mode}: {label} |" in md
        else:
            assert "parts" not in res and f"| {mode} |" in md
    report = format_report({"groups": len(rows), "pairs": sum(len(r["pairs"]) for r in rows),
                            "reward_model": {"modes": bench["results"]}})
    assert ("Hybrid score: head on the critique + 2 x the answer's mean log-prob" in report) == bool(weight)
    assert ("| given: head alone |" in report) == bool(weight)



def test_playground_card_says_hybrid_and_the_weight(exported):
    """The playground scores with the project's scorer: its numbers equal evaluate reward's, and a hybrid
    model's card shows the head's part, the weight and the mean log-prob, which add up to the score."""
    from mmrlhf_lite.ui import playground

    run, records, rows, _, weight = exported
    row = rows[0]
    results = playground.score(run.parent, run.name, row["images"][0], row["question"], row["answers"], mode="none")
    want = records[(row["id"], "none")]
    assert all(_close(r["score"], b) for r, b in zip(results, want["scores"]))
    cards = playground.cards_html(results)
    if weight:
        assert cards.count("hybrid score = head ") == len(row["answers"]) and f"+ {weight:g} × mean log-prob" in cards
        for r in results:
            assert _close(r["head"] + weight * r["response_logp"], r["score"])
    else:
        assert "hybrid" not in cards
