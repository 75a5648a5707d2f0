"""Prompts for online rounds: rows with a question and images but no ranked responses load, in every format the
readers know, as groups without a ranking, only when rounds are asked for; without rounds they stay errors.

    python -m pytest -q tests/test_data_prompts.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmrlhf_lite.data import load_data
from mmrlhf_lite.data.__main__ import main as data_main
from mmrlhf_lite.data.errors import DataError
from mmrlhf_lite.data.readers import load_groups
from mmrlhf_lite.events import EventLog
from mmrlhf_lite.recipe import load_recipe


def png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)
    return path


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


IMAGE_PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]

# (name, rows, format read, unranked answers kept): each file holds two prompts over the images a.png, b.png
CASES = [
    ("trl prompt-only", [{"prompt": "<image>What colour is it?", "images": ["a.png"]},
                         {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                     "text": "What colour is it?"}]}],
                          "images": ["b.png"]}], "trl", [0, 0]),
    ("trl prompt-completion", [{"prompt": "What colour is it?", "completion": "Red.", "images": ["a.png"]},
                               {"prompt": "What colour is it?", "images": ["b.png"]}], "trl", [1, 0]),
    ("ranked without responses", [{"id": "g1", "prompt": "What colour is it?", "images": ["a.png"],
                                   "meta": {"facts": {"colour": "red"}}},
                                  {"id": "g2", "prompt": IMAGE_PROMPT, "images": ["b.png"], "responses": []}],
     "ranked", [0, 0]),
    ("ranked with unranked responses", [{"id": "g1", "prompt": "What colour is it?", "images": ["a.png"],
                                         "responses": [{"text": "Red."}, {"text": "Blue."}]},
                                        {"id": "g2", "prompt": "What colour is it?", "images": ["b.png"],
                                         "responses": [{"text": "Green."}]}], "ranked", [2, 1]),
    ("llamafactory sharegpt", [{"conversations": [{"from": "human", "value": "<image>What colour is it?"}],
                                "images": ["a.png"]},
                               {"conversations": [{"from": "human", "value": "<image>What colour is it?"},
                                                  {"from": "gpt", "value": "Blue."}], "images": ["b.png"]}],
     "llamafactory", [0, 1]),
    ("swift messages", [{"messages": [{"role": "user", "content": "<image>What colour is it?"}], "images": ["a.png"]},
                        {"messages": [{"role": "user", "content": "<image>What colour is it?"},
                                      {"role": "assistant", "content": "Blue."}], "images": ["b.png"]}],
     "swift", [0, 1]),
    ("swift query", [{"query": "What colour is it?", "images": ["a.png"]},
                     {"query": "What colour is it?", "response": "Blue.", "images": ["b.png"]}], "swift", [0, 1]),
]


@pytest.mark.parametrize("name,rows,fmt,answers", CASES, ids=[c[0] for c in CASES])
def test_prompt_rows_load_as_prompts_with_rounds(tmp_path, name, rows, fmt, answers):
    for n in ("a", "b"):
        png(tmp_path / f"{n}.png")
    path = jsonl(tmp_path / "prompts.jsonl", rows)
    res = load_groups(path, prompts=True)
    assert res.formats == {str(path): fmt}
    assert [g.is_ranked() for g in res.groups] == [False, False]
    assert [g.images for g in res.groups] == [[str(tmp_path / "a.png")], [str(tmp_path / "b.png")]]
    assert [len(g.responses) for g in res.groups] == answers
    for g in res.groups:
        assert g.prompt[-1]["role"] == "user"
        assert [p["type"] for p in g.prompt[-1]["content"]] == ["image", "text"]
        assert g.question_text() == "What colour is it?"
    assert len({g.id for g in res.groups}) == 2   # ids of their own (the row's, else a content hash)
    if fmt == "ranked" and name.endswith("without responses"):
        assert res.groups[0].meta == {"facts": {"colour": "red"}} and res.groups[0].id == "g1"


@pytest.mark.parametrize("name,rows,fmt,answers", CASES, ids=[c[0] for c in CASES])
def test_prompt_rows_are_still_an_error_without_rounds(tmp_path, name, rows, fmt, answers):
    for n in ("a", "b"):
        png(tmp_path / f"{n}.png")
    path = jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_groups(path)
    assert str(err.value).startswith(f"{path}:1: ")
    if fmt != "ranked" or "unranked" not in name:
        assert err.value.reason in ("unknown_format", "missing_field", "too_few_responses")


def test_a_prompt_row_without_rounds_names_the_fields_and_says_how_to_use_it(tmp_path):
    png(tmp_path / "a.png")
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "<image>What colour is it?", "images": ["a.png"]}])
    with pytest.raises(DataError) as err:
        load_groups(path)
    assert str(err.value) == (
        f"{path}:1: cannot tell the format from the fields ['images', 'prompt']; set data.format to one of ranked, "
        "mmrlhf, mmrlhf_bench, trl, swift, llamafactory, rlaifv, rlhfv, vlfeedback, vl_rewardbench, mm_rewardbench "
        "(docs/data-formats.md); a row without responses is a prompt for online rounds, read only when rounds are "
        "asked for (rounds.n > 0, or --rounds N; docs/rounds.md)")


def test_ranked_and_prompt_rows_in_one_file_and_a_half_ranked_row_stays_an_error(tmp_path):
    for n in ("a", "b"):
        png(tmp_path / f"{n}.png")
    ranked = {"id": "r1", "prompt": "What colour is it?", "images": ["a.png"],
              "responses": [{"text": "Red.", "rank": 1}, {"text": "Blue.", "rank": 2}]}
    prompt = {"id": "p1", "prompt": "What colour is it?", "images": ["b.png"]}
    res = load_groups(jsonl(tmp_path / "mixed.jsonl", [ranked, prompt]), prompts=True)
    assert [(g.id, g.is_ranked()) for g in res.groups] == [("r1", True), ("p1", False)]
    assert res.groups[0].pairs() == [(0, 1)]
    half = {**ranked, "id": "r2", "responses": [{"text": "Red.", "rank": 1}, {"text": "Blue."}]}
    with pytest.raises(DataError, match="give every response a 'rank'"):
        load_groups(jsonl(tmp_path / "half.jsonl", [half]), prompts=True)


def _mixed_file(tmp_path: Path) -> Path:
    rows = []
    for i in range(20):
        png(tmp_path / f"i{i}.png", colour=(10 * i, 0, 0))
        row = {"id": f"g{i}", "prompt": "What colour is it?", "images": [f"i{i}.png"]}
        if i < 8:
            row["responses"] = [{"text": "Red.", "rank": 1}, {"text": "Blue.", "rank": 2}]
        rows.append(row)
    return jsonl(tmp_path / "mixed.jsonl", rows)


def test_load_data_keeps_prompts_out_of_the_offline_stages(tmp_path):
    path = _mixed_file(tmp_path)
    recipe = load_recipe(None, [f"data.path={path}", "data.eval_fraction=0.3", "rounds.n=2"])
    data = load_data(recipe, tmp_path / "run", EventLog(None, echo=False), dry_run=True)
    assert all(g.is_ranked() for g in data.train + data.evals)
    assert not any(g.is_ranked() for g in data.train_prompts + data.eval_prompts)
    assert len(data.train) + len(data.evals) == 8 and len(data.train_prompts) + len(data.eval_prompts) == 12
    assert data.eval_prompts  # split by the same hash as the ranked groups
    # without rounds the same file is the error it was
    with pytest.raises(DataError, match="i8.png|missing field 'responses'"):
        load_data(load_recipe(None, [f"data.path={path}"]), tmp_path / "run", EventLog(None, echo=False))


def test_data_stats_counts_prompts_images_and_rounds_ready_rows(tmp_path, capsys):
    path = _mixed_file(tmp_path)
    assert data_main(["stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert "groups      8 (ranked 8, pairs as given 0)" in out
    assert ("prompts     20 (20 images, 20 distinct; 0 with meta): 8 ranked groups + 12 rounds-ready rows without "
            "a ranking") in out
    assert "read only with rounds.n > 0 (--rounds N)" in out
    assert data_main(["stats", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["prompts"] == {"prompts": 20, "images": 20, "distinct_images": 20, "rounds_ready_rows": 12,
                                "unranked_responses": 0, "with_meta": 0}
    assert stats["groups"] == 8 and stats["pairs"] == 8


def test_the_prompt_rows_of_docs_data_formats_load_with_rounds(tmp_path):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "data-formats.md").read_text()
    block = doc.split("## Prompts for online rounds", 1)[1].split("```jsonl\n", 1)[1].split("```", 1)[0]
    for line in block.splitlines():
        for image in json.loads(line)["images"]:
            png(tmp_path / image)
    by_format = {}
    for i, line in enumerate(block.splitlines()):  # a format per file, as detection reads the first row
        res = load_groups(jsonl(tmp_path / f"row{i}.jsonl", [json.loads(line)]), prompts=True)
        [g] = res.groups
        assert not g.is_ranked() and g.images == [str(tmp_path / f"img/q{i + 1}.png")]
        by_format[i] = next(iter(res.formats.values()))
    assert by_format == {0: "ranked", 1: "ranked", 2: "trl", 3: "trl", 4: "swift", 5: "swift", 6: "llamafactory"}
