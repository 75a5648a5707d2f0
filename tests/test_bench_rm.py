"""Reward-model benchmarks as they ship: VL-RewardBench (Parquet with image bytes) and Multimodal RewardBench
(JSON array + image folder) read through the same validation as every format, their official metrics
worked by hand, and both scored end to end with a tiny trained reward run (CLI and Python API).

Fixtures are our own rows in the published layouts (field names and value conventions from the dataset
card / official scripts; docs/benchmarks-rm.md).

    python -m pytest -q tests/test_bench_rm.py
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmrlhf_lite.data.errors import DataError
from mmrlhf_lite.data.formats import detect
from mmrlhf_lite.data.readers import load_groups
from mmrlhf_lite.evaluate.benchmarks import (BENCHMARKS, leaderboard_line, mm_rewardbench_metrics,
                                             mm_rewardbench_split, mmrlhf_rewardbench_metrics, table_rows,
                                             vl_rewardbench_metrics)
from mmrlhf_lite.evaluate.metrics import ScoredGroup

REPO = Path(__file__).resolve().parents[1]


def png_bytes(colour, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, colour)
    img.paste((255, 255, 255), (4, 4, 12, 12))
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ fixtures

VL_ROWS = [  # (id, query, [answer 1, answer 2], human_ranking, query_source, colour)
    ("wv-001", "What colour is the big square?", ["It is red.", "It is green."], [0, 1], "WildVision", (210, 30, 30)),
    ("povid-17", "Describe the picture.", ["A cat on a sofa.", "A blue square on white."], [1, 0], "POVID",
     (30, 40, 200)),
    ("rlaifv-3", "Is there a dog?", ["No, only shapes.", "Yes, a brown dog."], [0, 1], "RLAIF-V", (30, 160, 60)),
    ("mathverse-9", "How many squares are there?", ["There are three.", "There is one white square."], [1, 0],
     "MathVerse", (120, 120, 30)),
]


def write_vl_rewardbench(path: Path) -> Path:
    """A `datasets` Parquet shaped like VL-RewardBench's test split (image stored as bytes)."""
    import datasets

    feats = datasets.Features({
        "id": datasets.Value("string"), "query": datasets.Value("string"),
        "response": datasets.Sequence(datasets.Value("string")), "image": datasets.Image(),
        "human_ranking": datasets.Sequence(datasets.Value("int64")), "models": datasets.Sequence(datasets.Value("string")),
        "judge": datasets.Value("string"), "rationale": datasets.Value("string"),
        "query_source": datasets.Value("string"), "meta": datasets.Value("string"),
        "human_error_analysis": datasets.Sequence(datasets.Value("string")), "ground_truth": datasets.Value("string")})
    cols = {k: [] for k in feats}
    for rid, query, answers, ranking, source, colour in VL_ROWS:
        for k, v in (("id", rid), ("query", query), ("response", answers), ("human_ranking", ranking),
                     ("query_source", source), ("image", {"bytes": png_bytes(colour), "path": f"{rid}.png"}),
                     ("models", ["model-a", "model-b"]), ("judge", "human"), ("rationale", "The second is wrong."),
                     ("meta", "{}"), ("human_error_analysis", []), ("ground_truth", "")):
            cols[k].append(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(cols, features=feats).to_parquet(str(path))
    return path


MM_ROWS = [  # ID, Image, Text, Output1, Output2, Better, Category
    ("nocaps_101", "images/nocaps/101.jpg", "Caption this image in detail.", "A red square with a white corner.",
     "A photo of a beach.", "Output1", "open_generation/correctness_task"),
    ("pairs_7", "images/pairs/7.jpg", "Who is more likely to be the doctor?", "I cannot tell from the image.",
     "The person on the left.", "Output1", "safety"),
    ("mathvista_12", "images/mathvista/12.jpg", "What is 2 + 3?", "2 + 3 = 6.", "2 + 3 = 5.", "Output2", "reasoning"),
    ("vqa_mmbench_4", "images/MMBench/4.png", "Which colour dominates?\n(A) red\n(B) blue", "(B)", "(A)", "Output2",
     "vqa"),
]


def write_mm_rewardbench(root: Path, images_root: Path | None = None) -> Path:
    """`all_data.json` (a JSON array) with the images under `images/...` next to it (or under images_root)."""
    images_root = images_root or root
    for i, (_, image, *_rest) in enumerate(MM_ROWS):
        p = images_root / image
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(png_bytes((40 * i + 30, 90, 200 - 40 * i)))).save(p)
    rows = [{"ID": i, "Image": im, "Text": t, "Output1": o1, "Output2": o2, "Better": b, "Category": c}
            for i, im, t, o1, o2, b, c in MM_ROWS]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "all_data.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- readers

def test_vl_rewardbench_parquet_is_detected_and_read(tmp_path):
    path = write_vl_rewardbench(tmp_path / "vl" / "test-00000-of-00001.parquet")
    res = load_groups(path)
    assert res.formats == {str(path): "vl_rewardbench"}
    assert [g.id for g in res.groups] == [r[0] for r in VL_ROWS]
    g0, g1 = res.groups[:2]
    # human_ranking [0, 1]: answer 1 preferred; [1, 0]: answer 2; the order of the answers is kept
    assert [(r.text, r.rank) for r in g0.responses] == [("It is red.", 1), ("It is green.", 2)] and g0.pairs() == [(0, 1)]
    assert [(r.text, r.rank) for r in g1.responses] == [("A cat on a sofa.", 2), ("A blue square on white.", 1)]
    assert g1.pairs() == [(1, 0)]
    assert g0.images == [png_bytes((210, 30, 30))]  # the Parquet's bytes, not a path
    assert g0.prompt == [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": "What colour is the big square?"}]}]
    assert [g.category for g in res.groups] == ["WildVision", "POVID", "RLAIF-V", "MathVerse"]
    assert [g.meta["domain"] for g in res.groups] == ["general", "hallucination", "hallucination", "reasoning"]
    assert all(r.critique is None for g in res.groups for r in g.responses)  # `rationale` is about the pair


def test_mm_rewardbench_json_array_with_image_folder_and_media_root(tmp_path):
    path = write_mm_rewardbench(tmp_path / "data")
    res = load_groups(path)
    assert res.formats == {str(path): "mm_rewardbench"}
    assert [g.id for g in res.groups] == [r[0] for r in MM_ROWS]
    g = res.groups[2]
    assert [(r.text, r.rank) for r in g.responses] == [("2 + 3 = 6.", 2), ("2 + 3 = 5.", 1)] and g.pairs() == [(1, 0)]
    assert g.images == [str(tmp_path / "data" / "images" / "mathvista" / "12.jpg")]
    assert g.category == "reasoning"
    # the JSON elsewhere than its images: --media-root / data.media_root
    moved = write_mm_rewardbench(tmp_path / "json_only", images_root=tmp_path / "imgs")
    with pytest.raises(DataError, match=r"all_data.json:\d+.*'Image'"):
        load_groups(moved)
    again = load_groups(moved, media_root=tmp_path / "imgs")
    assert again.groups[0].images == [str(tmp_path / "imgs" / "images" / "nocaps" / "101.jpg")]


def test_detection_rules_for_the_two_layouts():
    assert detect({"id": "1", "query": "q", "response": ["a", "b"], "human_ranking": [0, 1]}) == "vl_rewardbench"
    assert detect({"ID": "x", "Text": "q", "Output1": "a", "Output2": "b", "Better": "Output1"}) == "mm_rewardbench"


BASE_VL = {"id": "r1", "query": "Q?", "response": ["yes", "no"], "human_ranking": [0, 1], "query_source": "RLHF-V"}
BASE_MM = {"ID": "knowledge_1", "Image": "i.png", "Text": "Q?", "Output1": "a", "Output2": "b", "Better": "Output1",
           "Category": "knowledge"}


@pytest.mark.parametrize("change, message", [
    ({"human_ranking": [0]}, r"row 1.*key 'human_ranking': expected two ranks such as \[0, 1\]"),
    ({"response": ["only one"]}, r"key 'response': expected a list of two answer strings, got 1"),
    ({"response": ["same", " same"]}, r"'response\[0\]' and 'response\[1\]' have the same text"),
    ({"query_source": "Flickr30k"}, r"key 'query_source': 'Flickr30k' is not one of VL-RewardBench's sources"),
    ({"query": None}, r"missing field 'query' \(format vl_rewardbench\)"),
])
def test_vl_rewardbench_bad_rows_name_file_row_and_key(tmp_path, change, message):
    import datasets

    row = {**BASE_VL, **change, "image": {"bytes": png_bytes((1, 2, 3)), "path": None}}
    path = tmp_path / "vl.parquet"
    datasets.Dataset.from_list([row]).to_parquet(str(path))
    with pytest.raises(DataError, match=message):
        load_groups(path, fmt="vl_rewardbench")


@pytest.mark.parametrize("change, message", [
    ({"Better": "A"}, r"all_data.json:2: key 'Better': expected \"Output1\" or \"Output2\", got 'A'"),
    ({"Output2": "   "}, r"key 'Output2': empty response"),
    ({"Image": "missing.png"}, r"key 'Image'.*missing.png"),
    ({"Category": None}, r"missing field 'Category' \(format mm_rewardbench\)"),
])
def test_mm_rewardbench_bad_rows_name_file_line_and_key(tmp_path, change, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    path = tmp_path / "all_data.json"
    path.write_text(json.dumps([{**BASE_MM, **change}], indent=2))
    with pytest.raises(DataError, match=message):
        load_groups(path)


def test_repeated_ids_become_distinct_pairs_with_a_warning(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    path = tmp_path / "all_data.json"
    path.write_text(json.dumps([BASE_MM, {**BASE_MM, "Output2": "c"}]))
    res = load_groups(path)
    assert [g.id for g in res.groups] == ["knowledge_1", "knowledge_1#2"]
    assert any("id 'knowledge_1' repeats" in w for w in res.warnings)


# ------------------------------------------------------------------------------------ metrics by hand

def pair(gid, category, preferred, other, rank_tie=False) -> ScoredGroup:
    """One benchmark row: response 0 preferred, scored `preferred`; response 1 scored `other`."""
    if rank_tie:
        return ScoredGroup(gid, category, [], [preferred, other], rank_ties=1)
    return ScoredGroup(gid, category, [(0, 1)], [preferred, other])


def test_vl_rewardbench_overall_and_macro_by_hand():
    """Six pairs over three domains (+ one human tie, left out):
    general       WildVision  right, WildVision wrong                 -> 1/2
    hallucination POVID right, RLAIF-V score tie (wrong), RLHF-V right -> 2/3
    reasoning     MathVerse right                                      -> 1/1
    overall = 4/6 = 0.6667; macro = (1/2 + 2/3 + 1) / 3 = 13/18 = 0.7222 (overall weights general less)."""
    groups = [pair("a", "WildVision", 0.9, 0.1), pair("b", "WildVision", 0.2, 0.5), pair("c", "POVID", 1.0, -1.0),
              pair("d", "RLAIF-V", 0.3, 0.3), pair("e", "RLHF-V", 0.0, -0.1), pair("f", "MathVerse", 2.0, 1.0),
              pair("g", "MMMU-Pro", 0.0, 0.0, rank_tie=True)]
    m = vl_rewardbench_metrics(groups)
    assert m["overall"] == {"acc": 4 / 6, "right": 4, "pairs": 6, "score_ties": 1}
    assert m["macro_acc"] == pytest.approx(13 / 18, abs=1e-12)
    assert {d: r["acc"] for d, r in m["domains"].items()} == {"general": 0.5, "hallucination": 2 / 3, "reasoning": 1.0}
    assert m["sources"]["RLAIF-V"] == {"acc": 0.0, "right": 0, "pairs": 1, "score_ties": 1}
    assert "MMMU-Pro" not in m["sources"] and m["rank_ties"] == 1
    line = leaderboard_line(BENCHMARKS["vl-rewardbench"], m, "my RM")
    assert line.splitlines()[-1] == "| my RM | 50.0 | 66.7 | 100.0 | 66.7 | 72.2 |"
    rows = {r["metric"]: r for r in table_rows(BENCHMARKS["vl-rewardbench"], m)}
    assert rows["Macro Average Accuracy"]["acc"] == pytest.approx(13 / 18)
    # a file with one domain only: the macro says over what it was taken
    part = vl_rewardbench_metrics(groups[:2])
    assert part["macro_acc"] == 0.5 and part["macro_domains"] == ["general"]
    assert "Macro Average Accuracy (over general only)" in [r["metric"] for r in
                                                            table_rows(BENCHMARKS["vl-rewardbench"], part)]


def test_mm_rewardbench_sub_splits_by_id_prefix_by_hand():
    """safety: `pairs*` (any case) -> safety/bias, else safety/toxicity; reasoning: `math*` -> reasoning/math,
    else reasoning/coding. Eight pairs, 5 right (a score tie is wrong):
    bias 1/2, toxicity 1/1, math 1/2 (mathvista counts as math), coding 1/1, correctness 1/1, vqa 0/1."""
    groups = [pair("pairs_1", "safety", 1, 0), pair("PAIRS_2", "safety", 0, 1), pair("hateful_3", "safety", 1, 0),
              pair("math_1", "reasoning", 1, 0), pair("mathvista_2", "reasoning", 0, 1),
              pair("EMMA-Coding_4", "reasoning", 1, 0), pair("nocaps_1", "open_generation/correctness_task", 1, 0),
              pair("vqa_1", "vqa", 0.5, 0.5)]
    m = mm_rewardbench_metrics(groups)
    assert (m["overall"]["right"], m["overall"]["pairs"], m["overall"]["score_ties"]) == (5, 8, 1)
    assert {k: (v["right"], v["pairs"]) for k, v in m["splits"].items()} == {
        "safety/bias": (1, 2), "safety/toxicity": (1, 1), "reasoning/math": (1, 2), "reasoning/coding": (1, 1),
        "open_generation/correctness_task": (1, 1), "vqa": (0, 1)}
    assert {k: (v["right"], v["pairs"]) for k, v in m["categories"].items()} == {
        "safety": (2, 3), "reasoning": (2, 3), "open_generation/correctness_task": (1, 1), "vqa": (0, 1)}
    assert mm_rewardbench_split("Pairs-x", "knowledge") == "knowledge"  # the prefix rule is per category
    line = leaderboard_line(BENCHMARKS["mm-rewardbench"], m, "my RM").splitlines()
    assert line[0] == "| Model | Overall | General Correctness | General Preference | Knowledge | Reasoning | Safety | VQA |"
    assert line[2] == "| my RM | 0.625 | 1.000 | - | - | 0.667 | 0.667 | 0.000 |"


def test_mmrlhf_rewardbench_acc_plus_over_rows_sharing_an_id():
    """id q1 (mcq): two rows, both right -> Acc+ 1; id q2 (mcq): one right, one wrong -> 0.
    Acc = 3/4, Acc+ = 1/2."""
    groups = [pair("q1", "mcq", 1, 0), pair("q1", "mcq", 2, 1), pair("q2", "mcq", 1, 0), pair("q2", "mcq", 0, 1)]
    m = mmrlhf_rewardbench_metrics(groups)
    assert (m["overall"]["acc"], m["overall"]["acc_plus"]) == (0.75, 0.5)
    assert leaderboard_line(BENCHMARKS["mmrlhf-rewardbench"], m, "x").splitlines()[-1] == "| x | 75.0 | 50.0 | 75.0 | 50.0 |"


# --------------------------------------------------------------------------------- end to end (tiny)

SMALL = ["model.path=tiny:qwen2_vl:xs", "model.device=cpu", "data.demo.groups=6", "data.demo.image_size=56",
         "data.eval_fraction=0.34", "reward.train.max_steps=2", "reward.train.groups_per_step=2",
         "reward.train.grad_accum=1", "reward.max_new_tokens=4", "run.seed=0"]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """A run folder with a trained tiny critique reward model (2 steps: enough to have an adapter + head)."""
    from mmrlhf_lite.recipe import load_recipe
    from mmrlhf_lite.train import run_pipeline

    run = tmp_path_factory.mktemp("bench") / "rm"
    run_pipeline(load_recipe(None, SMALL + [f"run.dir={run}"]), ["reward"], echo=False)
    return run


def test_vl_rewardbench_end_to_end_cli(reward_run, tmp_path):
    data = write_vl_rewardbench(tmp_path / "vl.parquet")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "mmrlhf_lite.evaluate", "bench", str(reward_run), "--bench",
                          "vl-rewardbench", "--data", str(data), "--critique", "generate,given,none"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    folder = reward_run / "bench" / "vl-rewardbench"
    report = json.loads((folder / "report.json").read_text())
    assert set(report["results"]) == {"generate", "none"} and report["smoke"] is True
    assert report["skipped_modes"] == {"given": "VL-RewardBench ships no critique per answer"}
    assert (report["groups"], report["pairs"], report["rank_ties"]) == (4, 4, 0)
    preds = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and [p["pairs"] for p in preds[:4]] == [[[0, 1]], [[1, 0]], [[0, 1]], [[1, 0]]]
    for mode, res in report["results"].items():
        mine = [p for p in preds if p["mode"] == mode]
        # the report's numbers, recomputed from the written scores (ties wrong)
        right = [p["scores"][p["pairs"][0][0]] > p["scores"][p["pairs"][0][1]] for p in mine]
        assert res["metrics"]["overall"]["right"] == sum(right) and res["metrics"]["overall"]["pairs"] == 4
        dom = {"general": [right[0]], "hallucination": right[1:3], "reasoning": [right[3]]}
        macro = sum(sum(v) / len(v) for v in dom.values()) / 3
        assert res["metrics"]["macro_acc"] == pytest.approx(macro)
        assert res["leaderboard"].splitlines()[0].startswith("| Model | General | Hallucination | Reasoning |")
        assert (res["computed"], res["from_cache"]) == (8, 0)
    assert report["packed"] is True  # the tiny Qwen2-VL with SDPA: both answers of a pair in one row
    md = (folder / "report.md").read_text()
    assert "**Smoke run**" in md and "## Critique mode `generate`" in md and "| Macro Average Accuracy |" in md
    assert "critique mode `given` skipped" in md
    assert md in out.stdout


def test_mm_rewardbench_end_to_end_scores_match_hand_built_groups(reward_run, tmp_path):
    """The bench reader gives the model exactly what a hand-built group of the same row gives it."""
    from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn
    from mmrlhf_lite.evaluate.bench_run import load_bench_reports, run_benchmark
    from mmrlhf_lite.recipe import load_recipe
    from mmrlhf_lite.reward.scorer import RewardScorer

    data = write_mm_rewardbench(tmp_path / "json", images_root=tmp_path / "img")
    recipe = load_recipe(reward_run / "recipe.yaml", check_paths=False)
    scorer = RewardScorer.from_run(reward_run, recipe.model, max_length=recipe.reward.train.max_length)
    report = run_benchmark(reward_run, "mm-rewardbench", data, critique=("none",), media_root=str(tmp_path / "img"),
                           scorer=scorer, progress=False)
    res = report["results"]["none"]
    hand = [PreferenceGroup(id=i, prompt=[text_to_turn(t, 1)], images=[str(tmp_path / "img" / im)],
                            responses=[Response(o1), Response(o2)]) for i, im, t, o1, o2, _, _ in MM_ROWS]
    expected = [[s.score for s in g] for g in scorer.score_groups(hand, "none")]
    preds = [json.loads(x) for x in (Path(report["out"]) / "predictions.jsonl").read_text().splitlines()]
    assert [x for p in preds for x in p["scores"]] == pytest.approx([x for e in expected for x in e], abs=1e-5)
    right = [e[0] > e[1] if b == "Output1" else e[1] > e[0] for e, (*_, b, _c) in zip(expected, MM_ROWS)]
    assert res["metrics"]["overall"]["right"] == sum(right)
    assert set(res["metrics"]["splits"]) == {"open_generation/correctness_task", "safety/bias", "reasoning/math", "vqa"}
    assert load_bench_reports(reward_run)["mm-rewardbench"]["results"]["none"]["table"] == res["table"]
    # the same command again reads every score from the score store (computed 0: the model is never loaded)
    again = run_benchmark(reward_run, "mm-rewardbench", data, critique=("none",), media_root=str(tmp_path / "img"),
                          progress=False, scorer=None)
    assert (again["results"]["none"]["computed"], again["results"]["none"]["from_cache"]) == (0, 8)
    assert again["packed"] is None and "every score read from the score store" in (Path(again["out"]) / "report.md").read_text()
    assert again["results"]["none"]["table"] == res["table"]


def test_bench_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mmrlhf_lite.evaluate", "bench", *args], capture_output=True,
                              text=True, env=env, timeout=120)

    out = cli(str(tmp_path), "--bench", "vl-rewardbench", "--data", "x.parquet")
    assert out.returncode == 1 and out.stderr == f"error: {tmp_path / 'recipe.yaml'} not found: is {tmp_path} a run folder?\n"
    out = cli(str(tmp_path), "--bench", "rewardbench", "--data", "x")
    assert out.returncode == 2 and "invalid choice: 'rewardbench'" in out.stderr
    out = cli(str(tmp_path), "--bench", "vl-rewardbench", "--data", "x", "--critique", "gen")
    assert out.returncode == 2 and "unknown critique mode 'gen'" in out.stderr


# ------------------------------------------------------------------------------------- compare tab

def test_compare_tab_shows_benchmark_tables_of_runs_side_by_side(tmp_path):
    from mmrlhf_lite.evaluate.benchmarks import bench_result
    from mmrlhf_lite.ui import compare

    def fake(name: str, bench: str, modes: dict, smoke=False):
        folder = tmp_path / name / "bench" / bench
        folder.mkdir(parents=True)
        results = {m: {**bench_result(bench, g, name), "seconds": 0.1} for m, g in modes.items()}
        (folder / "report.json").write_text(json.dumps({"benchmark": bench, "pairs": 2, "smoke": smoke,
                                                        "results": results}))

    vl_a = [pair("a", "WildVision", 1, 0), pair("b", "POVID", 0, 1)]
    vl_b = [pair("a", "WildVision", 1, 0), pair("b", "POVID", 1, 0)]
    fake("run-a", "vl-rewardbench", {"generate": vl_a, "none": vl_b})
    fake("run-b", "vl-rewardbench", {"none": vl_b}, smoke=True)
    fake("run-b", "mm-rewardbench", {"none": [pair("pairs_1", "safety", 1, 0), pair("x", "vqa", 0, 0)]}, smoke=True)
    (tmp_path / "run-c").mkdir()  # no benchmark yet
    table = compare.bench_table(tmp_path, ["run-a", "run-b", "run-c"])
    assert list(table.columns) == ["benchmark", "metric", "run-a (generate)", "run-a (none)", "run-b (none, smoke run)"]
    rows = {(r["benchmark"], r["metric"]): r for r in table.to_dict("records")}
    assert rows[("VL-RewardBench", "General")] == {"benchmark": "VL-RewardBench", "metric": "General",
                                                   "run-a (generate)": "100.0%", "run-a (none)": "100.0%",
                                                   "run-b (none, smoke run)": "100.0%"}
    assert rows[("VL-RewardBench", "Overall Accuracy")]["run-a (generate)"] == "50.0%"
    assert rows[("VL-RewardBench", "Macro Average Accuracy (over general, hallucination only)")]["run-a (none)"] == "100.0%"
    mm = rows[("Multimodal RewardBench", "split: safety/bias")]
    assert (mm["run-a (generate)"], mm["run-b (none, smoke run)"]) == ("-", "100.0%")
    assert rows[("Multimodal RewardBench", "VQA")]["run-b (none, smoke run)"] == "0.0%"  # a score tie is wrong
    assert [k[0] for k in rows][0] == "VL-RewardBench"
    assert rows[("VL-RewardBench", "pairs scored")]["run-b (none, smoke run)"] == "2"


def test_compare_benchmarks_through_the_app_api(tmp_path):
    """The Compare tab's benchmark table from a real `python app.py` (its own API endpoint, beside /compare)."""
    pytest.importorskip("gradio_client")
    from gradio_client import Client
    from test_ui_support import start_server, stop_server

    from mmrlhf_lite.evaluate.benchmarks import bench_result

    server = start_server(tmp_path)
    try:
        folder = server.runs / "rm-a" / "bench" / "mm-rewardbench"
        folder.mkdir(parents=True)
        res = bench_result("mm-rewardbench", [pair("math_1", "reasoning", 1, 0), pair("code_2", "reasoning", 0, 1)], "x")
        (folder / "report.json").write_text(json.dumps({"benchmark": "mm-rewardbench", "pairs": 2,
                                                        "results": {"none": res}}))
        client = Client(server.url, verbose=False, download_files=False)
        out = client.predict(["rm-a"], api_name="/compare_benchmarks")
        assert out["headers"] == ["benchmark", "metric", "rm-a (none)"]
        got = {(b, m): v for b, m, v in out["data"]}
        assert got[("Multimodal RewardBench", "Reasoning")] == "50.0%"
        assert got[("Multimodal RewardBench", "split: reasoning/math")] == "100.0%"
        assert got[("Multimodal RewardBench", "split: reasoning/coding")] == "0.0%"
    finally:
        stop_server(server)


def test_mm_rewardbench_table_lists_categories_then_the_official_sub_splits():
    m = mm_rewardbench_metrics([pair("nocaps_1", "open_generation/correctness_task", 1, 0),
                                pair("pairs_1", "safety", 1, 0), pair("math_2", "reasoning", 0, 1),
                                pair("k", "knowledge", 1, 0)])
    assert [r["metric"] for r in table_rows(BENCHMARKS["mm-rewardbench"], m)] == [
        "Overall", "General Correctness", "Knowledge", "Reasoning", "Safety", "split: reasoning/math",
        "split: safety/bias"]


def test_bench_names_a_file_in_another_layout_and_an_unusable_mode(reward_run, tmp_path):
    from mmrlhf_lite.evaluate.bench_run import run_benchmark

    mm = write_mm_rewardbench(tmp_path / "data")
    with pytest.raises(DataError, match=r"all_data.json:2: this row is in the `mm_rewardbench` layout, not "
                                         r"VL-RewardBench's \(`vl_rewardbench`\): use --bench mm-rewardbench"):
        run_benchmark(reward_run, "vl-rewardbench", mm)
    with pytest.raises(ValueError, match=r"no critique mode left to score: given: Multimodal RewardBench ships no "
                                         r"critique per answer \(use --critique generate or none\)"):
        run_benchmark(reward_run, "mm-rewardbench", mm, critique=("given",))
    (tmp_path / "data" / "all_data_release.json").write_text((tmp_path / "data" / "all_data.json").read_text())
    with pytest.raises(DataError, match=r"2 data files in this folder \(all_data.json, all_data_release.json\); a "
                                         r"benchmark is one file: pass it to --data \(Multimodal RewardBench: "
                                         r"data/all_data.json\)"):
        run_benchmark(reward_run, "mm-rewardbench", tmp_path / "data")
    with pytest.raises(ValueError, match="--max-pairs must be 0"):
        run_benchmark(reward_run, "mm-rewardbench", mm, max_pairs=-1)


def test_mmrlhf_rewardbench_through_the_same_command(reward_run, tmp_path):
    """MM-RLHF-RewardBench rows (several pairs per id, category from the media path, critiques given)."""
    from mmrlhf_lite.evaluate.bench_run import run_benchmark

    for i, cat in enumerate(("mcq", "short")):
        p = tmp_path / "MM-RLHF" / cat / f"{i}.png"
        p.parent.mkdir(parents=True)
        Image.open(io.BytesIO(png_bytes((200, 60 * i, 40)))).save(p)
    rows = [{"id": "q1", "prompt": "Which colour?", "image": "mcq/0.png", "chosen": "Red.", "rejected": "Blue.",
             "chosen_reason": "Right colour.", "rejected_reason": "Wrong colour."},
            {"id": "q1", "prompt": "Which colour?", "image": "mcq/0.png", "chosen": "Red.", "rejected": "Green.",
             "chosen_reason": "Right colour.", "rejected_reason": "Wrong colour."},
            {"id": "q2", "prompt": "Count them.", "image": "short/1.png", "chosen": "One.", "rejected": "Two.",
             "chosen_reason": "Correct.", "rejected_reason": "Miscounted."}]
    data = tmp_path / "mm_reward_bench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_benchmark(reward_run, "mmrlhf-rewardbench", data, critique=("given", "none"),
                           media_root=str(tmp_path / "MM-RLHF"), progress=False)
    assert set(report["results"]) == {"given", "none"} and (report["groups"], report["pairs"]) == (2, 3)
    preds = [json.loads(x) for x in (Path(report["out"]) / "predictions.jsonl").read_text().splitlines()]
    for mode, res in report["results"].items():
        mine = {p["id"]: p for p in preds if p["mode"] == mode}
        plus = sum(all(mine[i]["right"]) for i in ("q1", "q2")) / 2
        acc = sum(sum(mine[i]["right"]) for i in ("q1", "q2")) / 3
        assert (res["metrics"]["overall"]["acc"], res["metrics"]["overall"]["acc_plus"]) == (acc, plus)
        assert set(res["metrics"]["by_category"]) == {"mcq", "short"}
        assert res["leaderboard"].splitlines()[0] == "| Model | Acc | Acc+ | mcq Acc | mcq Acc+ | short Acc | short Acc+ |"


def test_compare_benchmarks_refuses_paths_outside_the_runs_root(tmp_path):
    from mmrlhf_lite.ui import compare
    from mmrlhf_lite.ui.safety import Refused

    (tmp_path / "runs").mkdir()
    for bad in ("../runs", "/etc", "a/b"):
        with pytest.raises(Refused):
            compare.bench_table(tmp_path / "runs", [bad])


def test_report_markdown_names_smoke_runs_skipped_rows_warnings_and_ties():
    from mmrlhf_lite.evaluate.benchmarks import bench_result, markdown

    res = bench_result("vl-rewardbench", [pair("a", "WildVision", 1, 1), pair("b", "POVID", 1, 0)], "tiny RM")
    md = markdown({"benchmark": "vl-rewardbench", "run": "runs/x", "smoke": True, "model": "tiny:qwen2_vl",
                   "data": "vl.parquet", "format": "vl_rewardbench", "groups": 3, "pairs": 2, "rank_ties": 1,
                   "adapter": "runs/x/reward/final", "skipped_rows": {"missing_image": 2},
                   "warnings": ["f:3: key 'id': id 'a' repeats; this row is read as 'a#2'"], "warning_count": 1,
                   "skipped_modes": {"given": "VL-RewardBench ships no critique per answer"},
                   "packed": True, "results": {"none": {**res, "seconds": 0.5}}})
    assert "each pair scored packed (both answers in one row)" in md
    assert "**Smoke run**: `tiny:qwen2_vl`" in md and "1 pair(s) the humans ranked equal were left out" in md
    assert "Rows left out (`--on-error skip`): 2 missing_image." in md
    assert "1 warning(s) while reading" in md and "- f:3: key 'id': id 'a' repeats" in md
    assert "| General | 0.0% | 0 / 1 pairs | 1 |" in md  # the score tie: wrong, and counted
    assert "| tiny RM | 0.0 | 100.0 | - | 50.0 | 50.0 |" in md
    assert "- critique mode `given` skipped: VL-RewardBench ships no critique per answer" in md
