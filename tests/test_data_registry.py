"""LLaMA-Factory's dataset registry (`dataset_info.json`): an entry's file is read with its column mapping
and message tags, media resolve against the registry's folder, and every entry that cannot be read says why.
Our own registry and rows, shaped like LLaMA-Factory's.

    python -m pytest -q tests/test_data_registry.py
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmrlhf_lite.data import prepare_data
from mmrlhf_lite.data.errors import DataError
from mmrlhf_lite.data.readers import load_groups
from mmrlhf_lite.events import EventLog
from mmrlhf_lite.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), colour).save(path)


@pytest.fixture
def registry(tmp_path) -> Path:
    """A LLaMA-Factory-style `data/` folder: a multimodal sharegpt DPO set with custom column names and tags
    in a subfolder (its images relative to `data/`), an alpaca DPO set with a single `image` column and
    history, an SFT set, a hub entry."""
    data = tmp_path / "data"
    _png(data / "imgs" / "red.png", (220, 30, 30))
    _png(data / "imgs" / "blue.png", (30, 30, 220))
    (data / "mine").mkdir(parents=True)
    rows = [{"uid": f"q{i}", "talk": [{"speaker": "person", "text": f"<image>What colour is it? ({i})"}],
             "good": {"speaker": "bot", "text": colour}, "bad": {"speaker": "bot", "text": other},
             "pics": [f"imgs/{colour}.png"]}
            for i, (colour, other) in enumerate([("red", "blue"), ("blue", "red")])]
    (data / "mine" / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    alpaca = [{"question": "Which colour?", "context": "Answer in one word.", "better": "Red.", "worse": "Green.",
               "image": "imgs/red.png", "past": [["Hi", "Hello! Send a picture."]]}]
    (data / "alpaca_dpo.json").write_text(json.dumps(alpaca))
    (data / "sft.json").write_text(json.dumps([{"instruction": "Say hi", "output": "hi"}]))
    info = {
        "my_mm_dpo": {"file_name": "mine/prefs.jsonl", "ranking": True, "formatting": "sharegpt",
                      "columns": {"messages": "talk", "chosen": "good", "rejected": "bad", "images": "pics"},
                      "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person",
                               "assistant_tag": "bot"}},
        "my_alpaca_dpo": {"file_name": "alpaca_dpo.json", "ranking": True,
                          "columns": {"prompt": "question", "query": "context", "chosen": "better",
                                      "rejected": "worse", "images": "image", "history": "past"}},
        "my_sft": {"file_name": "sft.json"},
        "hub_dpo": {"hf_hub_url": "someone/some-dpo", "ranking": True, "formatting": "sharegpt"},
    }
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return data


def test_sharegpt_entry_with_custom_columns_and_tags(registry):
    for path in (registry, registry / "dataset_info.json"):  # the folder or the file
        result = load_groups(path, dataset="my_mm_dpo")
        assert result.formats == {str(registry / "mine" / "prefs.jsonl"): "llamafactory"}
        g = result.groups[0]
        assert g.prompt == [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": "What colour is it? (0)"}]}]
        assert [(r.text, r.rank) for r in g.responses] == [("red", 1), ("blue", 2)]
        assert g.images == [str(registry / "imgs" / "red.png")]  # relative to the registry, not to mine/
        assert g.source == f"{registry / 'mine' / 'prefs.jsonl'}:1"
        assert len(result.groups) == 2


def test_alpaca_entry_with_query_history_and_a_single_image(registry):
    g = load_groups(registry, dataset="my_alpaca_dpo").groups[0]
    assert [t["role"] for t in g.prompt] == ["user", "assistant", "user"]
    assert g.prompt[-1]["content"] == [{"type": "text", "text": "Which colour?\nAnswer in one word."}]
    assert g.prompt[0]["content"][0] == {"type": "image"}  # no <image> tag: it leads the first user turn
    assert [r.text for r in g.responses] == ["Red.", "Green."] and g.images == [str(registry / "imgs" / "red.png")]


def test_entries_that_cannot_be_read_say_why(registry):
    listing = "its preference entries (\"ranking\": true): hub_dpo, my_alpaca_dpo, my_mm_dpo"
    with pytest.raises(DataError) as info:
        load_groups(registry / "dataset_info.json")
    assert "LLaMA-Factory's dataset registry, not data rows: choose an entry with data.dataset=NAME" in str(info.value)
    assert listing in str(info.value)
    with pytest.raises(DataError, match=r"no entry 'my_mm_dpoo' \(did you mean 'my_mm_dpo'\?\)"):
        load_groups(registry, dataset="my_mm_dpoo")
    with pytest.raises(DataError, match=r"entry 'my_sft': is not a preference set"):
        load_groups(registry, dataset="my_sft")
    with pytest.raises(DataError, match=r"entry 'hub_dpo': is not a local file \(hf_hub_url someone/some-dpo\)"):
        load_groups(registry, dataset="hub_dpo")
    with pytest.raises(DataError, match=r"data.dataset is 'x' but there is no dataset_info.json"):
        load_groups(registry / "mine", dataset="x")
    with pytest.raises(DataError, match=r"data.format is 'swift' but entry 'my_mm_dpo' is read as 'llamafactory'"):
        load_groups(registry, fmt="swift", dataset="my_mm_dpo")


def test_a_row_missing_its_mapped_prompt_column_names_file_line_and_column(registry):
    rows = json.loads((registry / "alpaca_dpo.json").read_text())
    rows.append({"better": "Red.", "worse": "Blue.", "image": "imgs/red.png"})
    (registry / "alpaca_dpo.json").write_text(json.dumps(rows, indent=1))
    with pytest.raises(DataError, match=r"alpaca_dpo.json:\S+: missing field 'question' \(the entry's prompt column\)"):
        load_groups(registry, dataset="my_alpaca_dpo")
    result = load_groups(registry, dataset="my_alpaca_dpo", on_error="skip")
    assert len(result.groups) == 1 and result.skipped == {"missing_field": 1}


def test_recipe_key_and_stats_command(registry, tmp_path):
    recipe = load_recipe(None, [f"data.path={registry}", "data.dataset=my_mm_dpo", "data.eval_fraction=0",
                                f"run.dir={tmp_path / 'run'}"], check_paths=False)
    train, evals = prepare_data(recipe, tmp_path / "run", EventLog(None, echo=False), dry_run=True)
    assert [g.id for g in train] and not evals and len(train) == 2
    out = subprocess.run([sys.executable, "-m", "mmrlhf_lite.data", "stats", str(registry), "--dataset", "hub_dpo"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "is not a local file" in out.stderr and "Traceback" not in out.stderr
    ok = subprocess.run([sys.executable, "-m", "mmrlhf_lite.data", "stats", str(registry), "--dataset", "my_mm_dpo"],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "groups      2" in ok.stdout


def test_a_registry_under_another_name_is_recognised(registry, tmp_path):
    other = tmp_path / "my_registry.json"
    other.write_text((registry / "dataset_info.json").read_text())
    with pytest.raises(DataError, match="LLaMA-Factory's dataset registry, not data rows"):
        load_groups(other)
    # its file_name entries resolve against its own folder: here they do not exist
    with pytest.raises(DataError, match=r"its file_name mine/prefs.jsonl does not exist"):
        load_groups(other, dataset="my_mm_dpo")
    # an ordinary single-object data file is still read as data
    (tmp_path / "row.json").write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}))
    assert len(load_groups(tmp_path / "row.json", fmt="mmrlhf").groups) == 1
