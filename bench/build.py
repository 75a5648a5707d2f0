"""Random-weight checkpoints of the benchmark shapes, saved once into a local folder.

Each shape (bench/configs.py) is instantiated with `from_config` (random init, on the GPU when there is
one: fast), saved with `save_pretrained` next to a small BPE tokenizer, the Qwen chat template and a
Qwen2-VL image processor whose pixel bounds let an image of W x H pixels (multiples of 28) through
unchanged, so it becomes exactly (W / 28) * (H / 28) image tokens. Every system of the benchmark then
loads that same folder: the same weights for ours, TRL and Unsloth. The tokenizer is the tiny kit's
(about 1k tokens, ids far below the model's vocabulary): token ids only have to be valid, and the
LM head keeps the real vocabulary size, which is what its cost depends on.

    python -m bench.build tiny        # prints the folder (built once per cache)
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from mmrlhf_lite.models.tiny import build_once

from .configs import Shape, get_shape, hf_config

BUILD_VERSION = 1
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 16384  # up to 16384 image tokens per image


def cache_root() -> Path:
    root = os.environ.get("MMRLHF_LITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmrlhf_lite")
    return Path(root) / "bench-models"


def model_dir(shape: Shape, root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    key = hashlib.sha256(json.dumps([BUILD_VERSION, shape.to_dict(), seed], sort_keys=True,
                                    default=str).encode()).hexdigest()[:10]
    return Path(root or cache_root()) / f"{shape.name}-{key}"


def ensure_model(name: str, root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Build the shape's random checkpoint once (atomically: a temp folder renamed into place)."""
    shape = get_shape(name)
    return build_once(model_dir(shape, root, seed), lambda tmp: _build(shape, tmp, seed))

def _build(shape: Shape, out: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers import logging as hf_logging
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmrlhf_lite.models.tiny import QWEN2_VL_CHAT_TEMPLATE, SIZES, build_tokenizer

    tok = build_tokenizer(SIZES["s"], QWEN2_VL_CHAT_TEMPLATE)
    ids = {"bos": tok.convert_tokens_to_ids("<|endoftext|>"), "pad": tok.convert_tokens_to_ids("<|endoftext|>"),
           "eos": tok.convert_tokens_to_ids("<|im_end|>"), "image": tok.convert_tokens_to_ids("<|image_pad|>"),
           "video": tok.convert_tokens_to_ids("<|video_pad|>"),
           "vision_start": tok.convert_tokens_to_ids("<|vision_start|>"),
           "vision_end": tok.convert_tokens_to_ids("<|vision_end|>")}
    config = hf_config(shape, ids)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
        model.generation_config.eos_token_id = ids["eos"]
        model.generation_config.pad_token_id = ids["pad"]
        model.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
    del model
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=shape.vision.patch_size,
                             merge_size=shape.vision.spatial_merge_size,
                             temporal_patch_size=shape.vision.temporal_patch_size).save_pretrained(out)
    processor_class = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[shape.family]
    (out / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}, indent=2))
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["processor_class"] = processor_class
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out / "BENCH_MODEL.json").write_text(json.dumps({"shape": shape.to_dict(), "seed": seed,
                                                      "build_version": BUILD_VERSION}, indent=2, default=str))


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["tiny"]:
        print(ensure_model(arg))
