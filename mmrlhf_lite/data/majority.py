"""A second synthetic image-grounded task: which colour most of the dots have.

Each image holds 4-6 dots of two colours, one colour on more dots than the other (3 vs 1, 3 vs 2, 4 vs 1, 4 vs 2),
all of one size. The question is always "Which colour are most of the dots?". Where the demo set
(`data/demo.py`) asks for a property of the one kind of object in the picture, here both colours are in the
picture and the answer is the one there is more of: a comparison of amounts. The K = 4 answers share one template
and differ in two values, the colour named (the majority's, or the minority's: also in the picture, so seeing a
colour is not enough) and a detail (the dots' size):

    rank 1: majority colour, right size    "Most of the dots are red. The dots are big."
    rank 2: majority colour, wrong size
    rank 3: minority colour, right size
    rank 4: minority colour, wrong size

Colours are drawn uniformly for both roles, so the text alone ranks at chance. Each response carries a templated
critique, and each group's `meta` gives the right answer and the possible ones (`{"answer", "choices"}`), which
the eval stage and the online rounds count right answers with (`data.demo.answer_correct`).

    python -m mmrlhf_lite.data.majority runs/majority-data --groups 600 --seed 0
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from .demo import COLOURS, write_set
from .groups import PreferenceGroup, Response, text_to_turn

DOT_SIZES = {"big": 0.2, "small": 0.12}   # dot diameter as a share of the canvas
SPLITS = ((3, 1), (3, 2), (4, 1), (4, 2))
QUESTION = "Which colour are most of the dots?"
TEMPLATE = "Most of the dots are {a}. The dots are {d}."
VERSION = 1


def _dots(rng: random.Random, size: int, n: int, side: int) -> list[tuple[int, int, int, int]]:
    while True:
        boxes: list = []
        for _ in range(200):
            if len(boxes) == n:
                break
            x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
            box = (x, y, x + side, y + side)
            if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1] for b in boxes):
                boxes.append(box)
        if len(boxes) == n:
            return boxes


def _critique(named: str, detail: str, facts: dict) -> str:
    parts = [f"The response correctly says most of the dots are {named}." if named == facts["majority"] else
             f"The response is wrong: it says most of the dots are {named}, but there are {facts['counts'][0]} "
             f"{facts['majority']} dots and only {facts['counts'][1]} {facts['minority']} ones."]
    parts.append(f"The size it mentions, {detail}, is correct." if detail == facts["size"] else
                 f"It also says the dots are {detail} but they are {facts['size']}.")
    return " ".join(parts)


def make_group(rng: random.Random, index: int, image_dir: Path, size: int) -> PreferenceGroup:
    gid = f"majority-{index:05d}"
    majority, minority = rng.sample(list(COLOURS), 2)
    many, few = rng.choice(SPLITS)
    dot = rng.choice(list(DOT_SIZES))
    side = max(6, int(size * DOT_SIZES[dot]))
    colours = [majority] * many + [minority] * few
    rng.shuffle(colours)
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for colour, box in zip(colours, _dots(rng, size, len(colours), side)):
        draw.ellipse(box, fill=COLOURS[colour])
    path = image_dir / f"{gid}.png"
    img.save(path)
    facts = {"majority": majority, "minority": minority, "counts": [many, few], "size": dot}
    wrong_size = next(s for s in DOT_SIZES if s != dot)
    combos = [(majority, dot), (majority, wrong_size), (minority, dot), (minority, wrong_size)]
    responses = [Response(TEMPLATE.format(a=a, d=d), rank=i + 1, score=[1.0, 0.6, 0.3, 0.0][i],
                          critique=_critique(a, d, facts)) for i, (a, d) in enumerate(combos)]
    rng.shuffle(responses)
    return PreferenceGroup(id=gid, prompt=[text_to_turn("<image>" + QUESTION, 1)], responses=responses,
                           images=[str(path)], category="majority",
                           meta={"answer": majority, "choices": list(COLOURS), "facts": facts})


def write_majority(out_dir: str | Path, groups: int = 600, seed: int = 0, image_size: int = 112) -> Path:
    """Write `majority.jsonl` (native ranked rows, image paths relative to it) + images; returns the file. Reuses
    an existing set written with the same settings."""
    settings = {"groups": groups, "seed": seed, "image_size": image_size, "version": VERSION}

    def make_groups(out: Path) -> list:
        (out / "images").mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed)
        return [make_group(rng, i, out / "images", image_size) for i in range(groups)]
    return write_set(out_dir, "majority", settings, make_groups)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write the synthetic majority-colour preference set.")
    ap.add_argument("out_dir")
    ap.add_argument("--groups", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=112)
    a = ap.parse_args()
    print(write_majority(a.out_dir, a.groups, a.seed, a.image_size))
    sys.exit(0)
