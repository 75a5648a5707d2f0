"""LLaMA-Factory's dataset registry (`dataset_info.json`) as a data source.

`data.path` names the registry (the file, or the folder holding `dataset_info.json`, as LLaMA-Factory's
`data/`) and `data.dataset` one of its entries. The entry's file is read with its `columns` mapping and message `tags`
applied, so a preference set registered for LLaMA-Factory loads as it is, custom column names included:

    python -m mmrlhf_lite.train recipes/qwen2_vl_2b-t4-16gb.yaml data.path=LLaMA-Factory/data data.dataset=my_dpo

Preference entries (`"ranking": true`) in `sharegpt` formatting (messages + chosen/rejected messages, read
as format `llamafactory`) and `alpaca` formatting (prompt/query/history + chosen/rejected strings, read as
format `trl`) are supported. Relative media paths resolve against the registry's folder, as LLaMA-Factory's
`media_dir` does by default. Entries on a hub (`hf_hub_url`, `ms_hub_url`, `om_hub_url`) or behind a script
are refused with what to do instead.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import DataError

REGISTRY = "dataset_info.json"
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")

SHAREGPT_COLUMNS = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images",
                    "videos": "videos", "system": "system"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
                  "images": "images", "videos": "videos", "system": "system", "history": "history"}


@dataclass
class Entry:
    """What `load_groups` reads for one registry entry."""
    name: str
    path: Path                                  # the entry's data file (or folder)
    fmt: str                                    # the parser its rows are given to
    media_root: Path                            # default root of relative media paths
    transform: Callable[[dict, str], dict]      # (registry row, its file:line) -> a row of `fmt`


def registry_file(path: str | Path) -> Path | None:
    """The registry `path` names: a JSON file (usually `dataset_info.json`), or `dataset_info.json` in the
    folder; else None."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".json":
        return p
    if p.is_dir() and (p / REGISTRY).is_file():
        return p / REGISTRY
    return None


def looks_like_registry(path: str | Path) -> bool:
    """A JSON file holding one object of named entries with a `file_name` or a hub address each (so
    `load_groups` explains it instead of failing to detect a row format)."""
    p = Path(path)
    if not (p.is_file() and p.suffix.lower() == ".json") or p.stat().st_size > 16 * 1024 * 1024:
        return False
    with open(p, "rb") as fh:
        if fh.read(4096).lstrip()[:1] != b"{":
            return False
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(info, dict) and bool(info) and all(
        isinstance(e, dict) and any(k in e for k in ("file_name",) + HUB_KEYS) for e in info.values())


def resolve(path: str | Path, dataset: str | None) -> Entry:
    reg = registry_file(path)
    if reg is None:
        raise DataError(str(path), f"data.dataset is '{dataset}' but there is no {REGISTRY} at {path} (data.path "
                        "names LLaMA-Factory's registry file or the folder holding it)", reason="bad_source",
                        key="data.dataset")
    try:
        info = json.loads(reg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{reg}:{exc.lineno}", f"malformed JSON: {exc.msg} (column {exc.colno})",
                        reason="malformed_json") from None
    if not isinstance(info, dict):
        raise DataError(str(reg), f"{REGISTRY} must be an object of named entries", reason="bad_source")
    preference = sorted(n for n, e in info.items() if isinstance(e, dict) and e.get("ranking"))
    listing = f"its preference entries (\"ranking\": true): {', '.join(preference) or 'none'}"
    if not dataset:
        raise DataError(str(reg), f"this is LLaMA-Factory's dataset registry, not data rows: choose an entry with "
                        f"data.dataset=NAME (`--dataset NAME` for python -m mmrlhf_lite.data); {listing}",
                        reason="bad_source", key="data.dataset")
    entry = info.get(dataset)
    if not isinstance(entry, dict):
        close = difflib.get_close_matches(dataset, list(info), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(str(reg), f"no entry '{dataset}'{hint}; {listing}", reason="bad_source", key="data.dataset")
    where = f"{reg}: entry '{dataset}'"
    if not entry.get("ranking"):
        raise DataError(where, "is not a preference set (it has no \"ranking\": true, so its rows are SFT "
                        f"examples); {listing}", reason="bad_source", key="data.dataset")
    if "file_name" not in entry:
        hub = next((f"{k} {entry[k]}" for k in HUB_KEYS if entry.get(k)), "no file_name")
        raise DataError(where, f"is not a local file ({hub}); download it and set data.path to its files, or add "
                        "a \"file_name\" to the entry", reason="bad_source", key="data.dataset")
    formatting = entry.get("formatting", "alpaca")
    columns = entry.get("columns") or {}
    if formatting == "sharegpt":
        fmt, transform = "llamafactory", _sharegpt({**SHAREGPT_COLUMNS, **columns},
                                                   {**SHAREGPT_TAGS, **(entry.get("tags") or {})})
    elif formatting == "alpaca":
        fmt, transform = "trl", _alpaca({**ALPACA_COLUMNS, **columns})
    else:
        raise DataError(where, f"formatting '{formatting}' is not supported (sharegpt or alpaca)", reason="bad_source",
                        key="data.dataset")
    file = reg.parent / entry["file_name"]
    if not file.exists():
        raise DataError(where, f"its file_name {entry['file_name']} does not exist ({file})", reason="bad_source",
                        key="data.dataset")
    return Entry(name=dataset, path=file, fmt=fmt, media_root=reg.parent, transform=transform)


def _rest(row: dict, columns: dict) -> dict:
    """The row's other fields (ids, metadata), kept under their own names."""
    mapped = set(columns.values())
    return {k: v for k, v in row.items() if k not in mapped}


def _sharegpt(columns: dict, tags: dict) -> Callable[[dict, str], dict]:
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}

    def message(m):
        if isinstance(m, dict) and tags["role_tag"] in m:
            role = m[tags["role_tag"]]
            return {"role": roles.get(role, role), "content": m.get(tags["content_tag"])}
        return m  # left for the parser to report

    def transform(row: dict, source: str) -> dict:
        out = _rest(row, columns)
        msgs = row.get(columns["messages"])
        out["conversations"] = [message(m) for m in msgs] if isinstance(msgs, list) else msgs
        for key in ("chosen", "rejected"):
            out[key] = message(row.get(columns[key]))
        for key in ("images", "videos", "system"):
            if row.get(columns[key]) is not None:
                out[key] = row[columns[key]]
        return out

    return transform


def _alpaca(columns: dict) -> Callable[[dict, str], dict]:
    def transform(row: dict, source: str) -> dict:
        out = _rest(row, columns)
        text = row.get(columns["prompt"])
        if not isinstance(text, str):
            raise DataError(source, f"missing field '{columns['prompt']}' (the entry's prompt column)",
                            reason="missing_field", key=columns["prompt"])
        query = row.get(columns["query"])
        if isinstance(text, str) and isinstance(query, str) and query:
            text = f"{text}\n{query}"
        turns = [{"role": "system", "content": row[columns["system"]]}] if row.get(columns["system"]) else []
        for pair in row.get(columns["history"]) or []:
            if isinstance(pair, (list, tuple)) and len(pair) == 2:
                turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        out["prompt"] = turns + [{"role": "user", "content": text}] if turns else text
        out["chosen"], out["rejected"] = row.get(columns["chosen"]), row.get(columns["rejected"])
        images = row.get(columns["images"])
        if images is not None:
            out["images"] = images if isinstance(images, list) else [images]
        return out

    return transform
