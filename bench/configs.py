"""Architecture shapes the benchmark builds with random weights (speed and memory do not depend on the values).

The real-size entries restate the public `config.json` hyperparameters of the released checkpoints
(Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct), written from
knowledge of those architectures; nothing is downloaded. Note the vocabularies differ: 151936 for the
2B (whose LM head is tied to the embeddings), 152064 for both 7B models (untied head).

`tiny` is the same builder at toy size, for the CPU smoke run and the tests; `cpu` is a ~37M-parameter
Qwen2-VL layout for the side-by-side on a CPU (bench/cpu.sh), where a step's time is matmul time.

    python -c "from bench.configs import SHAPES; print(sorted(SHAPES))"
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TextShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionShape:
    depth: int
    embed_dim: int            # width of the ViT blocks
    num_heads: int
    mlp_hidden: int           # Qwen2-VL: mlp_ratio * embed_dim (2 matrices, QuickGELU); Qwen2.5-VL: SwiGLU intermediate
    mlp_gated: bool           # SwiGLU (3 matrices) instead of fc1/fc2
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    window_size: int | None = None          # Qwen2.5-VL: window attention (pixels) except in fullatt blocks
    fullatt_block_indexes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Shape:
    name: str
    family: str               # mmrlhf_lite.models.families key
    text: TextShape
    vision: VisionShape
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


QWEN2_VL_VISION = VisionShape(depth=32, embed_dim=1280, num_heads=16, mlp_hidden=4 * 1280, mlp_gated=False)

SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape(
        name="tiny", family="qwen2_vl",
        text=TextShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False, mrope_section=(4, 2, 2)),
        vision=VisionShape(depth=1, embed_dim=32, num_heads=2, mlp_hidden=64, mlp_gated=False),
        notes="toy size for the CPU smoke run and tests; same builder and code paths as the real shapes",
    ),
    Shape(
        name="cpu", family="qwen2_vl",
        text=TextShape(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=False, mrope_section=(8, 12, 12)),
        vision=VisionShape(depth=4, embed_dim=256, num_heads=4, mlp_hidden=4 * 256, mlp_gated=False),
        notes="CPU side-by-side shape (bench/cpu.sh): Qwen2-VL layout, ~37M parameters, small enough for a 2-core "
              "CPU and large enough that a training step's time goes to matmuls, not to per-call overhead",
    ),
    Shape(
        name="2b", family="qwen2_vl",
        text=TextShape(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        vision=QWEN2_VL_VISION,
        notes="Qwen2-VL-2B-Instruct shape",
    ),
    Shape(
        name="7b", family="qwen2_vl",
        text=TextShape(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        vision=QWEN2_VL_VISION,
        notes="Qwen2-VL-7B-Instruct shape",
    ),
    Shape(
        name="2.5-7b", family="qwen2_5_vl",
        text=TextShape(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        vision=VisionShape(depth=32, embed_dim=1280, num_heads=16, mlp_hidden=3420, mlp_gated=True,
                           window_size=112, fullatt_block_indexes=(7, 15, 23, 31)),
        notes="Qwen2.5-VL-7B-Instruct shape (window attention in the ViT except blocks 7/15/23/31)",
    ),
)}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown --model '{name}'; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def hf_config(shape: Shape, token_ids: dict[str, int]):
    """The transformers config object for `shape`; special-token ids come from the benchmark tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    t, v = shape.text, shape.vision
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=t.tie_word_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                 "mrope_section": list(t.mrope_section)},
                bos_token_id=token_ids["bos"], eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"])
    common = dict(image_token_id=token_ids["image"], video_token_id=token_ids["video"],
                  vision_start_token_id=token_ids["vision_start"], vision_end_token_id=token_ids["vision_end"],
                  eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
                  tie_word_embeddings=t.tie_word_embeddings)
    if shape.family == "qwen2_vl":
        if v.mlp_gated or v.mlp_hidden % v.embed_dim:
            raise ValueError("Qwen2-VL's vision MLP is fc1/fc2 with hidden = mlp_ratio * embed_dim")
        vision = dict(depth=v.depth, embed_dim=v.embed_dim, hidden_size=t.hidden_size, num_heads=v.num_heads,
                      mlp_ratio=v.mlp_hidden // v.embed_dim, patch_size=v.patch_size,
                      spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                      in_chans=v.in_channels)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if shape.family == "qwen2_5_vl":
        vision = dict(depth=v.depth, hidden_size=v.embed_dim, out_hidden_size=t.hidden_size,
                      intermediate_size=v.mlp_hidden, num_heads=v.num_heads, patch_size=v.patch_size,
                      spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                      in_channels=v.in_channels, window_size=v.window_size,
                      fullatt_block_indexes=list(v.fullatt_block_indexes), hidden_act="silu")
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"no config builder for family {shape.family}")
