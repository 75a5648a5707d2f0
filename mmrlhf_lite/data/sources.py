"""Where rows come from: a file (JSONL, JSON, Parquet), a folder of them, or a `datasets` folder.

Yields raw rows (plain dicts) with their location, `"file:line"` (`"file:row N"` for Parquet / Arrow),
so every later error can name it. Format detection and parsing happen in `formats.py`.

- JSONL: small files are read line by line with `json`; files of `DATASETS_MIN_BYTES` or more go through
  `datasets` (`load_dataset("json")`), which converts them once to a memory-mapped Arrow cache under
  `$MMRLHF_LITE_CACHE/datasets` and streams them back in batches. A row index maps back to its line
  number (blank lines skipped). When `datasets` cannot read the file (a malformed line, a row that is
  not an object), the line reader takes over and reports the exact `file:line`.
- A `.jsonl` that holds one JSON array (LLaMA-Factory's shipped files do) and `.json` arrays are parsed
  whole; each element is located by the line it starts on.
- Parquet and `save_to_disk` folders load through `datasets`; image columns are read undecoded
  (`{"bytes", "path"}`) so images stay encoded bytes in memory.

Arrow fills absent keys with `None`, so readers treat `None` exactly like a missing key.

    python -m mmrlhf_lite.data stats path/to/pairs.jsonl
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import DataError

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
# files a data folder may hold that are not rows (dataset registries, demo settings)
NOT_ROWS = {"dataset_info.json", "dataset_dict.json", "state.json", "demo_settings.json"}
DATASETS_MIN_BYTES = 16 * 1024 * 1024
BATCH = 2048


@dataclass
class RawRow:
    """One row as read (`row`), or the reason it could not be read (`error`)."""
    source: str
    row: dict | None = None
    error: DataError | None = None


def cache_dir() -> str:
    root = os.environ.get("MMRLHF_LITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmrlhf_lite")
    return os.path.join(root, "datasets")


def list_sources(path: str | os.PathLike) -> list[str]:
    """The files (or `datasets` folders) under `path`, in a stable order."""
    p = Path(path)
    if not p.exists():
        raise DataError(str(path), "data path not found", reason="bad_source", path=str(path))
    if p.is_file():
        if p.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(str(path), f"unsupported file type '{p.suffix}'; expected one of "
                            f"{', '.join(DATA_SUFFIXES)} (or a folder)", reason="bad_source")
        return [str(path)]
    if _is_saved_dataset(p) or (p / "dataset_dict.json").exists():
        return [str(path)]
    files = sorted(str(f) for f in p.iterdir()
                   if f.is_file() and f.suffix.lower() in DATA_SUFFIXES and f.name not in NOT_ROWS
                   and not f.name.startswith("."))
    if not files:
        raise DataError(str(path), f"folder holds no data files ({', '.join(DATA_SUFFIXES)}) and is not a "
                        "`datasets` save_to_disk folder", reason="bad_source")
    return files


def iter_rows(source: str) -> Iterator[RawRow]:
    """Rows of one file or `datasets` folder from `list_sources`."""
    p = Path(source)
    if p.is_dir():
        yield from _iter_saved(p)
        return
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet(p)
        return
    first = _first_char(p)
    if first == "":
        return
    if first == "[":
        yield from _iter_json_array(p)
    elif suffix == ".json" and first == "{" and (single := _single_object(p)) is not None:
        yield single
    elif p.stat().st_size >= DATASETS_MIN_BYTES:
        yield from _iter_jsonl_datasets(p)
    else:
        yield from _iter_jsonl_lines(p)


# ---------------------------------------------------------------------------------------------- JSON

def _first_char(p: Path) -> str:
    with open(p, "rb") as fh:
        while chunk := fh.read(4096):
            s = chunk.lstrip()
            if s.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM
                s = s[3:].lstrip()
            if s:
                return chr(s[0])
    return ""


def _decode_error(source: str, exc: json.JSONDecodeError, line_offset: int = 0) -> DataError:
    return DataError(f"{source}:{exc.lineno + line_offset}", f"malformed JSON: {exc.msg} (column {exc.colno})",
                     reason="malformed_json")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(value, key: str = "") -> str | None:
    """The key path of the first string holding an unpaired surrogate (JSON `"\\ud800"` alone parses to
    one, which no tokenizer or UTF-8 writer accepts), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return key or "(value)"
    elif isinstance(value, dict):
        for k, v in value.items():
            name = str(k).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
            path = f"{key}.{name}" if key else name
            if _lone_surrogate(str(k)) is not None:
                return path
            if (found := _lone_surrogate(v, path)) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := _lone_surrogate(v, f"{key}[{i}]")) is not None:
                return found
    return None


def _surrogate_error(source: str, key: str) -> DataError:
    return DataError(source, f"key '{key}': text holds an unpaired UTF-16 surrogate escape (such as \\ud800 "
                     "without its pair), which is not a character; fix or remove the escape",
                     reason="bad_encoding", key=key)


def _as_row(source: str, value) -> RawRow:
    if isinstance(value, dict):
        if (key := _lone_surrogate(value)) is not None:
            return RawRow(source, error=_surrogate_error(source, key))
        return RawRow(source, value)
    return RawRow(source, error=DataError(source, f"expected a JSON object, got {type(value).__name__}",
                                          reason="not_an_object"))


def not_utf8(source: str, exc: UnicodeDecodeError, offset: int | None = None, skippable: bool = True) -> DataError:
    """`source` is `file:line`; `exc.start` the byte's position in that line (`offset`: in the file)."""
    where = f"byte {exc.start + 1} of the line" + (f", file offset {offset}" if offset is not None else "")
    skip = ", or set data.on_error=skip to leave such lines out" if skippable else ""
    return DataError(source, f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at {where}; re-encode the file "
                     f"as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`){skip}", reason="bad_encoding")


def _read_text(p: Path) -> str:
    """The whole file as text (BOM dropped); bytes that are not UTF-8 raise a DataError at their line."""
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        line = data[start:data.find(b"\n", exc.start) if b"\n" in data[exc.start:] else len(data)]
        line_no = data.count(b"\n", 0, exc.start) + 1
        raise not_utf8(f"{p}:{line_no}",
                       UnicodeDecodeError("utf-8", line, exc.start - start, exc.start - start + 1, exc.reason),
                       exc.start, skippable=False) from None


def _iter_jsonl_lines(p: Path) -> Iterator[RawRow]:
    prefix, loads = f"{p}:", json.loads
    offset = 0
    with open(p, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            line_start, offset = offset, offset + len(raw)
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM
                raw, line_start = raw[3:], 3
            if not raw.strip():
                continue
            source = prefix + str(n)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(source, error=not_utf8(source, exc, line_start + exc.start))
                continue
            try:
                # without its line break: an object cut short would otherwise be reported at column 1 of
                # the next line (the parser skips the newline before it finds the end)
                value = loads(line.rstrip("\r\n"))
            except RecursionError:
                yield RawRow(source, error=DataError(source, "malformed JSON: nested too deeply",
                                                     reason="malformed_json"))
                continue
            except json.JSONDecodeError as exc:
                yield RawRow(source, error=DataError(source, f"malformed JSON: {exc.msg} (column {exc.colno})",
                                                     reason="malformed_json"))
                continue
            if isinstance(value, dict) and not _SURROGATE_ESCAPE.search(line):
                yield RawRow(source, value)  # the common case: no \\udXXX escape, nothing to walk
            else:
                yield _as_row(source, value)


def _single_object(p: Path) -> RawRow | None:
    """A `.json` file holding one object is one row; None when it is JSON Lines after all."""
    text = _read_text(p)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            return None
        raise _decode_error(str(p), exc) from None
    return _as_row(f"{p}:1", value)


def _iter_json_array(p: Path) -> Iterator[RawRow]:
    """Elements of a top-level JSON array in one pass, each located by the line its value starts on.

    A syntax error makes the rest of the file unreadable, so it raises (even with on_error=skip).
    """
    text = _read_text(p)
    decoder, ws = json.JSONDecoder(), " \t\r\n"
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)

    def skip(i: int) -> int:
        nonlocal line
        while i < len(text) and text[i] in ws:
            line += text[i] == "\n"
            i += 1
        return i

    def fail(msg: str, i: int) -> DataError:
        return _decode_error(str(p), json.JSONDecodeError(msg, text, i))

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _decode_error(str(p), exc) from None
        yield _as_row(f"{p}:{line}", value)
        line += text.count("\n", pos, end)
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            if skip(pos + 1) < len(text):
                raise fail("Extra data", skip(pos + 1))
            return
        else:
            raise fail("Expecting ',' delimiter", pos)


# ------------------------------------------------------------------------------------------ datasets

@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(level)
        if not was_disabled:
            datasets.enable_progress_bars()


def _line_numbers(p: Path) -> list[int]:
    """1-based numbers of the non-blank lines (`datasets` skips blank ones)."""
    with open(p, "rb") as fh:
        return [n for n, line in enumerate(fh, 1) if line.strip()]


def _iter_jsonl_datasets(p: Path) -> Iterator[RawRow]:
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset("json", data_files=str(p), split="train", cache_dir=cache_dir())
        except Exception:  # noqa: BLE001 - any failure: the line reader names the bad line
            ds = None
    lines = _line_numbers(p) if ds is not None else []
    if ds is None or len(lines) != len(ds):
        yield from _iter_jsonl_lines(p)
        return
    prefix = f"{p}:"
    for i, row in enumerate(_dataset_rows(ds)):
        yield RawRow(prefix + str(lines[i]), row)


def _undecoded(feature):
    """The same features with every Image read as {"bytes", "path"} instead of a PIL image."""
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, datasets.List):
        return datasets.List(_undecoded(feature.feature), length=feature.length)
    if isinstance(feature, (dict, datasets.Features)):
        return {k: _undecoded(v) for k, v in feature.items()}
    return feature


def _dataset_rows(ds) -> Iterator[dict]:
    import datasets

    features = datasets.Features(_undecoded(ds.features))
    if features != ds.features:
        ds = ds.cast(features)
    for batch in ds.iter(batch_size=BATCH):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))


def _iter_parquet(p: Path) -> Iterator[RawRow]:
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.Dataset.from_parquet(str(p), cache_dir=cache_dir())
        except Exception as exc:  # noqa: BLE001 - reported with the file name, no library traceback
            raise DataError(str(p), f"cannot read Parquet file: {exc}", reason="bad_source") from None
    for i, row in enumerate(_dataset_rows(ds), 1):
        yield RawRow(f"{p}:row {i}", row)


def _is_saved_dataset(p: Path) -> bool:
    return (p / "state.json").exists() and (p / "dataset_info.json").exists()


def _iter_saved(p: Path) -> Iterator[RawRow]:
    if not _is_saved_dataset(p):
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        if len(splits) != 1:
            raise DataError(str(p), f"this `datasets` folder holds the splits {', '.join(splits)}; point data.path at "
                            f"one of them, e.g. {p / splits[0]}" if splits else "empty DatasetDict folder",
                            reason="bad_source")
        p = p / splits[0]
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as exc:  # noqa: BLE001
            raise DataError(str(p), f"cannot load `datasets` folder: {exc}", reason="bad_source") from None
    for i, row in enumerate(_dataset_rows(ds), 1):
        yield RawRow(f"{p}:row {i}", row)
