"""The second synthetic task (data/majority.py): the image holds two colours, the right answer is the one on more
dots, the text alone is no help, and each group's meta names its right answer.

    python -m pytest -q tests/test_data_majority.py
"""
from __future__ import annotations

import json
from collections import Counter

from PIL import Image

from mmrlhf_lite.data.demo import COLOURS, answer_correct
from mmrlhf_lite.data.majority import write_majority
from mmrlhf_lite.data.readers import load_groups


def test_the_majority_colour_covers_more_of_the_image_and_is_the_rank_1_answer(tmp_path):
    path = write_majority(tmp_path, groups=40, seed=3, image_size=64)
    groups = load_groups(path).groups
    assert len(groups) == 40 and {g.category for g in groups} == {"majority"}
    for g in groups:
        facts = g.meta["facts"]
        img = Image.open(g.images[0]).convert("RGB")
        pixels = Counter(img.getdata())
        many, few = pixels[COLOURS[facts["majority"]]], pixels[COLOURS[facts["minority"]]]
        assert many > few > 0                                   # both colours are drawn, the majority's on more
        assert sorted(r.rank for r in g.responses) == [1, 2, 3, 4]
        best = g.responses[g.best_index()]
        worst = max(g.responses, key=lambda r: r.rank)
        assert answer_correct(g, best.text) is True and answer_correct(g, worst.text) is False
        assert f"there are {facts['counts'][0]} {facts['majority']} dots" in worst.critique
        assert g.meta["answer"] == facts["majority"] and g.meta["choices"] == list(COLOURS)


def test_the_text_alone_is_no_help_and_the_set_is_written_once(tmp_path):
    path = write_majority(tmp_path, groups=400, seed=0, image_size=48)
    groups = load_groups(path).groups
    named = {1: Counter(), 4: Counter()}
    for g in groups:
        for r in g.responses:
            if r.rank in named:
                named[r.rank][r.text.split(" are ")[1].split(".")[0]] += 1
    for colour in COLOURS:                                        # each colour as often right as wrong (+-25%)
        assert 0.75 < named[1][colour] / named[4][colour] < 1.33, (colour, named)
    stamp = path.stat().st_mtime_ns
    assert write_majority(tmp_path, groups=400, seed=0, image_size=48) == path and path.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "majority_settings.json").read_text())["groups"] == 400
