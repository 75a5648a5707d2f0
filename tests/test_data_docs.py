"""Every example row in docs/data-formats.md parses, and auto-detection names the section's format.

    python -m pytest -q tests/test_data_docs.py
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from mmrlhf_lite.data.readers import load_groups

DOC = Path(__file__).resolve().parents[1] / "docs" / "data-formats.md"
MEDIA = re.compile(r'"((?:img|short|long|MM-RLHF|video)/[^"]+)"')


def examples() -> list[tuple[str, str]]:
    """(format of the section, code block) for every ```json block under a '### `format`' heading."""
    out, fmt = [], None
    for block in re.split(r"^(### .*|```json\n[\s\S]*?```)$", DOC.read_text(), flags=re.M):
        if block.startswith("### "):
            fmt = re.match(r"### `(\w+)`", block).group(1)
        elif block.startswith("```json") and fmt:
            out.append((fmt, block[len("```json\n"):-3]))
    return out


def test_every_format_section_has_examples():
    assert sorted({f for f, _ in examples()}) == ["llamafactory", "mm_rewardbench", "mmrlhf", "ranked", "rlaifv", "rlhfv",
                                                  "swift", "trl", "vl_rewardbench", "vlfeedback"]


@pytest.mark.parametrize("fmt,block", examples(), ids=[f"{f}-{i}" for i, (f, _) in enumerate(examples())])
def test_doc_example_parses(tmp_path, fmt, block):
    for rel in set(MEDIA.findall(block)):
        target = tmp_path / rel
        if Path(rel).suffix:
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (5, 5, 5)).save(target, format="PNG")
        else:  # a video: a folder of frames
            target.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(target / f"{i}.png")
    path = tmp_path / ("rows.json" if block.lstrip().startswith("[") else "rows.jsonl")
    path.write_text(block)
    res = load_groups(path)
    assert set(res.formats.values()) == {fmt} and res.groups and not res.skipped
