"""`python -m mmrlhf_lite.data stats|export`: the counts, token percentiles and the CLI's messages.

    python -m pytest -q tests/test_data_stats.py
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mmrlhf_lite.data.__main__ import main
from mmrlhf_lite.data.readers import load_groups
from mmrlhf_lite.data.stats import group_stats, percentiles, token_stats


def fixture(tmp_path: Path) -> Path:
    """mcq group: full ranking with a tie (3 pairs, 1 tie); video group: partial pairs; one text-only group."""
    for name in ("mcq/a.png", "video/clip/0.png", "video/clip/1.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 10), (9, 9, 9)).save(tmp_path / name)
    rows = [
        {"id": "m", "prompt": "Pick.", "image": "mcq/a.png", "chosen": "A", "rejected": "B", "chosen_reason": "ok",
         "rejected_reason": "no"},
        {"id": "m", "prompt": "Pick.", "image": "mcq/a.png", "chosen": "A", "rejected": "C"},
        {"id": "m", "prompt": "Pick.", "image": "mcq/a.png", "chosen": "B", "rejected": "C", "is_tie": True},
        {"id": "v", "prompt": "What moves?", "video": "video/clip", "chosen": "A car.", "rejected": "A cat."},
        {"id": "v", "prompt": "What moves?", "video": "video/clip", "chosen": "A cat.", "rejected": "Nothing."},
        {"id": "t", "prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_percentiles_nearest_rank():
    assert percentiles(list(range(100, 0, -1))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles([]) == {}


def test_group_stats_counts(tmp_path):
    path = fixture(tmp_path)
    stats = group_stats(load_groups(path))
    assert stats == {
        "formats": {str(path): "mmrlhf"}, "rows": 6, "skipped": {}, "warnings": 0, "groups": 3, "ranked_groups": 2,
        "explicit_groups": 1, "responses": 8, "k": {2: 1, 3: 2}, "critiques": 2, "pairs": 5, "ties": 1,
        "categories": {"general": {"groups": 1, "pairs": 1, "ties": 0}, "mcq": {"groups": 1, "pairs": 2, "ties": 1},
                       "video": {"groups": 1, "pairs": 2, "ties": 0}},
        "media": {"images": 1, "distinct_images": 1, "inline_images": 0, "video_groups": 1, "frames": 2,
                  "text_only_groups": 1},
        "prompts": {"prompts": 3, "images": 1, "distinct_images": 1, "rounds_ready_rows": 0, "unranked_responses": 0,
                    "with_meta": 0}}


def test_stats_cli_report(tmp_path, capsys):
    path = fixture(tmp_path)
    assert main(["stats", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"source      {path}",
        "format      mmrlhf (1 file)",
        "rows        6 read, 0 skipped",
        "groups      3 (ranked 2, pairs as given 1)",
        "responses   8 (K: 2x1, 3x2), with critique 2",
        "pairs       5",
        "ties        1",
        "categories  general 1 groups / 1 pairs / 0 ties; mcq 1 groups / 2 pairs / 1 ties; video 1 groups / 2 pairs "
        "/ 0 ties",
        "media       1 images (1 distinct, 0 inline), 1 video groups (2 frames), 1 text-only groups",
        "prompts     3 (1 images, 1 distinct; 0 with meta): 3 ranked groups + 0 rounds-ready rows without a ranking",
        "warnings    0",
    ]


def test_stats_cli_skip_and_errors(tmp_path, capsys):
    path = fixture(tmp_path)
    with open(path, "a") as fh:
        fh.write("{broken\n")
    assert main(["stats", str(path)]) == 1
    assert capsys.readouterr().err == f"error: {path}:7: malformed JSON: Expecting property name enclosed in double " \
                                      "quotes (column 2)\n"
    assert main(["stats", str(path), "--on-error", "skip", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == {"malformed_json": 1}


def test_export_cli_converts_between_formats(tmp_path, capsys):
    path = fixture(tmp_path)
    out = tmp_path / "as_swift.jsonl"
    assert main(["export", str(path), str(out), "--to", "swift"]) == 0
    assert capsys.readouterr().out == f"wrote 3 groups as swift to {out}\n"
    again = load_groups(out)
    assert again.formats == {str(out): "swift"}
    assert group_stats(again)["pairs"] == 5 and group_stats(again)["ties"] == 0  # swift rows cannot mark ties


def test_token_percentiles_with_the_tiny_processor(tmp_path, capsys, tiny_qwen2_vl_xs):
    from mmrlhf_lite.models.families import detect_family
    from mmrlhf_lite.models.loading import load_processor

    path = fixture(tmp_path)
    groups = load_groups(path).groups
    processor = load_processor(str(tiny_qwen2_vl_xs), detect_family(str(tiny_qwen2_vl_xs)))
    tokens = token_stats(groups, processor)
    count = lambda t: len(processor.tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert tokens["response"] == percentiles([count(r.text) for g in groups for r in g.responses])
    assert tokens["critique"] == percentiles([count("ok"), count("no")])
    text_only = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
                                              add_generation_prompt=True, tokenize=False)
    n_text_only = len(processor(text=[text_only])["input_ids"][0])
    assert tokens["sampled_groups"] == 3 and tokens["prompt"]["p50"] > n_text_only  # images add their tokens
    assert main(["stats", str(path), "--processor", "tiny:qwen2_vl:xs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4:] == ["tokens      (prompt over 3 groups, with image tokens)",
                          "  prompt    " + "  ".join(f"{k} {v}" for k, v in tokens["prompt"].items()),
                          "  response  " + "  ".join(f"{k} {v}" for k, v in tokens["response"].items()),
                          "  critique  " + "  ".join(f"{k} {v}" for k, v in tokens["critique"].items())]
