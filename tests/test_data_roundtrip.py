"""Demo groups -> every format (JSONL, JSON, Parquet) -> reader -> the same groups, up to what the format holds.

    python -m pytest -q tests/test_data_roundtrip.py
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from mmrlhf_lite.data.demo import generate
from mmrlhf_lite.data.errors import DataError
from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn
from mmrlhf_lite.data.readers import load_groups
from mmrlhf_lite.data.writers import WRITERS, turn_text, write_groups

# what each format carries besides id, prompt, media, category, response texts and pairs
CARRIES = {
    "ranked": {"ties", "critiques", "scores", "meta"},
    "mmrlhf": {"ties", "critiques"},
    "mmrlhf_bench": {"ties", "critiques"},
    "trl": set(), "swift": set(), "llamafactory": set(), "rlaifv": set(), "rlhfv": set(),
    "vlfeedback": {"ties", "critiques", "scores"},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, list[PreferenceGroup]]:
    out = tmp_path_factory.mktemp("demo")
    groups = generate(out, groups=24, seed=3, image_size=48, safety_fraction=0.25)
    assert any(g.category == "safety" for g in groups) and any(g.category != "safety" for g in groups)
    return out, groups


def view(g: PreferenceGroup, carries: set[str]) -> dict:
    text = lambda i: g.responses[i].text  # noqa: E731
    v = {"id": g.id, "prompt": g.prompt, "images": g.images, "video": g.video, "category": g.category,
         "texts": sorted(r.text for r in g.responses), "pairs": sorted((text(b), text(w)) for b, w in g.pairs())}
    if "ties" in carries:
        v["ties"] = sorted(tuple(sorted((text(a), text(b)))) for a, b in g.ties())
        v["ranks"] = sorted(zip(g.ranks(), (r.text for r in g.responses)))
    if "critiques" in carries:
        v["critiques"] = sorted((r.text, r.critique) for r in g.responses)
    if "scores" in carries:
        v["scores"] = sorted((r.text, r.score) for r in g.responses)
    if "meta" in carries:
        v["meta"] = g.meta
    return v


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_demo_groups_survive_every_format(demo, fmt):
    out, groups = demo
    path = write_groups(groups, out / f"export_{fmt}.jsonl", fmt)
    res = load_groups(path, fmt="auto" if fmt != "mmrlhf_bench" else fmt)
    assert res.warnings == [] and not res.skipped
    assert [view(g, CARRIES[fmt]) for g in res.groups] == [view(g, CARRIES[fmt]) for g in groups]
    if "ties" not in CARRIES[fmt]:
        # without tie rows a safety group (refusal 1, three answers tied at 2) is no longer a complete ranking
        for new, old in zip(res.groups, groups):
            assert new.ties() == []
            assert (new.explicit_pairs is None) == (old.ties() == [])


def test_ranked_rows_are_identical_records(demo):
    out, groups = demo
    res = load_groups(write_groups(groups, out / "same.jsonl", "ranked"))
    assert [g.to_record() for g in res.groups] == [g.to_record() for g in groups]


@pytest.mark.parametrize("fmt,suffix", [("ranked", ".parquet"), ("trl", ".parquet"), ("llamafactory", ".json"),
                                        ("mmrlhf", ".json")])
def test_json_and_parquet_containers(demo, fmt, suffix):
    out, groups = demo
    res = load_groups(write_groups(groups, out / f"c_{fmt}{suffix}", fmt))
    assert [view(g, CARRIES[fmt]) for g in res.groups] == [view(g, CARRIES[fmt]) for g in groups]


def test_inline_image_bytes_go_to_parquet_only(demo):
    out, groups = demo
    inline = [dataclasses.replace(g, images=[Path(p).read_bytes() for p in g.images]) for g in groups[:4]]
    with pytest.raises(DataError, match="has inline image bytes; write it to .parquet"):
        write_groups(inline, out / "bytes.jsonl", "rlaifv")
    res = load_groups(write_groups(inline, out / "bytes.parquet", "rlaifv"))
    assert [view(g, set()) for g in res.groups] == [view(g, set()) for g in inline]


@pytest.fixture
def rich(tmp_path) -> list[PreferenceGroup]:
    """A multi-turn prompt with a system turn and a video, and a single-turn prompt with an image mid-text."""
    frames = []
    for i in range(3):
        frames.append(str(tmp_path / "clip" / f"{i}.png"))
        (tmp_path / "clip").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(frames[-1])
    Image.new("RGB", (8, 8), (0, 90, 0)).save(tmp_path / "g.png")
    prompt = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
              text_to_turn("What happens first?", 0, has_video=True),
              {"role": "assistant", "content": [{"type": "text", "text": "A ball falls."}]},
              {"role": "user", "content": [{"type": "text", "text": "And then?"}]}]
    video = PreferenceGroup("v1", prompt, [Response("It bounces.", 1, critique="right"),
                                            Response("It flies.", 2, critique="wrong")], video=frames)
    mid = PreferenceGroup("m1", [text_to_turn("Is <image> green?", 1)], [Response("Yes.", 1), Response("No.", 2)],
                          images=[str(tmp_path / "g.png")])
    return [video, mid]


@pytest.mark.parametrize("fmt", ["ranked", "swift", "llamafactory"])
def test_multi_turn_prompt_with_video(tmp_path, rich, fmt):
    res = load_groups(write_groups(rich, tmp_path / f"rich_{fmt}.jsonl", fmt), max_frames=8)
    assert [view(g, CARRIES[fmt]) for g in res.groups] == [view(g, CARRIES[fmt]) for g in rich]


@pytest.mark.parametrize("fmt", ["mmrlhf", "rlaifv", "rlhfv", "vlfeedback", "trl"])
def test_image_in_the_middle_of_a_string_prompt_keeps_its_place(tmp_path, rich, fmt):
    res = load_groups(write_groups(rich[1:], tmp_path / f"mid_{fmt}.jsonl", fmt))
    assert res.groups[0].prompt == [{"role": "user", "content": [{"type": "text", "text": "Is "}, {"type": "image"},
                                                                  {"type": "text", "text": " green?"}]}]


def test_formats_that_cannot_hold_a_group_say_why(tmp_path, rich):
    with pytest.raises(DataError) as err:
        write_groups(rich[:1], tmp_path / "x.jsonl", "mmrlhf")
    assert str(err.value) == "group 'v1' cannot be written as mmrlhf: the format holds one user prompt, the group " \
                             "has 4 turn(s)"
    with pytest.raises(DataError, match="cannot be written as trl: the format has no video field"):
        write_groups(rich[:1], tmp_path / "x.jsonl", "trl")


def test_turn_text_writes_tags_only_where_needed():
    turn = text_to_turn("<image>Look.", 1)
    assert (turn_text(turn), turn_text(turn, tags=False)) == ("<image>Look.", "Look.")
    turn = text_to_turn("Look <image> here.", 1)
    assert turn_text(turn, tags=False) == "Look <image> here."


def test_from_record_inverts_to_record(demo, rich):
    _, groups = demo
    for g in groups + rich + [PreferenceGroup("e", [text_to_turn("q", 0)], [Response("a"), Response("b")],
                                              explicit_pairs=[(1, 0)], explicit_ties=[])]:
        again = PreferenceGroup.from_record(g.to_record(), source=g.source)
        assert again == g
