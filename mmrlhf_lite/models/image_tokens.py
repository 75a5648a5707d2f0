"""How many tokens an image becomes, per family, from its size alone (no pixels decoded): the counting
rules behind `FamilySpec.image_tokens`, used by the pre-flight (mmrlhf_lite/plan) to count exactly what the
processor would produce.

    python -m pytest -q tests/test_preflight.py

Each counter takes (processor, [(width, height)], nested, config) and returns per image
(placeholder tokens in the text, image tokens the LLM sees, vision-tower positions).
"""
from __future__ import annotations

class SizedImage:
    """Stands in for a decoded image: only its size is read."""

    def __init__(self, width: int, height: int):
        self.size = (width, height)
        self.width, self.height = width, height


def image_size(media) -> tuple[int, int]:
    """(width, height) from the file header (no decoding), as `load_image` would see it."""
    import io
    import os

    from PIL import Image, UnidentifiedImageError

    from ..data.media import MediaError

    try:
        if isinstance(media, bytes):
            with Image.open(io.BytesIO(media)) as img:
                return img.size
        if not os.path.exists(media):
            raise MediaError(f"image not found: {media}")
        with Image.open(media) as img:
            return img.size
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        where = "inline image bytes" if isinstance(media, bytes) else media
        raise MediaError(f"corrupt or unreadable image: {where} ({exc})") from None


def count_qwen(proc, sizes: list[tuple[int, int]], nested: bool, config: dict | None) -> list[tuple[int, int, int]]:
    """Qwen2/2.5/3-VL: one <|image_pad|> becomes grid_h * grid_w / merge^2 tokens; the vision tower sees
    grid_h * grid_w patches (grid_t = 1 for an image)."""
    ip = proc.image_processor
    out = []
    for w, h in sizes:
        patches = ip.get_number_of_image_patches(h, w, {})
        n = patches // ip.merge_size ** 2
        out.append((n, n, patches))
    return out


def count_llava_onevision(proc, sizes, nested, config) -> list[tuple[int, int, int]]:
    """LLaVA-OneVision: a prompt's only image gets anyres tiles (base tile + the unpadded grid, newline
    tokens, downscaled above anyres_max_N); images of a multi-image sample get the base tile + 1."""
    from transformers.image_processing_utils import select_best_resolution

    ip = proc.image_processor
    tile = ip.size["height"]
    per_tile = proc.num_image_tokens
    multi = nested and len(sizes) > 1
    out = []
    for w, h in sizes:
        if multi:
            n, tiles = per_tile + 1, 1
        else:
            n = proc._get_number_of_features(h, w, tile, tile)
            bh, bw = select_best_resolution([h, w], ip.image_grid_pinpoints)
            tiles = 1 + (bh // tile) * (bw // tile)
        if proc.vision_feature_select_strategy == "default":
            n -= 1
        out.append((n, n, tiles * per_tile))
    return out


def count_idefics3(proc, sizes, nested, config) -> list[tuple[int, int, int]]:
    """Idefics3/SmolVLM: `<image>` becomes the tile grid's text (fake/row tokens, `image_seq_len` image
    tokens per tile, plus the global image); the vision tower sees scale^2 patches per image token."""
    data = proc._get_num_multimodal_tokens(image_sizes=[[h, w] for w, h in sizes])
    scale = (config or {}).get("scale_factor", 2)
    out = []
    for n, tiles in zip(data.num_image_tokens, data.num_image_patches):
        image_tokens = proc.image_seq_len * max(1, tiles)
        out.append((n, image_tokens, image_tokens * scale ** 2))
    return out


IMAGE_COUNTERS = {"qwen": count_qwen, "llava_onevision": count_llava_onevision, "idefics3": count_idefics3}


def image_counter(family):
    """The counting rule of a family (FamilySpec.image_tokens), or None when it has none."""
    return IMAGE_COUNTERS.get(getattr(family, "image_tokens", None))
