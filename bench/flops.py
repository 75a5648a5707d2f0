"""One FLOP model for every system of the benchmark (bench/README.md, "FLOP model", works it through).

Counts matmul FLOPs (2 per multiply-add) from the architecture and the token layout of a step:

    decoder linears   fwd 2*N*T          bwd 2*N*T        (input grads only: the 4-bit base is frozen)
    LoRA (rank r)     fwd 2*N_r*T        bwd 4*N_r*T      (input grads + A/B weight grads)
    attention         fwd 4*H*d*A*L      bwd 8*H*d*A*L    A = (query, key) pairs the mask allows
    LM head           fwd 2*h*V*n        bwd 2*h*V*n      n = target (response) tokens only
    vision tower      fwd only (frozen, its input needs no grad), once per image pass

N = linear parameters of the decoder per token (q, k, v, o, gate, up, down over all layers), N_r = LoRA
parameters r*(d_in + d_out) summed over the adapted linears, T = tokens through the decoder, H heads of
width d, L layers, h hidden, V vocabulary. Not counted: 4-bit dequantisation, norms, RoPE, softmax,
gradient-checkpointing recompute (MFU, not HFU). `frozen_base=False` gives the classic full-fine-tuning
6*N*T count (bwd 4*N*T) for comparison with published MFU numbers; it is 1.5x the LoRA count.

Useful FLOPs of a group (the numerator of MFU, the same for every system): its unique tokens once:
the prompt (image tokens included) once, each response once, attention as the packed mask allows it,
the LM head on response tokens; for training (fwd + bwd, adapter on) plus one reference forward
(adapter off); and the frozen vision tower once per image (both passes see the same image features). Executed FLOPs are what a system actually runs: TRL repeats the prompt
and image in each pair side and runs the reference forward every step; one-row-per-response repeats
them per response.

    python -m bench.flops 7b 1024 186
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .configs import Shape, TextShape, VisionShape, get_shape

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
H100_SXM_BF16_DENSE_TFLOPS = 989.0


@dataclass(frozen=True)
class GroupTokens:
    """The token layout of one group: prompt length (image tokens included), the vision tower's patches per
    image (before the 2x2 merge), response lengths and target tokens per response (= length for DPO)."""
    prompt: int
    responses: tuple[int, ...]
    image_patches: tuple[int, ...] = ()
    targets: tuple[int, ...] | None = None

    @property
    def target_tokens(self) -> tuple[int, ...]:
        return self.targets if self.targets is not None else self.responses

    @property
    def unique_tokens(self) -> int:
        return self.prompt + sum(self.responses)

    @property
    def n_pairs(self) -> int:
        k = len(self.responses)
        return k * (k - 1) // 2


# --------------------------------------------------------------------------------------------------
# per-architecture constants

def linear_shapes(t: TextShape) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each decoder linear of one layer."""
    h, d = t.hidden_size, t.head_dim
    return {"q_proj": (h, t.num_attention_heads * d), "k_proj": (h, t.num_key_value_heads * d),
            "v_proj": (h, t.num_key_value_heads * d), "o_proj": (t.num_attention_heads * d, h),
            "gate_proj": (h, t.intermediate_size), "up_proj": (h, t.intermediate_size),
            "down_proj": (t.intermediate_size, h)}


def decoder_linear_params(t: TextShape) -> int:
    """N: multiply-adds per token in the decoder's linears (all layers)."""
    return t.num_hidden_layers * sum(a * b for a, b in linear_shapes(t).values())


def lora_params(t: TextShape, r: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """N_r: LoRA parameters r*(d_in + d_out) over the adapted linears of all layers."""
    return t.num_hidden_layers * sum(r * (a + b) for n, (a, b) in linear_shapes(t).items() if n in targets)


def attention_flops_per_pair(t: TextShape) -> int:
    """Forward FLOPs per allowed (query, key) pair over all layers: QK^T and AV, 2*H*d each."""
    return 4 * t.num_attention_heads * t.head_dim * t.num_hidden_layers


# --------------------------------------------------------------------------------------------------
# attention pair counts

def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def packed_pairs(prompt: int, responses) -> int:
    """A packed group: causal prompt; each response sees the prompt and itself causally."""
    return causal_pairs(prompt) + sum(r * prompt + causal_pairs(r) for r in responses)


# --------------------------------------------------------------------------------------------------
# vision tower

def vision_patches(width: int, height: int, v: VisionShape) -> int:
    """Patches of one image (a single image is one temporal patch group)."""
    return (width // v.patch_size) * (height // v.patch_size)


def vision_forward_flops(v: VisionShape, text_hidden: int, patches: int) -> int:
    """Forward FLOPs of the ViT on one image of `patches` patches: patch embedding (Conv3d), blocks
    (qkv + proj + MLP, attention over the image: full, or Qwen2.5-VL windows of
    (window_size / patch)^2 patches outside the full-attention blocks) and the 2x2 patch merger."""
    D, n = v.embed_dim, patches
    embed = 2 * n * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * D
    mlp = (3 if v.mlp_gated else 2) * D * v.mlp_hidden
    blocks = v.depth * 2 * n * (4 * D * D + mlp)
    attn = 0
    window = (v.window_size // v.patch_size) ** 2 if v.window_size else None
    for i in range(v.depth):
        ctx = n if window is None or i in v.fullatt_block_indexes else min(n, window)
        attn += 4 * D * n * ctx
    merged = n // v.spatial_merge_size ** 2
    m = D * v.spatial_merge_size ** 2
    merger = 2 * merged * (m * m + m * text_hidden)
    return embed + blocks + attn + merger


# --------------------------------------------------------------------------------------------------
# sequences and steps

@dataclass
class Flops:
    """FLOPs split by part; `total` is their sum."""
    linear: float = 0.0
    lora: float = 0.0
    attention: float = 0.0
    head: float = 0.0
    vision: float = 0.0
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.linear + self.lora + self.attention + self.head + self.vision

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.linear + other.linear, self.lora + other.lora, self.attention + other.attention,
                     self.head + other.head, self.vision + other.vision)

    def scaled(self, k: float) -> "Flops":
        return Flops(self.linear * k, self.lora * k, self.attention * k, self.head * k, self.vision * k)

    def as_dict(self) -> dict:
        return {"linear": self.linear, "lora": self.lora, "attention": self.attention, "head": self.head,
                "vision": self.vision, "total": self.total}


def pass_flops(shape: Shape, *, tokens: int, attn_pairs: int, target_tokens: int, image_patches=(),
               train: bool, lora_r: int = 16, lora: bool = True, frozen_base: bool = True,
               vision: bool = True) -> Flops:
    """One pass over `tokens` decoder tokens: training (fwd + bwd) or forward only (reference / no grad)."""
    t = shape.text
    N, Nr = decoder_linear_params(t), (lora_params(t, lora_r) if lora else 0)
    fwd_linear, fwd_lora = 2 * N * tokens, 2 * Nr * tokens
    fwd_attn = attention_flops_per_pair(t) * attn_pairs
    fwd_head = 2 * t.hidden_size * t.vocab_size * target_tokens
    vis = sum(vision_forward_flops(shape.vision, t.hidden_size, p) for p in image_patches) if vision else 0
    if not train:
        return Flops(fwd_linear, fwd_lora, fwd_attn, fwd_head, vis)
    bwd_linear = (1 if frozen_base else 2) * fwd_linear
    return Flops(fwd_linear + bwd_linear, 3 * fwd_lora, 3 * fwd_attn, 2 * fwd_head, vis)


def useful_group_flops(shape: Shape, g: GroupTokens, lora_r: int = 16, frozen_base: bool = True) -> dict[str, Flops]:
    """Each unique token once: a training pass (adapter on) and one reference forward (adapter off) over the
    prompt once and each response once, and the frozen vision tower once per image (its output is the same
    for both passes)."""
    common = dict(tokens=g.unique_tokens, attn_pairs=packed_pairs(g.prompt, g.responses),
                  target_tokens=sum(g.target_tokens), image_patches=g.image_patches, vision=False)
    train = pass_flops(shape, train=True, lora_r=lora_r, frozen_base=frozen_base, **common)
    ref = pass_flops(shape, train=False, lora=False, **common)
    vision = Flops(vision=sum(vision_forward_flops(shape.vision, shape.text.hidden_size, p) for p in g.image_patches))
    return {"train": train, "reference": ref, "vision": vision, "total": train + ref + vision}


SYSTEM_LAYOUTS = ("packed", "unpacked", "pairs", "packed-vision-cached")


def executed_group_flops(shape: Shape, g: GroupTokens, layout: str, lora_r: int = 16,
                         frozen_base: bool = True, reference_every_step: bool = False) -> dict[str, Flops]:
    """What a system runs for one group's worth of pairs.

    packed:    one row [prompt][r1..rK] (= useful);
    packed-vision-cached: packed, the vision tower run once (reference pass) and reused in training;
    unpacked:  one row [prompt][r_i] per response, vision per row;
    pairs:     TRL, one (prompt, chosen) + one (prompt, rejected) row per pair, vision per row, and the
               reference forward of both rows in every step (`reference_every_step`, TRL for vision data).
    """
    kw = dict(lora_r=lora_r, frozen_base=frozen_base)
    if layout in ("packed", "packed-vision-cached"):
        common = dict(tokens=g.unique_tokens, attn_pairs=packed_pairs(g.prompt, g.responses),
                      target_tokens=sum(g.target_tokens), image_patches=g.image_patches)
        train = pass_flops(shape, train=True, vision=layout == "packed", **common, **kw)
        ref = pass_flops(shape, train=False, lora=False, **common)
    elif layout in ("unpacked", "pairs"):
        rows = [(r, tt) for r, tt in zip(g.responses, g.target_tokens)]
        if layout == "pairs":
            pairs = [(i, j) for i in range(len(g.responses)) for j in range(i + 1, len(g.responses))]
            rows = [rows[i] for p in pairs for i in p]
        train, ref = Flops(), Flops()
        for r, tt in rows:
            common = dict(tokens=g.prompt + r, attn_pairs=causal_pairs(g.prompt + r), target_tokens=tt,
                          image_patches=g.image_patches)
            train = train + pass_flops(shape, train=True, **common, **kw)
            ref = ref + pass_flops(shape, train=False, lora=False, **common)
    else:
        raise ValueError(f"unknown layout {layout}; known: {SYSTEM_LAYOUTS}")
    return {"train": train, "reference": ref, "total": train + ref}


def mfu(useful_flops_per_s: float, peak_tflops: float = H100_SXM_BF16_DENSE_TFLOPS) -> float:
    """Model FLOPs utilisation: useful FLOPs per second over the device's dense peak."""
    return useful_flops_per_s / (peak_tflops * 1e12)


def typical_group(shape: Shape, image_tokens: int, response_tokens: int, k: int = 4, template_tokens: int = 30
                  ) -> GroupTokens:
    """A square image of `image_tokens` merged tokens, a prompt of image + `template_tokens`, K responses."""
    from .data import image_size

    w, h = image_size(image_tokens)
    return GroupTokens(prompt=image_tokens + template_tokens, responses=(response_tokens,) * k,
                       image_patches=(vision_patches(w, h, shape.vision),))


if __name__ == "__main__":
    name, image_tokens, resp = (sys.argv[1:] + ["7b", "1024", "186"][len(sys.argv[1:]):])[:3]
    shape = get_shape(name)
    g = typical_group(shape, int(image_tokens), int(resp))
    useful = useful_group_flops(shape, g)
    print(f"{name}: prompt {g.prompt} tokens, responses {g.responses}, {g.n_pairs} pairs")
    for part, f in useful.items():
        print(f"  useful {part:9s} {f.total / 1e12:8.2f} TFLOP  " +
              " ".join(f"{k}={v / 1e12:.2f}" for k, v in f.as_dict().items() if k != "total"))
    for layout in SYSTEM_LAYOUTS:
        e = executed_group_flops(shape, g, layout)
        print(f"  executed {layout:22s} {e['total'].total / 1e12:8.2f} TFLOP per group "
              f"({e['total'].total / useful['total'].total:.2f}x useful)")
