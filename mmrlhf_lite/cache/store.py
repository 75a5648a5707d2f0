"""Append-only JSONL stores keyed by content hashes.

DESIGN.md, "Caches are keyed by content": an entry's key hashes what produced it (model + adapter
fingerprint, prompt template, response text, media bytes, settings). Change any of them and only the
affected entries are recomputed. Entries are appended one line at a time and flushed as they are
produced, so a killed precompute loses at most the line being written (a torn last line is ignored
on reload) and resumes where it stopped. No pickle anywhere.

    python -m pytest tests/test_cache.py -q
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..data.groups import PreferenceGroup
from ..data.media import media_digest


def content_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of `parts`."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


_digest_memo: dict[tuple, str] = {}


def _digest(media) -> str:
    if isinstance(media, bytes):
        return media_digest(media)
    try:
        st = os.stat(media)
        memo_key = (media, st.st_mtime_ns, st.st_size)
    except OSError:
        return media_digest(media)  # raises the clear "image not found"
    if memo_key not in _digest_memo:
        _digest_memo[memo_key] = media_digest(media)
    return _digest_memo[memo_key]


def group_content(group: PreferenceGroup) -> dict:
    """What a group's prompt side contributes to a key: turns and media bytes (not file names)."""
    return {"prompt": group.prompt, "images": [_digest(m) for m in group.images],
            "video": [_digest(m) for m in group.video] if group.video is not None else None}


_HASHED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")  # configs, tokenizers, chat templates


def directory_fingerprint(path: str | os.PathLike, *, hash_files: Iterable[str] = ()) -> str:
    """Identity of a model or adapter folder: contents of its small config/tokenizer/template files, names
    and sizes of the large ones (weights, a large tokenizer.json), and full hashes of the files in
    `hash_files` such as adapter weights."""
    p = Path(path)
    parts: list = []
    if not p.exists():
        return content_key("missing", str(path))
    for f in sorted(p.iterdir()):
        if f.is_dir():
            continue
        small = f.stat().st_size < 1 << 20
        if f.name in hash_files or f.suffix in _HASHED_SUFFIXES and small:
            parts.append((f.name, hashlib.sha256(f.read_bytes()).hexdigest()))
        elif f.suffix in _HASHED_SUFFIXES or f.suffix in (".safetensors", ".bin", ".gguf"):
            parts.append((f.name, f.stat().st_size))
    return content_key(parts)


def model_fingerprint(path: str) -> str:
    """Identity of a base model: its folder's fingerprint; for a hub id, the snapshot's commit and its
    JSON files (fetched alone, or found in the local Hugging Face cache when offline), so a new revision
    pushed under the same id gets new cache keys."""
    from ..models.loading import ModelLoadError, resolve_model_path

    local = resolve_model_path(path)
    if Path(local).exists():
        return directory_fingerprint(local)
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(str(path), allow_patterns=["*.json"]))
    except Exception as exc:  # noqa: BLE001 - offline and not cached, unknown repo, no network...
        raise ModelLoadError(f"model.path '{path}' is not a local folder, and its hub revision could not be "
                             f"resolved ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                             ) from None
    return content_key("hub", str(path), snap.name, directory_fingerprint(snap))


class JsonlStore:
    """key -> record, persisted as one JSON object per line (`{"key": ..., ...}`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self.torn_lines = 0
        if self.path.exists():
            with open(self.path, "rb") as fh:
                data = fh.read()
            for line in data.splitlines():
                try:
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.torn_lines += 1
            if data and not data.endswith(b"\n"):
                # a kill mid-write left a torn last line: cut it so new lines start cleanly
                keep = data[: data.rfind(b"\n") + 1]
                with open(self.path, "wb") as fh:
                    fh.write(keep)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put_many(self, records: list[dict]) -> None:
        """Append records (each with a `key`) in one write + flush + fsync."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        import fcntl  # several ranks append to one shared cache: one writer at a time (sidecar lock file)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        for r in records:
            self.records[r["key"]] = r


def fill_missing(groups: Sequence[PreferenceGroup], keys: list[list[str]], store: JsonlStore,
                 compute: Callable[[list[PreferenceGroup]], list[list[dict]]], *, per_batch: int, events,
                 stop_requested: Callable[[], bool] = lambda: False) -> int:
    """Compute only the missing entries, `per_batch` groups at a time, and append them as they come.

    `compute(subgroups)` gets each group cut down to its missing responses (`PreferenceGroup.subset`) and
    returns one payload dict per response; it is never called when nothing is missing (so a caller can
    load its model lazily inside it). A stop request between batches raises StageStopped: everything
    written so far stays. Returns the number of entries computed.
    """
    from ..events import StageStopped

    todo = [gi for gi, ks in enumerate(keys) if any(k not in store for k in ks)]
    total, done, computed = len(groups), len(groups) - len(todo), 0
    events.progress(done, total, unit="group")
    for s in range(0, len(todo), per_batch):
        if stop_requested():
            raise StageStopped(f"stopped after {done} of {total} groups; the cache keeps them")
        idx = todo[s:s + per_batch]
        missing = [[ri for ri, k in enumerate(keys[gi]) if k not in store] for gi in idx]
        results = compute([groups[gi].subset(m) for gi, m in zip(idx, missing)])
        records = [{"key": keys[gi][ri], "group_id": groups[gi].id, "response": ri, **payload}
                   for gi, m, res in zip(idx, missing, results) for ri, payload in zip(m, res)]
        store.put_many(records)
        computed += len(records)
        done += len(idx)
        events.progress(done, total, unit="group")
    return computed
