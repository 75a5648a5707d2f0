"""Preference data: readers for each format, validation, pair expansion, media, the demo set.

Data preparation (`prepare_data`, run once per process before the first stage that needs groups, by rank 0
first under a launcher) reads `data.path` (and `data.eval_path`, media under `data.media_root`), validates
every row (bad rows stop the run naming file:line, or are skipped with `data.on_error: skip`) and splits
train / eval by group. In the run folder it writes `data/demo/` (the synthetic set's JSONL and images) for
`data.path: demo`, and `events.jsonl` lines for the counts, skipped rows and warnings (stage `data`); the
stages then read the groups from the source files, never a copy.

    python -m mmrlhf_lite.train recipes/demo.yaml --dry-run      # prepares (and plans) without a model
    python -m mmrlhf_lite.data stats runs/demo/data/demo/demo.jsonl
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

from .groups import PreferenceGroup, Response, text_to_turn  # noqa: F401 - public API


def split_groups(groups: list[PreferenceGroup], eval_fraction: float, seed: int = 0
                 ) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """Deterministic train/eval split by group: a group (hence its prompt) lands in one split only.

    The split hashes (seed, group id), so it does not depend on file order and adding groups does not
    move existing ones across splits.
    """
    if eval_fraction <= 0:
        return list(groups), []
    train, evals = [], []
    for g in groups:
        h = int(hashlib.sha256(f"{seed}:{g.id}".encode()).hexdigest()[:12], 16) / 16 ** 12
        (evals if h < eval_fraction else train).append(g)
    return train, evals


def flip_pairs(groups, fraction: float, seed: int):
    """Label noise for robustness experiments: each ranked pair of each group is flipped with probability
    `fraction` (deterministic from `seed` and the group id); the groups then carry explicit pairs (and
    their ties). Returns (new groups, number of flipped pairs)."""
    import dataclasses
    import random

    out, flipped = [], 0
    for g in groups:
        rng = random.Random(f"{seed}:{g.id}")
        pairs = []
        for b, w in g.pairs():
            if rng.random() < fraction:
                pairs.append((w, b))
                flipped += 1
            else:
                pairs.append((b, w))
        out.append(dataclasses.replace(g, explicit_pairs=pairs, explicit_ties=g.ties()))
    return out, flipped


class PreparedData(NamedTuple):
    """A recipe's data: human-ranked groups split into training and held-out ones, and the groups without a
    ranking (prompts for online rounds, `rounds.n > 0`), split the same way."""
    train: list[PreferenceGroup]
    evals: list[PreferenceGroup]
    train_prompts: list[PreferenceGroup]
    eval_prompts: list[PreferenceGroup]


def prepare_data(recipe, run_dir: str | Path, events, dry_run: bool = False):
    """Load, validate and split the recipe's data -> (train_groups, eval_groups), the human-ranked groups
    every offline stage reads (`load_data` also gives the prompts for online rounds)."""
    data = load_data(recipe, run_dir, events, dry_run)
    return data.train, data.evals


def load_data(recipe, run_dir: str | Path, events, dry_run: bool = False) -> PreparedData:
    """Load, validate and split the recipe's data.

    `data.path: demo` writes the synthetic set into `<run dir>/data/demo` first (in dry runs too, since
    the plan counts its tokens). With online rounds asked for (`rounds.n > 0`), rows without ranked responses
    are prompts (`readers.load_groups(prompts=True)`); they are split by the same hash as the ranked groups
    (or come from `data.eval_path`), and never reach the offline stages.
    """
    from .demo import write_demo
    from .media import set_max_image_pixels
    from .readers import load_groups

    cfg = recipe.data
    rounds = getattr(getattr(recipe, "rounds", None), "n", 0) > 0
    set_max_image_pixels(cfg.max_image_pixels)  # also guards the decoding in the stages' collators
    path = cfg.path
    if path == "demo":
        d = cfg.demo
        path = str(write_demo(Path(run_dir) / "data" / "demo", d.groups, d.seed, d.image_size, d.safety_fraction))
    result = load_groups(path, fmt=cfg.format, media_root=cfg.media_root, on_error=cfg.on_error,
                         max_frames=cfg.max_frames, events=events, dataset=cfg.dataset, prompts=rounds)
    groups = result.groups
    if cfg.max_groups:
        groups = groups[: cfg.max_groups]
    if cfg.eval_path:
        evals = load_groups(cfg.eval_path, fmt=cfg.format, media_root=cfg.media_root, on_error=cfg.on_error,
                            max_frames=cfg.max_frames, events=events, prompts=rounds).groups
        train = groups
    else:
        train, evals = split_groups(groups, cfg.eval_fraction, cfg.split_seed)
    train_prompts = [g for g in train if not g.is_ranked()]
    eval_prompts = [g for g in evals if not g.is_ranked()]
    train = [g for g in train if g.is_ranked()]
    evals = [g for g in evals if g.is_ranked()]
    if cfg.label_noise:
        train, flipped = flip_pairs(train, cfg.label_noise, cfg.split_seed)
        events.warning(f"data.label_noise={cfg.label_noise}: {flipped} ranked training pairs flipped on purpose "
                       "(held-out groups keep their labels)", stage="data")
    fmts = ", ".join(sorted(set(result.formats.values())))
    skipped = f"; {sum(result.skipped.values())} rows skipped" if result.skipped else ""
    prompts = (f", {len(train_prompts)} train and {len(eval_prompts)} eval prompts without ranked responses (for "
               "online rounds)" if train_prompts or eval_prompts else "")
    events.info(f"data: {len(train)} train groups, {len(evals)} eval groups{prompts} from {path} ({fmts}{skipped})",
                stage="data")
    return PreparedData(train, evals, train_prompts, eval_prompts)
