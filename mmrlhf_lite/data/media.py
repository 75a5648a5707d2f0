"""Images and video frames: open, check, sample.

A video is a folder of frames or a list of frame paths; it is sampled to `max_frames` evenly spaced
frames and fed to the model as images, so every family (and CPUs without torchvision) handles it.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .groups import Media

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class MediaError(ValueError):
    """A missing or unreadable image/video, with its path."""


DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # PIL's own default (its guard against decompression bombs)


def set_max_image_pixels(limit: int | None) -> None:
    """The most pixels an image may have (width x height; None or 0: no limit). PIL reads only the header
    to know the size, so a tiny file claiming 30000x30000 is refused before anything is decoded. One
    process-wide setting, as in PIL (`Image.MAX_IMAGE_PIXELS`), set from `data.max_image_pixels`."""
    Image.MAX_IMAGE_PIXELS = int(limit) if limit else None


_open_lock = threading.Lock()


def open_checked(src, where: str) -> Image.Image:
    """`Image.open` (header only) that refuses an image over the pixel limit with a MediaError naming it
    and its size. PIL's own check would raise before the size is known; it is lifted for the header read
    (under a lock, restored at once) and applied here instead."""
    with _open_lock:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            img = Image.open(src)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    if (msg := too_large(*img.size, where)) is not None:
        img.close()
        raise MediaError(msg)
    return img


def too_large(width: int, height: int, where: str) -> str | None:
    """The message for an image over the limit, or None."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or width * height <= limit:
        return None
    return (f"image too large to open: {where} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limit:,} (data.max_image_pixels; a guard against decompression bombs). If the image is genuine, "
            f"raise data.max_image_pixels (e.g. data.max_image_pixels={width * height}), or downscale the image")


def load_image(media: Media) -> Image.Image:
    """Open as RGB, fully decoded (so a truncated file fails here, naming its path)."""
    try:
        if isinstance(media, bytes):
            img = open_checked(io.BytesIO(media), "inline image bytes")
        else:
            if not os.path.exists(media):
                raise MediaError(f"image not found: {media}")
            img = open_checked(media, media)
        img.load()
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        where = "inline image bytes" if isinstance(media, bytes) else media
        raise MediaError(f"corrupt or unreadable image: {where} ({exc})") from None
    return img.convert("RGB")


def media_digest(media: Media) -> str:
    """sha256 of the media bytes: cache keys change when the image content changes, not its name."""
    h = hashlib.sha256()
    if isinstance(media, bytes):
        h.update(media)
    else:
        try:
            with open(media, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as exc:
            raise MediaError(f"image not found: {media} ({exc.strerror})") from None
    return h.hexdigest()


def list_frames(video: str | list[str]) -> list[str]:
    """All frames of a video (a folder of image files in name order, or a list of paths)."""
    if isinstance(video, list):
        return [str(v) for v in video]
    p = Path(video)
    if not p.is_dir():
        raise MediaError(f"video must be a folder of frames or a list of frame paths: {video}")
    frames = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise MediaError(f"video folder has no image frames: {video}")
    return frames


def sample_frames(frames: list[str], max_frames: int) -> list[str]:
    """`max_frames` evenly spaced frames (all of them when there are fewer)."""
    if len(frames) <= max_frames:
        return list(frames)
    step = len(frames) / max_frames
    return [frames[int(i * step + step / 2)] for i in range(max_frames)]
