"""Groups -> rows of any supported format (`.jsonl`, `.json` array, or `.parquet`): the export tool.

    python -m mmrlhf_lite.data export runs/demo/data/demo/demo.jsonl /tmp/demo_trl.jsonl --to trl

Each format gets the rows its own tools expect, plus `id` and `category` columns (our reader honours
them; TRL, ms-swift and LLaMA-Factory ignore extra columns). What a format cannot hold is left out,
not faked: pair formats have no scores, only `mmrlhf` has critiques and tie rows (`is_tie`), and
`trl`, `rlaifv`, `rlhfv`, `vlfeedback` have no video. Reading an export back gives the same groups up
to what the format carries (tests/test_data_roundtrip.py). Media paths are written relative to the
output file's folder (or `media_root`) when they are inside it, else absolute; inline image bytes
can only go to Parquet (as `{"bytes", "path"}`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

from .errors import DataError
from .groups import PreferenceGroup

SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}


class _Media:
    """Writes a media item: a relative/absolute path, or `{"bytes", "path"}` (Parquet only)."""

    def __init__(self, base: str, parquet: bool):
        self.base, self.parquet = os.path.abspath(base), parquet

    def __call__(self, m: str | bytes, group: PreferenceGroup) -> Any:
        if isinstance(m, bytes):
            if not self.parquet:
                raise DataError(group.source, f"group '{group.id}' has inline image bytes; write it to .parquet "
                                "(JSON cannot hold bytes)", reason="unsupported")
            return {"bytes": m, "path": None}
        path = os.path.abspath(m)
        if os.path.commonpath([path, self.base]) == self.base:
            return os.path.relpath(path, self.base)
        return path


def _need(cond: bool, group: PreferenceGroup, fmt: str, what: str) -> None:
    if not cond:
        raise DataError(group.source, f"group '{group.id}' cannot be written as {fmt}: {what}", reason="unsupported")


def turn_text(turn: dict, tags: bool = True) -> str:
    """Typed content -> a string with `<image>` / `<video>` tags where the parts were.

    With `tags=False` media parts that lead the turn are left out (the reader puts them back in
    front); media after text always get their tags.
    """
    out, leading = [], True
    for p in turn["content"]:
        if p["type"] == "text":
            leading = leading and not p.get("text")
            out.append(p.get("text") or "")
        elif tags or not leading:
            out.append(f"<{p['type']}>")
    return "".join(out)


def _single_turn(group: PreferenceGroup, fmt: str, tags: bool = False) -> str:
    _need(len(group.prompt) == 1 and group.prompt[0]["role"] == "user", group, fmt,
          f"the format holds one user prompt, the group has {len(group.prompt)} turn(s)")
    return turn_text(group.prompt[0], tags)


def _image_field(group: PreferenceGroup, media: _Media) -> Any:
    images = [media(m, group) for m in group.images]
    return images[0] if len(images) == 1 else (images or None)


def _pairs(group: PreferenceGroup, ties: bool):
    """(better, worse, is_tie) for every pair, and every tie when the format can mark ties."""
    for b, w in group.pairs():
        yield b, w, False
    if ties:
        for a, b in group.ties():
            yield a, b, True


def _extras(group: PreferenceGroup) -> dict:
    return {"id": group.id, "category": group.category}


def _no_video(group: PreferenceGroup, fmt: str) -> None:
    _need(group.video is None, group, fmt, "the format has no video field")


# ------------------------------------------------------------------------------------------ formats

def rows_ranked(group: PreferenceGroup, media: _Media) -> list[dict]:
    written = dataclasses.replace(group, images=[media(m, group) for m in group.images],
                                  video=None if group.video is None else [media(m, group) for m in group.video])
    return [written.to_record()]


def rows_mmrlhf(group: PreferenceGroup, media: _Media) -> list[dict]:
    prompt = _single_turn(group, "mmrlhf")
    rows = []
    for b, w, tie in _pairs(group, ties=True):
        row: dict[str, Any] = {"id": group.id, "prompt": prompt, "chosen": group.responses[b].text,
                               "rejected": group.responses[w].text}
        if group.video is not None:
            row["video"] = [media(m, group) for m in group.video]
        if group.images:
            row["image"] = _image_field(group, media)
        row["chosen_reason"] = group.responses[b].critique or ""
        row["rejected_reason"] = group.responses[w].critique or ""
        if tie:
            row["is_tie"] = True
        row["category"] = group.category
        rows.append(row)
    return rows


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def rows_trl(group: PreferenceGroup, media: _Media) -> list[dict]:
    _no_video(group, "trl")
    images = [media(m, group) for m in group.images]
    return [{**_extras(group), "prompt": group.prompt, "chosen": _assistant(group.responses[b].text),
             "rejected": _assistant(group.responses[w].text), "images": images}
            for b, w, _ in _pairs(group, ties=False)]


def rows_swift(group: PreferenceGroup, media: _Media) -> list[dict]:
    turns = [{"role": t["role"], "content": turn_text(t)} for t in group.prompt]
    rows = []
    for b, w, _ in _pairs(group, ties=False):
        row = {**_extras(group), "messages": turns + [{"role": "assistant", "content": group.responses[b].text}],
               "rejected_response": group.responses[w].text}
        if group.images:
            row["images"] = [media(m, group) for m in group.images]
        if group.video is not None:
            row["videos"] = [[media(m, group) for m in group.video]]
        rows.append(row)
    return rows


def rows_llamafactory(group: PreferenceGroup, media: _Media) -> list[dict]:
    system = [turn_text(t) for t in group.prompt if t["role"] == "system"]
    conv = [{"from": SHAREGPT_ROLES[t["role"]], "value": turn_text(t)} for t in group.prompt if t["role"] != "system"]
    _need(len(system) <= 1 and (not system or group.prompt[0]["role"] == "system"), group, "llamafactory",
          "only one leading system turn fits the `system` column")
    rows = []
    for b, w, _ in _pairs(group, ties=False):
        row: dict[str, Any] = {**_extras(group), "conversations": conv,
                               "chosen": {"from": "gpt", "value": group.responses[b].text},
                               "rejected": {"from": "gpt", "value": group.responses[w].text}}
        if system:
            row["system"] = system[0]
        if group.images:
            row["images"] = [media(m, group) for m in group.images]
        if group.video is not None:
            row["videos"] = [[media(m, group) for m in group.video]]
        rows.append(row)
    return rows


def rows_rlaifv(group: PreferenceGroup, media: _Media) -> list[dict]:
    _no_video(group, "rlaifv")
    _need(len(group.images) <= 1, group, "rlaifv", "RLAIF-V rows hold one image")
    question = _single_turn(group, "rlaifv")
    return [{**_extras(group), "question": question, "chosen": group.responses[b].text,
             "rejected": group.responses[w].text, "image": _image_field(group, media)}
            for b, w, _ in _pairs(group, ties=False)]


def rows_rlhfv(group: PreferenceGroup, media: _Media) -> list[dict]:
    _no_video(group, "rlhfv")
    _need(len(group.images) <= 1, group, "rlhfv", "RLHF-V rows hold one image")
    question = _single_turn(group, "rlhfv")
    return [{**_extras(group), "image": _image_field(group, media),
             "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": group.responses[b].text}],
             "rejected": group.responses[w].text}
            for b, w, _ in _pairs(group, ties=False)]


def rows_vlfeedback(group: PreferenceGroup, media: _Media) -> list[dict]:
    _no_video(group, "vlfeedback")
    _need(len(group.images) <= 1, group, "vlfeedback", "VLFeedback rows hold one image")
    _need(group.explicit_pairs is None, group, "vlfeedback", "its pairs are not a ranking (ratings need one)")
    ranks = group.ranks()
    completions = []
    for i, r in enumerate(group.responses):
        rating = r.score if r.score is not None else float(max(ranks) + 1 - ranks[i])
        completions.append({"model": f"response-{i + 1}", "response": r.text,
                            "annotations": {"Helpfulness": {"Rating": repr(float(rating)),
                                                            "Rationale": r.critique or ""}}})
    row = {**_extras(group), "prompt": _single_turn(group, "vlfeedback"), "completions": completions}
    if group.images:
        row["img_path"] = _image_field(group, media)
    return [row]


WRITERS: dict[str, Callable[[PreferenceGroup, _Media], list[dict]]] = {
    "ranked": rows_ranked, "mmrlhf": rows_mmrlhf, "mmrlhf_bench": rows_mmrlhf, "trl": rows_trl,
    "swift": rows_swift, "llamafactory": rows_llamafactory, "rlaifv": rows_rlaifv, "rlhfv": rows_rlhfv,
    "vlfeedback": rows_vlfeedback,
}


def group_rows(groups: list[PreferenceGroup], fmt: str, base: str, parquet: bool = False) -> list[dict]:
    if fmt not in WRITERS:
        raise DataError("", f"cannot write format '{fmt}'; choose one of {', '.join(WRITERS)}", reason="bad_value")
    media = _Media(base, parquet)
    return [row for g in groups for row in WRITERS[fmt](g, media)]


def write_groups(groups: list[PreferenceGroup], path: str | os.PathLike, fmt: str = "ranked",
                 media_root: str | os.PathLike | None = None) -> Path:
    """Write `groups` as `fmt` to `path` (.jsonl, .json or .parquet); returns the path."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(str(out), "write to a .jsonl, .json or .parquet file", reason="bad_value")
    rows = group_rows(groups, fmt, str(media_root or out.parent), parquet=suffix == ".parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if suffix == ".parquet":
        import datasets

        keys = list(dict.fromkeys(k for row in rows for k in row))  # `from_list` only sees the first row's keys
        datasets.Dataset.from_list([{k: row.get(k) for k in keys} for row in rows]).to_parquet(str(tmp))
    else:
        with open(tmp, "w", encoding="utf-8") as fh:
            if suffix == ".json":
                json.dump(rows, fh, ensure_ascii=False, indent=2)
            else:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out
