"""Load-time checks: media exist and decode, responses are non-empty and distinct.

Images are checked once per path (a dataset of 100k pairs usually shares a few thousand images): the
file must exist, PIL must identify it and `verify()` it (for PNG that reads every chunk and its CRC),
and a JPEG must end with its end-of-image marker (PIL's JPEG `verify()` does not read the data, so a
truncated JPEG would otherwise pass). Full decoding happens later, in the model's collator, through
`media.load_image`.

    python -m mmrlhf_lite.data stats path/to/pairs.jsonl --media-root path/to/images
"""
from __future__ import annotations

import io
import os

from PIL import UnidentifiedImageError

from .errors import DataError
from .media import MediaError, open_checked

JPEG_EOI = b"\xff\xd9"
JPEG_TAIL = 1024  # the end-of-image marker must be in the last KiB (tolerates a little trailing padding)


class MediaChecker:
    """Checks images, caching the outcome per path: `(reason, message)` or None when the image is fine."""

    def __init__(self) -> None:
        self._by_path: dict[str, tuple[str, str] | None] = {}
        self.checked = 0  # distinct files actually opened (for stats / tests)

    def problem(self, media: str | bytes) -> tuple[str, str] | None:
        if isinstance(media, bytes):
            return _image_problem(media, "inline image bytes")
        if media not in self._by_path:
            self.checked += 1
            self._by_path[media] = _file_problem(media)
        return self._by_path[media]

    def check(self, media: str | bytes, source: str, key: str) -> None:
        problem = self.problem(media)
        if problem is not None:
            reason, message = problem
            raise DataError(source, f"key '{key}': {message}", reason=reason, key=key,
                            path=None if isinstance(media, bytes) else media)


def _file_problem(path: str) -> tuple[str, str] | None:
    """Reads only what the checks need: PNG chunks (verify), a JPEG's header and last KiB."""
    if not os.path.isfile(path):
        what = "is a folder, not an image" if os.path.isdir(path) else "not found"
        return "missing_image", f"image {what}: {path}"
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "corrupt_image", f"image is empty (0 bytes): {path}"
        with open(path, "rb") as fh:
            problem = _verify(fh, path)
            if problem is None and _format_of(fh) == "JPEG":
                fh.seek(max(0, size - JPEG_TAIL))
                if JPEG_EOI not in fh.read():
                    problem = "corrupt_image", f"corrupt or unreadable image: {path} (truncated JPEG: no end-of-image marker)"
    except OSError as exc:
        return "missing_image", f"image not readable: {path} ({exc.strerror})"
    return problem


def _format_of(fh) -> str:
    fh.seek(0)
    return "JPEG" if fh.read(3) == b"\xff\xd8\xff" else ""


def _verify(fh, where: str) -> tuple[str, str] | None:
    try:
        with open_checked(fh, where) as img:
            img.verify()
    except MediaError as exc:
        return "image_too_large", str(exc)
    except UnidentifiedImageError:
        return "corrupt_image", f"corrupt or unreadable image: {where} (not a format PIL recognises)"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return "corrupt_image", f"corrupt or unreadable image: {where} ({exc})"
    return None


def _image_problem(data: bytes, where: str) -> tuple[str, str] | None:
    if not data:
        return "corrupt_image", f"image is empty (0 bytes): {where}"
    problem = _verify(io.BytesIO(data), where)
    if problem is None and data[:3] == b"\xff\xd8\xff" and JPEG_EOI not in data[-JPEG_TAIL:]:
        problem = "corrupt_image", f"corrupt or unreadable image: {where} (truncated JPEG: no end-of-image marker)"
    return problem


def check_response_text(text: str, source: str, key: str) -> None:
    if not text.strip():
        raise DataError(source, f"key '{key}': empty response", reason="empty_response", key=key)


def check_distinct(texts: list[str], source: str, keys: list[str]) -> None:
    """Two responses of one row with the same text (outer whitespace ignored) carry no preference."""
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        norm = text.strip()
        if norm in seen:
            a, b = keys[seen[norm]], keys[i]
            raise DataError(source, f"'{a}' and '{b}' have the same text: {_short(text)!r}",
                            reason="chosen_equals_rejected", key=b)
        seen[norm] = i


def _short(text: str, n: int = 60) -> str:
    text = text.strip()
    return text if len(text) <= n else text[: n - 3] + "..."
