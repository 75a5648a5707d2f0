"""Sources: JSONL (line reader and the `datasets` path), JSON arrays, Parquet, save_to_disk folders, folders.

    python -m pytest -q tests/test_data_sources.py
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmrlhf_lite.data import sources
from mmrlhf_lite.data.errors import DataError
from mmrlhf_lite.data.readers import load_groups
from mmrlhf_lite.data.sources import iter_rows, list_sources


def png_bytes(colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def pair(i: int, **kw) -> dict:
    return {"id": f"g{i // 2}", "prompt": f"Question {i // 2}?", "chosen": f"good {i}", "rejected": f"bad {i}", **kw}


def locations(path) -> list[str]:
    return [r.source.rsplit(":", 1)[1] for r in iter_rows(str(path))]


def test_jsonl_line_numbers_skip_blank_lines_and_bom(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\ufeff" + json.dumps(pair(0)) + "\n\n   \n" + json.dumps(pair(1)) + "\n")
    assert locations(path) == ["1", "4"]


def test_datasets_path_gives_the_same_rows_and_lines_as_the_line_reader(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    rows = [pair(0), pair(1, chosen_reason="why"), pair(2, is_tie=False)]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    plain = load_groups(path)
    monkeypatch.setattr(sources, "DATASETS_MIN_BYTES", 0)
    via = load_groups(path)
    assert locations(path) == ["1", "3", "4"]
    assert [g.to_record() for g in via.groups] == [g.to_record() for g in plain.groups]
    assert [g.source for g in via.groups] == [f"{path}:1", f"{path}:4"]


def test_datasets_path_keeps_rows_whose_fields_change_type(tmp_path, monkeypatch):
    """ms-swift's `rejected_response` is a string on one row and a message list on the next."""
    monkeypatch.setattr(sources, "DATASETS_MIN_BYTES", 0)
    conv = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"messages": conv, "rejected_response": "Go away."}) + "\n"
                    + json.dumps({"messages": conv, "rejected_response": [{"role": "assistant", "content": "No."}]})
                    + "\n")
    [g] = load_groups(path).groups
    assert [r.text for r in g.responses] == ["Hello.", "Go away.", "No."]


def test_json_single_object_and_json_lines_in_a_json_file(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(pair(0), indent=2))
    assert locations(one) == ["1"]
    many = tmp_path / "many.json"
    many.write_text(json.dumps(pair(0)) + "\n" + json.dumps(pair(1)) + "\n")
    assert locations(many) == ["1", "2"]


def test_parquet_with_inline_image_bytes(tmp_path):
    data = png_bytes()
    features = datasets.Features({"question": datasets.Value("string"), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string"), "image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"question": ["Colour?", "Colour?"], "chosen": ["Green.", "Green."],
                                     "rejected": ["Red.", "Blue."], "image": [{"bytes": data, "path": None}] * 2},
                                    features=features)
    path = tmp_path / "rlaifv.parquet"
    ds.to_parquet(str(path))
    res = load_groups(path)
    [g] = res.groups
    assert res.formats == {str(path): "rlaifv"} and g.source == f"{path}:row 1"
    assert g.images == [data] and [r.text for r in g.responses] == ["Green.", "Red.", "Blue."]


def test_save_to_disk_folder_and_dataset_dict(tmp_path):
    rows = [pair(0), pair(1)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    res = load_groups(tmp_path / "saved")
    assert [g.id for g in res.groups] == ["g0"] and res.groups[0].source == f"{tmp_path / 'saved'}:row 1"
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as err:
        load_groups(tmp_path / "dd")
    assert str(err.value) == (f"{tmp_path / 'dd'}: this `datasets` folder holds the splits train, test; point "
                              f"data.path at one of them, e.g. {tmp_path / 'dd' / 'train'}")
    assert [g.id for g in load_groups(tmp_path / "dd" / "train").groups] == ["g0"]


def test_folder_reads_data_files_in_name_order_and_skips_metadata(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps(pair(2)) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([pair(0), pair(1)]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "a.json"}}))
    (tmp_path / "demo_settings.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [Path(f).name for f in list_sources(tmp_path)] == ["a.json", "b.jsonl"]
    res = load_groups(tmp_path)
    assert [g.id for g in res.groups] == ["g0", "g1"]
    assert [r.text for r in res.groups[0].responses] == ["good 0", "bad 0", "good 1", "bad 1"]
