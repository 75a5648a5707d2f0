"""Append-only JSONL stores keyed by content hashes.

DESIGN.md, "Caches are keyed by content": an entry's key hashes what produced it (model + adapter
fingerprint, prompt template, response text, media bytes, settings). Change any of them and only the
affected entries are recomputed. Entries are appended one line at a time and flushed as they are
produced, so a killed precompute loses at most the line being written (a torn last line is cut on
reload) and resumes where it stopped. Several processes may append to one store (see `JsonlStore`).
No pickle anywhere.

    python -m pytest tests/test_cache.py -q
"""
from __future__ import annotations

import contextlib
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


# peft writes these adapter_config.json lists from a set: their order changes from process to process
_SET_VALUED_KEYS = ("target_modules", "modules_to_save")


def _canonical_bytes(f: Path) -> bytes:
    """A file's bytes for its fingerprint; a JSON object re-serialised with sorted keys and its set-valued
    lists sorted, so two saves of the same adapter in two processes have one fingerprint (peft's
    `target_modules` order follows Python's per-process string hashing)."""
    data = f.read_bytes()
    if f.suffix != ".json":
        return data
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return data
    if not isinstance(obj, dict):
        return data
    for key in _SET_VALUED_KEYS:
        if isinstance(obj.get(key), list) and all(isinstance(x, str) for x in obj[key]):
            obj[key] = sorted(obj[key])
    return json.dumps(obj, sort_keys=True).encode()


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
            parts.append((f.name, hashlib.sha256(_canonical_bytes(f)).hexdigest()))
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
    """key -> record, persisted as one JSON object per line (`{"key": ..., ...}`).

    Safe for several processes appending to one file (two runs sharing `cache.dir`, the ranks of one
    run): every append takes an exclusive `flock` on the sidecar `<file>.lock`, first cuts a torn tail a
    killed writer left (so the new lines start cleanly), reads the lines other writers appended since
    this store last looked, and writes only records whose key is not there yet, as one `write` of whole
    lines. `fields` (name -> type or tuple of types) is the shape a record must have: a line that is not
    JSON, not an object, or lacks a field is dropped, so its entry is recomputed; the file is repaired
    under the lock (a torn tail by `os.truncate`, lines in the middle by write-and-rename, so a kill
    during the repair loses nothing), and `problems` lists each dropped line once: the next load of the
    repaired file finds none.
    """

    def __init__(self, path: str | os.PathLike, fields: dict[str, type | tuple[type, ...]] | None = None):
        self.path = Path(path)
        self.fields = dict(fields or {})
        self.records: dict[str, dict] = {}
        self.problems: list[str] = []   # "line N: why", one per dropped line
        self._offset = 0                # bytes of the file read so far (whole lines only)
        self._inode: int | None = None
        self._lines = 1                 # number of the next line to read
        self.repair_error: str | None = None  # why the file could not be repaired (read-only, full disk)
        if not self.path.exists():
            return
        data = self._read_from(0)
        bad = self._parse(data, first_line=1, collect=True)
        if bad or (data and not data.endswith(b"\n")):
            try:
                with self._locked():
                    self._repair()
            except OSError as exc:  # a read-only or full cache folder: the bad lines are still left out
                self.repair_error = f"{exc.strerror or exc}"

    @property
    def torn_lines(self) -> int:
        """Lines dropped at load (torn, not JSON, or of the wrong shape)."""
        return len(self.problems)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def warning(self, what: str) -> str | None:
        """One message naming the file and each dropped line, or None when every line was good."""
        if not self.problems:
            return None
        shown = "; ".join(self.problems[:5]) + (f"; ... and {len(self.problems) - 5} more"
                                                  if len(self.problems) > 5 else "")
        fixed = ("they were removed from the file" if self.repair_error is None else
                 f"the file could not be repaired ({self.repair_error}), so this is said again next time")
        return (f"{what} {self.path}: dropped {len(self.problems)} damaged line(s) ({shown}); {fixed}, and their "
                "entries are recomputed")

    # ------------------------------------------------------------------------------------ reading
    def _read_from(self, offset: int) -> bytes:
        try:
            with open(self.path, "rb") as fh:
                self._inode = os.fstat(fh.fileno()).st_ino
                fh.seek(offset)
                return fh.read()
        except FileNotFoundError:
            self._inode = None
            return b""

    def _check(self, line: bytes) -> tuple[dict | None, str]:
        try:
            rec = json.loads(line)
        except UnicodeDecodeError as exc:
            return None, f"not UTF-8 (byte {exc.start})"
        except json.JSONDecodeError as exc:
            return None, f"not JSON ({exc.msg}, column {exc.colno})"
        except RecursionError:
            return None, "nested too deeply"
        if not isinstance(rec, dict):
            return None, f"a JSON {type(rec).__name__}, not an object"
        if not isinstance(rec.get("key"), str):
            return None, "no string field 'key'"
        for name, kind in self.fields.items():
            kinds = kind if isinstance(kind, tuple) else (kind,)
            value = rec.get(name)
            if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:  # True is an int
                return None, f"field '{name}' missing or not {_type_names(kinds)}"
        return rec, ""

    def _parse(self, data: bytes, first_line: int, collect: bool) -> int:
        """Add the whole lines of `data` to `records`; returns how many were bad (noted when `collect`)."""
        end = data.rfind(b"\n") + 1
        bad = 0
        for n, line in enumerate(data[:end].split(b"\n")[:-1], first_line):
            if not line.strip():
                continue
            rec, why = self._check(line)
            if rec is None:
                bad += 1
                if collect:
                    self.problems.append(f"line {n}: {why}")
            else:
                self.records[rec["key"]] = rec
        self._offset += end
        self._lines = first_line + data[:end].count(b"\n")
        return bad

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _repair(self) -> None:
        """Under the lock: re-read the file (another process may have repaired or extended it); drop the
        lines that do not validate by write-and-rename (a kill leaves the old file whole), or cut a torn
        tail in place with `os.truncate`."""
        data = self._read_from(0)
        end = data.rfind(b"\n") + 1
        lines, tail = data[:end].split(b"\n")[:-1], data[end:]
        good = [ln for ln in lines if ln.strip() and self._check(ln)[0] is not None]
        n_bad = sum(1 for ln in lines if ln.strip()) - len(good)
        tail_ok = bool(tail.strip()) and self._check(tail)[0] is not None
        if tail.strip() and not tail_ok:
            self.problems.append(f"line {len(lines) + 1}: torn (an interrupted write)")
        for stale in self.path.parent.glob(f".{self.path.name}.*.repair"):  # of a repair killed midway
            stale.unlink(missing_ok=True)
        if n_bad:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.repair")
            with open(tmp, "wb") as fh:
                fh.write(b"".join(ln + b"\n" for ln in good + ([tail] if tail_ok else [])))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        elif tail_ok:  # a complete last record without its newline (an edited file): keep it
            with open(self.path, "ab") as fh:
                fh.write(b"\n")
        elif tail:
            os.truncate(self.path, end)
        self.records, self._offset = {}, 0
        self._parse(self._read_from(0), first_line=1, collect=False)

    def refresh(self) -> None:
        """Read the lines other processes appended since this store last looked."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if st.st_ino != self._inode or st.st_size < self._offset:  # replaced by a repair: read it again
            self.records, self._offset = {}, 0
            self._parse(self._read_from(0), first_line=1, collect=False)
        elif st.st_size > self._offset:
            self._parse(self._read_from(self._offset), first_line=self._lines, collect=False)

    # ------------------------------------------------------------------------------------ API
    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put_many(self, records: list[dict]) -> None:
        """Append records (each with a `key`) in one write + flush + fsync, under the store's lock; records
        whose key another writer stored meanwhile are not written again."""
        if not records:
            return
        with self._locked():
            self._cut_torn_tail()
            self.refresh()
            new = {}
            for r in records:
                if r["key"] not in self.records:
                    new[r["key"]] = r
            if new:
                blob = b"".join(_line(r) for r in new.values())
                with open(self.path, "ab") as fh:
                    fh.write(blob)
                    fh.flush()
                    os.fsync(fh.fileno())
                    self._inode = os.fstat(fh.fileno()).st_ino
                self._offset += len(blob)
                self._lines += blob.count(b"\n")
            self.records.update(new)

    def _cut_torn_tail(self) -> None:
        """Under the lock no writer is mid-line: a last line without its newline is from a killed one."""
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size == 0:
                    return
                fh.seek(size - 1)
                if fh.read(1) == b"\n":
                    return
                back = min(size, 1 << 20)
                while True:
                    fh.seek(size - back)
                    chunk = fh.read(back)
                    i = chunk.rfind(b"\n")
                    if i >= 0 or back == size:
                        cut = size - back + i + 1 if i >= 0 else 0
                        break
                    back = min(size, back * 2)
        except FileNotFoundError:
            return
        os.truncate(self.path, cut)


def _type_names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def _line(record: dict) -> bytes:
    """One JSON line as UTF-8; text that UTF-8 cannot hold (a lone surrogate) is written escaped."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode("ascii")


def plan_missing(keys: list[list[str]], store: JsonlStore) -> list[list[int]]:
    """Per group: the responses it computes, the keys that are neither stored nor claimed by an earlier
    group (a key shared by several groups is computed once, by the first)."""
    claimed: set[str] = set()
    plan: list[list[int]] = []
    for ks in keys:
        mine = [ri for ri, k in enumerate(ks) if k not in store and k not in claimed]
        claimed.update(ks[ri] for ri in mine)
        plan.append(mine)
    return plan


def compute_batch(groups: Sequence[PreferenceGroup], keys: list[list[str]], plan: list[list[int]],
                  batch: Sequence[int], store: JsonlStore,
                  compute: Callable[[list[PreferenceGroup]], list[list[dict]]]) -> int:
    """Compute and append the entries of the groups `batch` (indices into `groups`) still missing from
    `store`; returns how many were computed."""
    idx = [gi for gi in batch if any(keys[gi][ri] not in store for ri in plan[gi])]
    missing = [[ri for ri in plan[gi] if keys[gi][ri] not in store] for gi in idx]
    if not idx:
        return 0
    results = compute([groups[gi].subset(m) for gi, m in zip(idx, missing)])
    records = [{"key": keys[gi][ri], "group_id": groups[gi].id, "response": ri, **payload}
               for gi, m, res in zip(idx, missing, results) for ri, payload in zip(m, res)]
    store.put_many(records)
    return len(records)


def fill_missing(groups: Sequence[PreferenceGroup], keys: list[list[str]], store: JsonlStore,
                 compute: Callable[[list[PreferenceGroup]], list[list[dict]]], *, per_batch: int, events,
                 stop_requested: Callable[[], bool] = lambda: False,
                 idle_forward: Callable[[], object] | None = None) -> int:
    """Compute only the missing entries, `per_batch` groups at a time, and append them as they come.

    `compute(subgroups)` gets each group cut down to its missing responses (`PreferenceGroup.subset`) and
    returns one payload dict per response; it is never called when nothing is missing (so a caller can
    load its model lazily inside it). A key is computed once however many groups share it (the same
    content under other ids, or in both splits): the first group that has it computes it, the others
    read the stored entry, and a group whose every key is stored or claimed is not computed at all.
    A stop request between batches raises StageStopped: everything written so far stays. Returns the
    number of entries computed.

    The batches run through `distributed.run_in_lockstep`: in one process a plain loop; on a rank of a launch
    (`cache.sharded.fill_missing_sharded` passes each rank its share) in lockstep with the other ranks,
    with their progress, stop and entry counts summed, and `idle_forward()` run in a round this rank has no
    batch for when the model is sharded.
    """
    from ..distributed import run_in_lockstep

    plan = plan_missing(keys, store)
    todo = [gi for gi, mine in enumerate(plan) if mine]
    per_batch = max(1, per_batch)
    batches = [todo[s:s + per_batch] for s in range(0, len(todo), per_batch)]
    result = run_in_lockstep(batches, lambda batch: compute_batch(groups, keys, plan, batch, store, compute),
                             done=len(groups) - len(todo), events=events, stop_requested=stop_requested,
                             idle_forward=idle_forward,
                             stopped=lambda done, total: f"stopped after {done} of {total} groups; the cache keeps them")
    return result.computed
