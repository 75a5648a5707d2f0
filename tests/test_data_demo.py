"""The synthetic demo set: deterministic, K = 4 ranked 1-4 (safety: refusal first), text alone is no help.

    python -m pytest -q tests/test_data_demo.py
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest

from mmrlhf_lite.data.demo import COLOURS, COUNT_WORDS, SHAPES, SIZES, generate, write_demo
from mmrlhf_lite.data.readers import load_groups

VALUES = {"colour": list(COLOURS), "shape": list(SHAPES), "count": list(COUNT_WORDS.values()), "size": list(SIZES)}


def records(groups, root: Path) -> list[dict]:
    out = []
    for g in groups:
        rec = g.to_record()
        rec["images"] = [str(Path(p).relative_to(root)) for p in rec["images"]]
        out.append(rec)
    return out


def test_same_seed_same_groups_and_images(tmp_path):
    a = generate(tmp_path / "a", groups=30, seed=5, image_size=48)
    b = generate(tmp_path / "b", groups=30, seed=5, image_size=48)
    c = generate(tmp_path / "c", groups=30, seed=6, image_size=48)
    assert records(a, tmp_path / "a") == records(b, tmp_path / "b") != records(c, tmp_path / "c")
    assert [Path(g.images[0]).read_bytes() for g in a] == [Path(g.images[0]).read_bytes() for g in b]


def test_every_group_has_four_responses_ranked_1_to_4_except_safety(tmp_path):
    groups = generate(tmp_path, groups=200, seed=0, image_size=48, safety_fraction=0.1)
    kinds = Counter(g.category for g in groups)
    assert set(kinds) == {"colour", "shape", "count", "size", "safety"} and kinds["safety"] > 0
    for g in groups:
        assert len(g.responses) == 4 and len(g.images) == 1 and all(r.critique for r in g.responses)
        if g.category == "safety":
            assert sorted(g.ranks()) == [1, 2, 2, 2] and len(g.pairs()) == 3 and len(g.ties()) == 3
        else:
            assert sorted(g.ranks()) == [1, 2, 3, 4] and len(g.pairs()) == 6 and g.ties() == []


def asked_value(kind: str, text: str) -> str:
    first = text.split(".")[0]
    found = [v for v in VALUES[kind] if re.search(rf"\b{v}s?\b", first)]
    assert len(found) == 1, (kind, text)
    return found[0]


def test_text_only_baseline_answer_values_are_as_frequent_in_best_as_in_worst(tmp_path):
    """Every value of the asked attribute is (statistically) as common at rank 1 as at rank 4.

    Tolerance: 4 standard deviations of a difference of two binomial shares with p = 1/|values|.
    """
    groups = generate(tmp_path, groups=1200, seed=0, image_size=48, safety_fraction=0.0)
    for kind, values in VALUES.items():
        best, worst = Counter(), Counter()
        for g in (g for g in groups if g.category == kind):
            ranks = g.ranks()
            best[asked_value(kind, g.responses[ranks.index(1)].text)] += 1
            worst[asked_value(kind, g.responses[ranks.index(4)].text)] += 1
        n = sum(best.values())
        p = 1 / len(values)
        tol = 4 * math.sqrt(2 * p * (1 - p) / n)
        for v in values:
            assert abs(best[v] / n - worst[v] / n) <= tol, (kind, v, best, worst)
        assert set(best) == set(worst) == set(values)


def test_written_demo_reads_back_through_the_reader(tmp_path):
    path = write_demo(tmp_path, groups=12, seed=1, image_size=48)
    res = load_groups(path)
    assert res.formats == {str(path): "ranked"} and len(res.groups) == 12
    assert records(res.groups, tmp_path) == records(generate(tmp_path / "again", 12, 1, 48), tmp_path / "again")


@pytest.mark.parametrize("kind", list(VALUES))
def test_asked_value_parser(kind):
    assert asked_value(kind, {"colour": "The circle is red. It is big.",
                              "shape": "The object is a square. It is red.",
                              "count": "The number of circles is two. They are red.",
                              "size": "The circle is small. It is blue."}[kind]) \
        == {"colour": "red", "shape": "square", "count": "two", "size": "small"}[kind]
