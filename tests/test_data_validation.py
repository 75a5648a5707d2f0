"""Every malformed case gives one precise message (file:line, key, path), or is counted under on_error=skip.

    python -m pytest -q tests/test_data_validation.py
"""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mmrlhf_lite.data import sources
from mmrlhf_lite.data.errors import DataError
from mmrlhf_lite.data.readers import load_groups
from mmrlhf_lite.data.validate import MediaChecker
from mmrlhf_lite.events import EventLog, read_events


def png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)
    return path


def write(path: Path, lines: list) -> Path:
    """Rows (dicts are dumped, strings written as they are) one per line."""
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in lines), encoding="utf-8")
    return path


def pair(**kw) -> dict:
    row = {"id": "g1", "prompt": "What is it?", "chosen": "A red square.", "rejected": "A blue circle.",
           "image": "img.png"}
    row.update(kw)
    return {k: v for k, v in row.items() if v is not ...}


def error_of(path, **kw) -> str:
    with pytest.raises(DataError) as err:
        load_groups(path, **kw)
    return str(err.value)


@pytest.fixture
def root(tmp_path) -> Path:
    png(tmp_path / "img.png")
    return tmp_path


# -------------------------------------------------------------------------------------- JSON problems

@pytest.mark.parametrize("via_datasets", [False, True])
def test_malformed_jsonl_line_is_named_by_file_and_line(root, monkeypatch, via_datasets):
    if via_datasets:  # large files go through `datasets`; a bad line still gets its exact line number
        monkeypatch.setattr(sources, "DATASETS_MIN_BYTES", 0)
    path = write(root / "bad.jsonl", [pair(), "", '{"id": "g2" "prompt": "x"}'])
    assert error_of(path) == f"{path}:3: malformed JSON: Expecting ',' delimiter (column 13)"


@pytest.mark.parametrize("via_datasets", [False, True])
def test_malformed_jsonl_line_reports_the_true_column(root, monkeypatch, via_datasets):
    """An object cut short (a missing closing brace) is reported where the line ends, not at column 1."""
    if via_datasets:
        monkeypatch.setattr(sources, "DATASETS_MIN_BYTES", 0)
    line = '{"id": "g2", "prompt": "' + "q" * 80 + '", "chosen": "a", "rejected": "b"'
    path = write(root / "cut.jsonl", [pair(), line])
    assert error_of(path) == f"{path}:2: malformed JSON: Expecting ',' delimiter (column {len(line) + 1})"


def test_malformed_json_array_names_the_line_of_the_syntax_error(root):
    path = root / "bad.json"
    path.write_text('[\n  {"prompt": "q", "chosen": "a", "rejected": "b"},\n  {"prompt": "q",, }\n]\n')
    assert error_of(path) == f"{path}:3: malformed JSON: Expecting property name enclosed in double quotes (column 18)"


@pytest.mark.parametrize("text,line,message", [
    ('[\n  {"prompt": "q"}\n  {"prompt": "r"}\n]\n', 3, "Expecting ',' delimiter (column 3)"),
    ('[\n  {"prompt": "q"}\n]\n]\n', 4, "Extra data (column 1)"),
    ('[\n  {"prompt": "q"},\n]\n', 3, "Expecting value (column 1)"),
])
def test_json_array_structure_errors(root, text, line, message):
    path = root / "arr.json"
    path.write_text(text)
    assert error_of(path, on_error="skip") == f"{path}:{line}: malformed JSON: {message}"


def test_row_that_is_not_an_object(root):
    path = write(root / "list.jsonl", [pair(), "[1, 2]"])
    assert error_of(path) == f"{path}:2: expected a JSON object, got list"


# ---------------------------------------------------------------------------------------- fields

def test_missing_field_names_the_key_and_format(root):
    path = write(root / "m.jsonl", [pair(), pair(id="g2", rejected=...)])
    assert error_of(path) == f"{path}:2: missing field 'rejected' (format mmrlhf)"


def test_wrong_type_names_the_key(root):
    path = write(root / "t.jsonl", [pair(chosen=["A red square."])])
    assert error_of(path, fmt="mmrlhf") == f"{path}:1: field 'chosen' must be a string, got list"


def test_bench_format_requires_the_id(root):
    path = write(root / "b.jsonl", [pair(id=...)])
    assert error_of(path, fmt="mmrlhf_bench") == f"{path}:1: missing field 'id' (format mmrlhf_bench)"


def test_empty_response(root):
    path = write(root / "e.jsonl", [pair(rejected="  \n")])
    assert error_of(path) == f"{path}:1: key 'rejected': empty response"


@pytest.mark.parametrize("rejected", ["A red square.", "  A red square. "])
def test_chosen_equals_rejected_ignoring_outer_whitespace(root, rejected):
    path = write(root / "same.jsonl", [pair(rejected=rejected)])
    assert error_of(path) == f"{path}:1: 'chosen' and 'rejected' have the same text: 'A red square.'"


def test_bad_tie_value(root):
    path = write(root / "tie.jsonl", [pair(is_tie="sometimes")])
    assert error_of(path) == f"{path}:1: field 'is_tie' must be true or false, got 'sometimes'"


# ----------------------------------------------------------------------------------- duplicates / ids

def test_duplicate_id_in_ranked_rows_even_across_files(root):
    row = {"id": "same", "prompt": "q", "responses": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]}
    folder = root / "folder"
    folder.mkdir()
    write(folder / "a.jsonl", [row])
    write(folder / "b.jsonl", [{**row, "prompt": "other"}])
    assert error_of(folder) == f"{folder / 'b.jsonl'}:1: duplicate id 'same' (first at {folder / 'a.jsonl'}:1)"


def test_pair_id_reused_with_another_prompt_or_image(root):
    png(root / "other.png", colour=(0, 0, 0))
    path = write(root / "r.jsonl", [pair(), pair(prompt="Something else?", rejected="x")])
    assert error_of(path) == f"{path}:2: id 'g1' was first used at {path}:1 with a different prompt"
    path = write(root / "r2.jsonl", [pair(), pair(image="other.png", rejected="x")])
    assert error_of(path) == f"{path}:2: id 'g1' was first used at {path}:1 with a different images"


def test_duplicate_pair(root):
    path = write(root / "d.jsonl", [pair(), pair(chosen_reason="again")])
    assert error_of(path) == f"{path}:2: duplicate pair in group 'g1': the same chosen and rejected as {path}:1"


def test_ranked_row_checks(root):
    base = {"id": "r", "prompt": "q"}
    cases = [
        ({"responses": [{"text": "a", "rank": 1}]},
         "key 'responses': a group needs at least 2 responses, got 1"),
        ({"responses": [{"text": "a", "rank": 1}, {"text": "b"}]},
         "key 'responses': give every response a 'rank' (1 = best), or every response a 'score', or list the 'pairs'"),
        ({"responses": [{"text": "a", "rank": 0}, {"text": "b", "rank": 1}]},
         "key 'responses[0].rank' must be an integer >= 1 (1 = best), got 0"),
        ({"responses": [{"text": "a", "score": "high"}, {"text": "b", "score": 1}]},
         "key 'responses[0].score' must be a finite number, got 'high'"),
        ({"responses": [{"text": "a", "rank": 1}, {"text": "a", "rank": 2}]},
         "'responses[0].text' and 'responses[1].text' have the same text: 'a'"),
        ({"responses": [{"text": "a"}, {"text": "b"}], "pairs": [[0, 2]]},
         "key 'pairs': [0, 2] is not a pair of two response indices in 0..1"),
        ({"responses": [{"rank": 1}, {"text": "b", "rank": 2}]},
         "missing field 'responses[0].text' (format ranked)"),
    ]
    for i, (fields, message) in enumerate(cases):
        path = write(root / f"rk{i}.jsonl", [{**base, **fields}])
        assert error_of(path) == f"{path}:1: {message}"


# ------------------------------------------------------------------------------------------------ media

def test_missing_image_names_its_resolved_path(root):
    path = write(root / "mi.jsonl", [pair(image="pics/nope.png")])
    assert error_of(path) == f"{path}:1: key 'image': image not found: {root / 'pics' / 'nope.png'}"


def test_media_root_changes_where_paths_resolve(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("media")
    png(elsewhere / "img.png")
    [g] = load_groups(write(root / "mr.jsonl", [pair()]), media_root=elsewhere).groups
    assert g.images == [str(elsewhere / "img.png")]


def test_corrupt_images_png_jpeg_and_garbage(root):
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, format="PNG")
    (root / "half.png").write_bytes(buf.getvalue()[:60])
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, format="JPEG")
    (root / "cut.jpg").write_bytes(buf.getvalue()[:-40])
    (root / "text.png").write_text("not an image")
    expected = {"half.png": "Truncated File Read", "cut.jpg": "truncated JPEG: no end-of-image marker",
                "text.png": "not a format PIL recognises"}
    for name, why in expected.items():
        path = write(root / f"c-{name}.jsonl", [pair(image=name)])
        assert error_of(path) == f"{path}:1: key 'image': corrupt or unreadable image: {root / name} ({why})"


def test_image_list_entries_are_named_by_index(root):
    path = write(root / "il.jsonl", [pair(image=["img.png", "gone.png"], prompt="<image><image>Compare.")])
    assert error_of(path) == f"{path}:1: key 'image[1]': image not found: {root / 'gone.png'}"


def test_remote_and_empty_image_paths(root):
    path = write(root / "url.jsonl", [pair(image="https://example.org/a.png")])
    assert error_of(path) == f"{path}:1: key 'image': remote images are not downloaded; save it locally: " \
                             "https://example.org/a.png"
    path = write(root / "empty.jsonl", [pair(image="")])
    assert error_of(path) == f"{path}:1: key 'image': empty image path"


def test_image_placeholders_must_match_the_images(root):
    path = write(root / "tags.jsonl", [pair(prompt="<image>\n<image>\nCompare.")])
    assert error_of(path) == (f"{path}:1: key 'prompt': the prompt has 2 image placeholder(s) (<image> tags or image "
                              "parts) but the row gives 1 image(s)")
    path = write(root / "tags2.jsonl", [pair(prompt="What is <image> here?", image=...)])
    assert error_of(path, fmt="mmrlhf") == (f"{path}:1: key 'prompt': the prompt has 1 image placeholder(s) (<image> "
                                            "tags or image parts) but the row gives 0 image(s)")


def test_video_problems(root):
    (root / "clip.mp4").write_bytes(b"\x00")
    (root / "empty_dir").mkdir()
    cases = {"clip.mp4": f"video files are not decoded; give a folder of frames or a list of frame paths instead: "
                         f"{root / 'clip.mp4'}",
             "empty_dir": f"video folder has no image frames: {root / 'empty_dir'}",
             "no_dir": f"video folder not found: {root / 'no_dir'}"}
    for video, message in cases.items():
        path = write(root / f"v-{video}.jsonl", [pair(image=..., video=video)])
        assert error_of(path) == f"{path}:1: key 'video': {message}"
    path = write(root / "frames.jsonl", [pair(image=..., video=["img.png", "lost.png"])])
    assert error_of(path) == f"{path}:1: key 'video': image not found: {root / 'lost.png'}"


def test_media_checker_opens_each_path_once(root):
    checker = MediaChecker()
    for _ in range(3):
        checker.check(str(root / "img.png"), "f:1", "image")
    assert checker.checked == 1


# --------------------------------------------------------------------------------------------- sources

def test_source_level_errors(root):
    assert error_of(root / "nope.jsonl") == f"{root / 'nope.jsonl'}: data path not found"
    (root / "data.csv").write_text("a,b\n")
    assert error_of(root / "data.csv") == (f"{root / 'data.csv'}: unsupported file type '.csv'; expected one of "
                                           ".jsonl, .ndjson, .json, .parquet (or a folder)")
    (root / "empty").mkdir()
    assert error_of(root / "empty") == (f"{root / 'empty'}: folder holds no data files (.jsonl, .ndjson, .json, "
                                        ".parquet) and is not a `datasets` save_to_disk folder")
    assert error_of(write(root / "ok.jsonl", [pair()]), fmt="csv").startswith("unknown data.format 'csv'; choose one")


def test_skip_counts_rows_by_reason_and_records_the_event(root):
    rows = [pair(), "{oops", pair(id="g2", rejected=...), pair(id="g3", image="lost.png"),
            pair(id="g4", rejected=" "), pair(id="g5", chosen="Same", rejected="Same"), pair(id="g6", image="lost.png"),
            pair(chosen_reason="dup")]
    path = write(root / "mixed.jsonl", rows)
    events = EventLog(root / "run", echo=False)
    res = load_groups(path, on_error="skip", events=events)
    assert [g.id for g in res.groups] == ["g1"] and res.rows == 8
    assert res.skipped == Counter({"missing_image": 2, "malformed_json": 1, "missing_field": 1, "empty_response": 1,
                                   "chosen_equals_rejected": 1, "duplicate_pair": 1})
    assert res.examples["missing_image"] == f"{path}:4: key 'image': image not found: {root / 'lost.png'}"
    evs, _ = read_events(root / "run")
    [skipped] = [e for e in evs if e["type"] == "data_skipped"]
    assert skipped["stage"] == "data" and skipped["counts"] == dict(res.skipped)
    assert skipped["message"] == ("skipped 7 row(s): 2 missing_image, 1 malformed_json, 1 missing_field, "
                                  "1 empty_response, 1 chosen_equals_rejected, 1 duplicate_pair")
    assert [e["message"] for e in evs if e["type"] == "warning"] == [skipped["message"]]


def test_nothing_loaded_is_an_error_even_with_skip(root):
    path = write(root / "none.jsonl", [pair(image="lost.png")])
    assert error_of(path, on_error="skip") == (f"{path}: no preference groups were loaded from 1 row(s) "
                                               "(skipped 1 row(s): 1 missing_image)")
