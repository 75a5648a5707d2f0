"""The Data tab: pick or upload a preference file, see its validation report, stats and groups.

Besides the files under the data root, each run's online rounds are listed as data files named
`run:<run>/rounds/<r>/groups.jsonl` (under the runs root): the round's prompts with the policy's sampled answers
ranked by the reward model, each with its score and critique, and the pairs MM-DPO trained on (native `ranked`
rows, written by the rounds stage). Only that file of a run is opened this way.

Everything is read through the data layer (`load_groups` with `on_error="skip"`, so one pass lists
every bad row with its file:line instead of stopping at the first). Files live under the data root;
an upload (any format the data layer reads, or a .zip of a data file with its images) is copied
into `<data root>/uploads/` so a run can use it after the browser's temp copy is gone. Images are
handed to gradio as decoded pictures, never as paths, and only from under the data or runs root.

    python app.py --data-dir data      # Data tab
"""
from __future__ import annotations

import io
import os
import re
import shutil
import stat
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..data.errors import REASONS, DataError
from ..data.groups import PreferenceGroup
from ..data.media import FRAME_SUFFIXES, MediaError, load_image
from ..data.sources import DATA_SUFFIXES, NOT_ROWS
from .safety import Refused, clean_filename, inside, is_inside

UPLOADS = "uploads"
MAX_LISTED = 2000
MAX_DEPTH = 5
ZIP_MAX_FILES = 200_000
ZIP_EXPAND = 20          # a zip may unpack to at most this many times the upload limit
DISPLAY_PIXELS = 640     # longest side of an image shown in the browser
RUN_DATA = "run:"        # a round's groups in a run folder: run:<run>/rounds/<r>/groups.jsonl (under the runs root)
ROUND_GROUPS = re.compile(r"[^/]+/rounds/\d+/groups\.jsonl")  # mmrlhf_lite.rounds.round.GROUPS_FILE per round

# reason -> what to do about it (the data layer's REASONS say what the reason means)
FIXES = {
    "bad_source": "check the file type (.jsonl, .json, .parquet, or a folder of them) and that it can be read",
    "bad_encoding": "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or skip such lines",
    "malformed_json": "fix the JSON on this line (a missing quote, comma or bracket), or delete the line",
    "not_an_object": "each line must be one JSON object {...}, not a list or a bare value",
    "unknown_format": "add the fields of a supported format (docs/data-formats.md) or choose the format explicitly",
    "missing_field": "add the named field with a value of the right type",
    "bad_value": "correct the value of the named field (see docs/data-formats.md for what it may hold)",
    "empty_response": "give the response some text, or remove it from the row",
    "chosen_equals_rejected": "a pair needs two different responses: fix or drop this row",
    "duplicate_id": "give each prompt its own id (or make rows with one id share the same prompt and media)",
    "duplicate_pair": "remove the repeated pair",
    "missing_image": "put the image at this path, relative to the media root (upload a .zip with the data file "
                     "and its images, or choose the media root)",
    "corrupt_image": "replace the image with a file that opens (PNG, JPEG, WebP, ...)",
    "image_too_large": "downscale the image, or raise data.max_image_pixels if it is genuine",
    "bad_video": "give a video as a folder of frame images or a list of frame paths",
    "media_mismatch": "make the number of <image> tags in the prompt equal the number of images",
    "unsupported": "split this row into rows the project can represent (see the message)",
    "too_few_responses": "a group needs at least two usable responses",
}


# --------------------------------------------------------------------------------------------------
# files under the data root

def list_data(data_root: str | os.PathLike) -> list[str]:
    """Data files (and folders holding several, shown with a trailing '/') under the root, relative."""
    root = Path(data_root)
    if not root.is_dir():
        return []
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        depth = len(d.relative_to(root).parts)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and depth < MAX_DEPTH)
        rel = d.relative_to(root).as_posix()
        files = sorted(f for f in filenames if Path(f).suffix.lower() in DATA_SUFFIXES and f not in NOT_ROWS
                       and not f.startswith("."))
        if "dataset_info.json" in filenames or "dataset_dict.json" in filenames:
            out.append(rel + "/")
            dirnames[:] = []
            continue
        if len(files) > 1 and rel != ".":
            out.append(rel + "/")
        out += [f if rel == "." else f"{rel}/{f}" for f in files]
        if len(out) >= MAX_LISTED:
            break
    return out[:MAX_LISTED]


def list_round_data(runs_root: str | os.PathLike | None) -> list[str]:
    """Every run's rounds' groups files (`run:<run>/rounds/<r>/groups.jsonl`), by run name, rounds in order."""
    root = Path(runs_root) if runs_root else None
    if root is None or not root.is_dir():
        return []
    out = []
    for run in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rounds = run / "rounds"
        if not rounds.is_dir():
            continue
        for r in sorted((d for d in rounds.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
            if (r / "groups.jsonl").is_file():
                out.append(f"{RUN_DATA}{run.name}/rounds/{r.name}/groups.jsonl")
    return out[:MAX_LISTED]


def is_round_data(name: str | None) -> bool:
    return bool(name) and name.startswith(RUN_DATA)


def resolve_data(data_root: str | os.PathLike, name: str, runs_root: str | os.PathLike | None = None) -> Path:
    """The file `name` names: under the data root, or a round's groups under the runs root (`run:...`)."""
    if is_round_data(name):
        rel = name[len(RUN_DATA):]
        if runs_root is None or not ROUND_GROUPS.fullmatch(rel):
            raise Refused(f"'{name}' is not a round's groups file of a run (run:<run>/rounds/<r>/groups.jsonl)")
        path = inside(runs_root, rel, what="data file")
        if not path.is_file():
            raise Refused(f"'{name}' not found: that run has no such round")
        return path
    path = inside(data_root, name, what="data file")
    if not path.exists():
        raise Refused(f"data file '{name}' not found under the data root")
    return path


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    stem, suffix = path.name.split(".", 1)[0], "." + path.name.split(".", 1)[1] if "." in path.name else ""
    for i in range(1, 10_000):
        cand = path.with_name(f"{stem}-{i}{suffix}")
        if not cand.exists():
            return cand
    raise Refused("too many uploads with this name")


def save_upload(temp_file: str, *, upload_dir: str | os.PathLike, data_root: str | os.PathLike,
                max_bytes: int) -> str:
    """Copy an upload from gradio's temp dir into `<data root>/uploads/`; returns the name to pick.

    The temp path must lie in the upload dir (gradio's own); its file name is reduced to a safe
    basename. A .zip is unpacked (data files and images only, no links, no paths outside its folder).
    """
    if not temp_file or not is_inside(upload_dir, temp_file):
        raise Refused("uploads are taken only from the app's upload folder")
    src = Path(temp_file).resolve()
    if not src.is_file():
        raise Refused("the upload did not arrive; try again")
    size = src.stat().st_size
    if size > max_bytes:
        raise Refused(f"upload is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB")
    name = clean_filename(src.name)
    suffix = Path(name).suffix.lower()
    dest_dir = Path(data_root) / UPLOADS
    dest_dir.mkdir(parents=True, exist_ok=True)
    if suffix == ".zip":
        return _unzip(src, dest_dir, Path(data_root), max_bytes * ZIP_EXPAND)
    if suffix not in DATA_SUFFIXES:
        raise Refused(f"'{name}' is not a data file: upload {', '.join(DATA_SUFFIXES)} or a .zip of a data "
                      "file with its images")
    dest = _unique(dest_dir / name)
    shutil.copyfile(src, dest)
    return dest.relative_to(Path(data_root)).as_posix()


def _unzip(src: Path, dest_dir: Path, data_root: Path, max_total: int) -> str:
    try:
        zf = zipfile.ZipFile(src)
    except zipfile.BadZipFile:
        raise Refused(f"'{src.name}' is not a readable .zip file") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > ZIP_MAX_FILES:
            raise Refused(f"the zip holds {len(members)} files; at most {ZIP_MAX_FILES} are accepted")
        if sum(m.file_size for m in members) > max_total:
            raise Refused(f"the zip unpacks to more than {max_total / 2**20:.0f} MB; refused")
        keep = []
        for m in members:
            if stat.S_ISLNK(m.external_attr >> 16):
                raise Refused(f"the zip holds a symbolic link ({m.filename}); refused")
            parts = m.filename.replace("\\", "/").split("/")
            if m.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise Refused(f"the zip holds a path outside its folder ({m.filename}); refused")
            if parts[-1].startswith(".") or "__MACOSX" in parts:
                continue
            if Path(m.filename).suffix.lower() in DATA_SUFFIXES + FRAME_SUFFIXES:
                keep.append(m)
        if not any(Path(m.filename).suffix.lower() in DATA_SUFFIXES for m in keep):
            raise Refused(f"the zip holds no data file ({', '.join(DATA_SUFFIXES)})")
        target = _unique(dest_dir / clean_filename(src.stem))
        target.mkdir(parents=True)
        for m in keep:
            out = inside(target, m.filename.replace("\\", "/"), what="zip member")
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as fin, open(out, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    found = [n for n in list_data(data_root) if n.startswith(target.relative_to(data_root).as_posix() + "/")]
    files = [n for n in found if not n.endswith("/")]
    return files[0] if len(files) == 1 else sorted(found, key=len)[0]


def make_demo(data_root: str | os.PathLike, groups: int = 40, seed: int = 0) -> str:
    """Write the synthetic demo set into `<data root>/demo/`; returns its name."""
    from ..data.demo import write_demo

    path = write_demo(Path(data_root) / "demo", groups=groups, seed=seed)
    return path.relative_to(Path(data_root)).as_posix()


# --------------------------------------------------------------------------------------------------
# loading and the report

@dataclass
class DataReport:
    name: str
    groups: list[PreferenceGroup] = field(default_factory=list)
    result: object | None = None     # LoadResult
    error: str | None = None         # the file could not be used at all

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.groups)


_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def _signature(path: Path) -> tuple:
    if path.is_file():
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir()))


def load_report(data_root: str | os.PathLike, name: str, fmt: str = "auto", media_root: str | None = None,
                max_frames: int = 8, runs_root: str | os.PathLike | None = None) -> DataReport:
    """Validate `name` (every bad row reported, none fatal); cached per file version and settings. `runs_root`:
    where `run:...` names (a round's groups) lie."""
    from ..data.readers import load_groups

    path = resolve_data(data_root, name, runs_root)
    media = str(inside(data_root, media_root, what="media root")) if media_root else None
    key = (str(path), fmt, media, max_frames, _signature(path))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        result = load_groups(str(path), fmt=fmt, media_root=media, on_error="skip", max_frames=max_frames,
                             allow_empty=True)
        report = DataReport(name, result.groups, result)
    except (DataError, MediaError, ValueError) as exc:
        report = DataReport(name, error=_relative(str(exc), data_root, runs_root))
    except OSError as exc:
        report = DataReport(name, error=f"cannot read {name}: {exc.strerror or exc}")
    with _cache_lock:
        _cache[key] = report
        while len(_cache) > 4:
            _cache.popitem(last=False)
    return report


def _relative(text: str, data_root: str | os.PathLike, runs_root: str | os.PathLike | None = None) -> str:
    """Messages name files relative to the data root (shorter, and no server paths in the page), and a file in
    the runs root as `run:<run>/...`."""
    if runs_root:
        runs = str(Path(runs_root).resolve())
        text = text.replace(runs + os.sep, RUN_DATA)
    root = str(Path(data_root).resolve())
    return text.replace(root + os.sep, "").replace(root, ".")


def problems_frame(report: DataReport, data_root: str | os.PathLike, limit: int = 500,
                   extra_roots: tuple = ()) -> pd.DataFrame:
    """Every skipped row: where (file:line), the problem, and what to fix. Images under `extra_roots` (the runs
    root) are shown too, as `group_images` does."""
    rows = []
    errors = list(getattr(report.result, "errors", []) or []) if report.result is not None else []
    for err in errors[:limit]:
        rows.append({"where": _relative(err.source, data_root), "problem": _relative(err.message, data_root),
                     "how to fix": FIXES.get(err.reason, REASONS.get(err.reason, ""))})
    if report.result is not None:
        for w in report.result.warnings[:limit]:
            where, _, msg = w.partition(": ")
            rows.append({"where": _relative(where, data_root), "problem": "warning: " + _relative(msg, data_root),
                         "how to fix": "check the rows named here; they are used as the message says"})
    outside = sum(1 for g in report.groups for m in _media(g)
                  if isinstance(m, str) and not _allowed(m, data_root, extra_roots))
    if outside:
        rows.append({"where": report.name, "problem": f"{outside} image(s) lie outside the data root and are not shown",
                     "how to fix": "keep the images next to the data (or upload a .zip with them)"})
    return pd.DataFrame(rows, columns=["where", "problem", "how to fix"])


def summary_markdown(report: DataReport) -> str:
    if report.error:
        return f"**Cannot use `{report.name}`:** {report.error}"
    from ..data.stats import group_stats

    s = group_stats(report.result)
    skipped = sum(s["skipped"].values())
    if not report.groups:
        return (f"**Cannot use `{report.name}`:** no preference groups were loaded from {s['rows']} row(s)"
                + (f"; all {skipped} skipped, each listed below with what to fix." if skipped else "."))
    head = (f"**{report.name}** — {s['groups']} groups from {s['rows']} rows "
            f"({', '.join(sorted(set(s['formats'].values()))) or '-'}); ")
    head += (f"**{skipped} row(s) skipped**, listed below with what to fix." if skipped
             else "no problems found." if not s["warnings"] else f"{s['warnings']} warning(s), listed below.")
    m = s["media"]
    cats = ", ".join(f"{c} {v['groups']}" for c, v in s["categories"].items())
    lines = [head, "",
             "| groups | responses | K per group | pairs | ties | critiques | images | video groups |",
             "|---|---|---|---|---|---|---|---|",
             f"| {s['groups']} | {s['responses']} | {', '.join(f'{k}x{n}' for k, n in s['k'].items())} | "
             f"{s['pairs']} | {s['ties']} | {s['critiques']} | {m['images']} ({m['distinct_images']} distinct) | "
             f"{m['video_groups']} |", "", f"Categories: {cats}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# one group

def _media(group: PreferenceGroup) -> list:
    return list(group.images) + list(group.video or [])


def _allowed(media: str, data_root, extra_roots: tuple = ()) -> bool:
    return any(is_inside(r, media) for r in (data_root, *extra_roots))


def group_images(group: PreferenceGroup, data_root, extra_roots: tuple = ()) -> tuple[list, list[str]]:
    """(decoded images for the gallery, notes about images not shown)."""
    images, notes = [], []
    for i, m in enumerate(_media(group)):
        label = f"image {i + 1}" if i < len(group.images) else f"frame {i - len(group.images) + 1}"
        if isinstance(m, str) and not _allowed(m, data_root, extra_roots):
            notes.append(f"{label}: outside the data root, not shown")
            continue
        try:
            img = load_image(m if isinstance(m, bytes) else str(m))
        except MediaError as exc:
            notes.append(f"{label}: {_relative(str(exc), data_root)}")
            continue
        img.thumbnail((DISPLAY_PIXELS, DISPLAY_PIXELS))
        images.append((img, label))
    return images, notes


RESPONSE_COLUMNS = ["#", "rank", "response", "score (data)", "reward score", "critique (data)",
                    "critique (reward model)"]


def responses_frame(group: PreferenceGroup, reward: dict | None = None) -> pd.DataFrame:
    """One row per response: rank, text, the data's score and critique, and (when a run's reward cache is
    chosen) the reward model's score and generated critique."""
    try:
        ranks = group.ranks()
    except ValueError:
        ranks = [None] * len(group.responses)
    scores = (reward or {}).get("scores") or []
    crits = (reward or {}).get("critiques") or []
    rows = []
    for i, r in enumerate(group.responses):
        rows.append({"#": i + 1, "rank": ranks[i], "response": r.text, "score (data)": r.score,
                     "reward score": round(scores[i], 4) if i < len(scores) and scores[i] is not None else None,
                     "critique (data)": r.critique or "",
                     "critique (reward model)": " | ".join(crits[i]) if i < len(crits) and crits[i] else ""})
    return pd.DataFrame(rows, columns=RESPONSE_COLUMNS)


def pairs_markdown(group: PreferenceGroup, dpo_pairs: str = "all") -> str:
    """The pairs the reward model and MM-DPO train on (1-based response numbers)."""
    pairs = group.pairs() if dpo_pairs == "all" else group.best_vs_worst()
    ties = group.ties()
    lines = [f"**Pairs training forms** ({len(pairs)}; better > worse): "
             + (", ".join(f"#{b + 1} > #{w + 1}" for b, w in pairs) or "none")]
    if ties:
        lines.append("**Ties** (reward tie loss only, not DPO): " + ", ".join(f"#{a + 1} = #{b + 1}" for a, b in ties))
    if group.explicit_pairs is not None:
        lines.append("_Pairs as given in the file (no full ranking could be recovered)._")
    return "\n\n".join(lines)


def question_markdown(group: PreferenceGroup, data_root, runs_root=None) -> str:
    import html

    media = f"{len(group.images)} image(s)" + (f", video of {len(group.video)} frame(s)" if group.video else "")
    where = f" · `{html.escape(_relative(group.source, data_root, runs_root))}`" if group.source else ""
    text = html.escape(group.question_text()).replace("\n", "<br>")
    return f"**{html.escape(group.id)}** · {html.escape(group.category)} · {media}{where}\n\n> {text}"


def image_bytes(img) -> bytes:
    """A PIL image as PNG bytes (what the scorer takes)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
