"""Peak GPU memory of a recipe, estimated from the architecture's numbers: the model behind the dry run's
memory section (docs/memory.md explains every term and its error against measured peaks).

    python -m mmrlhf_lite.train recipes/qwen2_vl_7b-24gb.yaml --dry-run --gpu-mem 24GB

An estimate, not a measurement: it counts what the transformers backend (bitsandbytes nf4 + peft LoRA,
as `models/loading.py` sets it up) keeps alive at the worst moment of a step, for the longest micro-batch
the data can produce:

    weights       nf4 for the decoder's linear layers (0.5 B/param + quantisation constants),
                  the compute dtype for the rest (vision tower + projector, embeddings, LM head, norms)
    trainable     LoRA params in fp32 + their grads + AdamW's two states (16 B/param); the reward head
    stored        what backward needs, kept through the forward: with gradient checkpointing one hidden
                  state per decoder layer and token; the vision tower's block inputs per image patch
                  when it is on the autograd graph (LoRA on the tower; our loader keeps a frozen tower off
                  it, `Settings.vision_on_graph`)
    working       the largest transient: one decoder layer recomputed and back-propagated, one chunk of
                  the LM head's fp32 log-softmax (1024 target tokens at most), or one vision block
    overhead      CUDA context and allocator slack (what `nvidia-smi` shows beyond torch's allocations)

All functions are pure: architecture numbers + settings + micro-batch shape in, bytes out. The numbers
come from a config (`architecture_from_config` builds the model on the meta device and counts its
parameters by module; no weights exist) found by `find_model_config` for a local folder, a hub id, or
an offline copy of the model's config.json.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 2 ** 30

# nf4 with double quantisation (bitsandbytes): 4 bits per weight, one 8-bit absmax per 64-weight block,
# one fp32 constant per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# LoRA params are fp32 (peft upcasts adapters of a bf16/fp16 base): param + grad + AdamW exp_avg/exp_avg_sq.
ADAM_BYTES_PER_PARAM = 16
# One decoder layer's forward, recomputed in backward, in bytes per token: the tensors autograd saves
# (docs/memory.md counts them for a Qwen2/Llama layer with LoRA on all seven linears, adapters in fp32,
# no autocast: our trainers call the backbone directly, so accelerate's autocast wrapper does not apply)
# plus the incoming gradient. hidden: 2 RMSNorms (fp32 input + bf16 output, 6 B each), 7 fp32 casts of a
# LoRA input (q, k, v, o, gate, up: 4 B each), q / rotate_half(q) / q_rope / attention output /
# its contiguous copy (2 B each), repeat_kv'd k and v (2 B each), the incoming gradient (2 B).
LAYER_BYTES_PER_HIDDEN = 52
LAYER_BYTES_PER_KV = 8            # k, v, rotate_half(k), k_rope (2 B each), kv = kv_heads * head_dim
LAYER_BYTES_PER_INTERMEDIATE = 12  # gate, up, act(gate), product (2 B each) + down's fp32 LoRA input cast
# Without checkpointing every layer keeps its saved tensors (the incoming gradient aside).
# One vision block's saved tensors per patch (no LoRA on the tower): norms, qkv, attention output, MLP.
VISION_BYTES_PER_HIDDEN = 24
VISION_BYTES_PER_INTERMEDIATE = 6
# The LM head on target tokens only, chunked and checkpointed (models/logprobs.token_logps): one chunk of
# <= 1024 tokens x vocab at a time; in backward the recomputed fp32 log-softmax, its gradient, exp() and
# the bf16 cast of the result are alive together.
HEAD_CHUNK_TOKENS = 1024
HEAD_BYTES_PER_LOGIT = 14
HEAD_BYTES_PER_LOGIT_NO_GRAD = 8   # fp32 logits + fp32 log-softmax
# Forward without grad (reference pass, scoring, a generation's prefill): one layer's live tensors per token:
# residual, normed fp32 + bf16 copies, q/k/v/attention output (16 B x hidden); act(gate), up and their
# product (6 B x intermediate; gate is freed once activated).
FORWARD_BYTES_PER_HIDDEN = 16
FORWARD_BYTES_PER_INTERMEDIATE = 6
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
ALLOCATOR_SLACK = 0.08             # fraction of the activation bytes reserved but not allocated


# --------------------------------------------------------------------------------------------------
# architecture numbers

@dataclass(frozen=True)
class Architecture:
    """What the estimate needs to know about a model; `architecture_from_config` fills it from a config."""
    name: str
    family: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    # decoder linear layers by short name (q_proj, ...): (in_features, out_features, how many)
    text_linears: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    text_other_params: int = 0    # embeddings, norms, biases of the decoder (not quantised)
    lm_head_params: int = 0       # 0 when tied to the input embeddings
    vision_params: int = 0        # vision tower + projector
    vision_linear_dims: int = 0   # sum of (in + out) over the vision side's linear layers (LoRA on vision)
    vision_layers: int = 0
    vision_hidden: int = 0
    vision_intermediate: int = 0

    @property
    def text_linear_params(self) -> int:
        return sum(i * o * n for i, o, n in self.text_linears.values())

    @property
    def params(self) -> int:
        return self.text_linear_params + self.text_other_params + self.lm_head_params + self.vision_params

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def lora_params(self, r: int, targets: tuple[str, ...] | list[str], vision: bool = False) -> int:
        n = sum(r * (i + o) * k for name, (i, o, k) in self.text_linears.items() if name in set(targets))
        return n + (r * self.vision_linear_dims if vision else 0)

    def to_dict(self) -> dict:
        return asdict(self)


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def architecture_from_config(config: dict | Any, family: str, name: str = "") -> Architecture:
    """Count the model's parameters by module on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers import logging as hf_logging

    from .models.families import FAMILIES

    spec = FAMILIES[family]
    if isinstance(config, dict):
        cfg = AutoConfig.for_model(**config)
    else:
        cfg = config
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(cfg)
    finally:
        hf_logging.set_verbosity(level)
    vision_prefixes = tuple(p + "." for p in spec.vision_prefixes)
    text_prefix = spec.text_prefix + "."
    linears: dict[str, list[int]] = {}
    vision_dims = 0
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if mod_name.startswith(text_prefix):
                short = mod_name.rsplit(".", 1)[-1]
                entry = linears.setdefault(short, [module.in_features, module.out_features, 0])
                entry[2] += 1
            elif mod_name.startswith(vision_prefixes):
                vision_dims += module.in_features + module.out_features
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    seen: set[int] = set()
    text_other = vision = head_params = 0
    for p_name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p_name.startswith(vision_prefixes):
            vision += p.numel()
        elif head is not None and p is head.weight and not tied:
            head_params += p.numel()  # tied: counted once, as the input embeddings
        elif p_name.startswith(text_prefix) and p.dim() == 2 and p_name.endswith(".weight") and \
                p_name.rsplit(".", 2)[-2] in linears:
            continue  # counted in `linears`
        else:
            text_other += p.numel()
    text = cfg.get_text_config()
    vis = getattr(cfg, "vision_config", None)
    v_hidden = _get(vis, "embed_dim", "hidden_size", default=0)
    v_inter = _get(vis, "intermediate_size", default=0) or int(_get(vis, "mlp_ratio", default=4) * v_hidden)
    heads = text.num_attention_heads
    head_dim = _get(text, "head_dim", default=None) or text.hidden_size // heads
    return Architecture(
        name=name, family=family, hidden=text.hidden_size, layers=text.num_hidden_layers,
        intermediate=text.intermediate_size, heads=heads, kv_heads=_get(text, "num_key_value_heads", default=heads),
        head_dim=head_dim, vocab=text.vocab_size,
        text_linears={k: tuple(v) for k, v in sorted(linears.items())}, text_other_params=text_other,
        lm_head_params=head_params, vision_params=vision, vision_linear_dims=vision_dims,
        vision_layers=_get(vis, "depth", "num_hidden_layers", default=0), vision_hidden=v_hidden,
        vision_intermediate=v_inter)


# --------------------------------------------------------------------------------------------------
# finding a config

CONFIG_DIRS_ENV = "MMRLHF_LITE_CONFIG_DIRS"


def config_file_name(model_id: str) -> str:
    """`Qwen/Qwen2-VL-7B-Instruct` -> `Qwen--Qwen2-VL-7B-Instruct.json` (the hub cache's naming)."""
    return model_id.strip("/").replace("/", "--") + ".json"


def find_model_config(path: str, config_dirs: list[str] | tuple[str, ...] | None = None
                      ) -> tuple[dict, str]:
    """(config.json content, where it came from) for a local folder, a `tiny:` spec, an offline copy in
    one of `config_dirs` / $MMRLHF_LITE_CONFIG_DIRS (files named by `config_file_name`), or the hub
    (`AutoConfig`, which also reads the local hub cache). Raises FileNotFoundError saying what was tried."""
    if path.startswith("tiny:"):
        from .models.tiny import ensure_tiny
        path = str(ensure_tiny(path))
    local = Path(path).expanduser()
    if (local / "config.json").exists():
        return json.loads((local / "config.json").read_text()), str(local / "config.json")
    dirs = list(config_dirs or []) + [d for d in os.environ.get(CONFIG_DIRS_ENV, "").split(os.pathsep) if d]
    for d in dirs:
        f = Path(d) / config_file_name(path)
        if f.exists():
            return json.loads(f.read_text()), str(f)
    if local.exists():
        raise FileNotFoundError(f"{local} has no config.json")
    try:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - offline / unknown id: say what was tried
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = f" or {', '.join(dirs)}" if dirs else ""
        raise FileNotFoundError(f"no config for '{path}': not a local folder{where}, and the hub said: {reason}"
                                ) from None
    return cfg.to_dict(), "hub"


# --------------------------------------------------------------------------------------------------
# the estimate

@dataclass(frozen=True)
class Settings:
    """The recipe settings that change memory (see `settings_from_recipe`)."""
    load_in_4bit: bool = True
    weight_bytes: int = 2                 # bf16 / fp16 on a GPU
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_vision: bool = False
    checkpointing: bool = True
    eager_attention: bool = False
    vision_on_graph: bool | None = None   # the vision tower's activations kept for backward; None = lora_vision
    # (our loader keeps a frozen tower off the autograd graph; a step that calls transformers'
    # `enable_input_require_grads` puts it on: set True to model such a step)

    @property
    def vision_grad(self) -> bool:
        return self.lora_vision if self.vision_on_graph is None else self.vision_on_graph


@dataclass(frozen=True)
class MicroBatch:
    """What one micro-batch feeds the model."""
    rows: int                   # sequences (one per group when packed, one per response when not)
    row_tokens: int             # each row's padded length
    target_tokens: int          # tokens whose log-probs are gathered (responses; critiques)
    vision_samples: int = 0     # samples whose media the vision tower encodes (a group's, or a row's)
    patches_per_sample: int = 0  # vision-tower positions of the largest sample's images / frames

    @property
    def tokens(self) -> int:
        return self.rows * self.row_tokens


def settings_from_recipe(recipe) -> Settings:
    m = recipe.model
    return Settings(load_in_4bit=m.load_in_4bit, weight_bytes=4 if m.compute_dtype == "float32" else 2,
                    lora_r=m.lora_r, lora_targets=tuple(m.lora_target_modules), lora_vision=m.lora_vision,
                    checkpointing=m.gradient_checkpointing, eager_attention=m.attn_implementation == "eager")


def weight_bytes(arch: Architecture, s: Settings) -> dict[str, int]:
    quant = NF4_BYTES_PER_PARAM if s.load_in_4bit else s.weight_bytes
    largest = max((i * o for i, o, _ in arch.text_linears.values()), default=0)
    return {
        "decoder linears (nf4)" if s.load_in_4bit else "decoder linears": int(arch.text_linear_params * quant),
        "embeddings, norms, LM head": (arch.text_other_params + arch.lm_head_params) * s.weight_bytes,
        "vision tower + projector": arch.vision_params * s.weight_bytes,
        # a 4-bit matmul dequantises its weight: in forward, and again for the input gradient in backward
        "dequantised weight (transient)": 2 * largest * s.weight_bytes if s.load_in_4bit else 0,
    }


def trainable_bytes(arch: Architecture, s: Settings, reward_head: str | None = None) -> dict[str, int]:
    out = {"LoRA + AdamW": arch.lora_params(s.lora_r, s.lora_targets, s.lora_vision) * ADAM_BYTES_PER_PARAM}
    if reward_head:
        h = arch.hidden
        n = h * h + 2 * h + 1 if reward_head == "mlp" else h + 1
        # fp32; peft's modules_to_save keeps the original head next to the trained copy
        out["reward head + AdamW"] = n * (4 + ADAM_BYTES_PER_PARAM)
    return out


def _layer_bytes_per_token(arch: Architecture) -> int:
    return (LAYER_BYTES_PER_HIDDEN * arch.hidden + LAYER_BYTES_PER_KV * arch.kv_dim
            + LAYER_BYTES_PER_INTERMEDIATE * arch.intermediate)


def _vision_block_bytes_per_patch(arch: Architecture) -> int:
    return VISION_BYTES_PER_HIDDEN * arch.vision_hidden + VISION_BYTES_PER_INTERMEDIATE * arch.vision_intermediate


def _attention_scores_bytes(arch: Architecture, mb: MicroBatch, s: Settings) -> int:
    """Eager attention materialises (rows, heads, L, L) scores and their softmax (SDPA does not)."""
    return mb.rows * arch.heads * mb.row_tokens ** 2 * 3 * s.weight_bytes if s.eager_attention else 0


def training_activation_bytes(arch: Architecture, s: Settings, mb: MicroBatch) -> dict[str, int]:
    """Stored activations and the largest transient of one training micro-batch."""
    b = s.weight_bytes
    layer = _layer_bytes_per_token(arch)
    patches = mb.vision_samples * mb.patches_per_sample
    if s.checkpointing:
        stored_text = (arch.layers + 2) * arch.hidden * b * mb.tokens   # layer inputs + embeddings + final norm
        stored_vision = (arch.vision_layers + 2) * arch.vision_hidden * b * patches
        layer_working = layer * mb.tokens + _attention_scores_bytes(arch, mb, s)
        vision_working = _vision_block_bytes_per_patch(arch) * patches
    else:
        stored_text = arch.layers * layer * mb.tokens + arch.layers * _attention_scores_bytes(arch, mb, s)
        stored_vision = arch.vision_layers * _vision_block_bytes_per_patch(arch) * patches
        layer_working = 2 * arch.hidden * b * mb.tokens
        vision_working = 0
    if not s.vision_grad:  # a frozen tower off the graph: nothing stored, one block's forward transients
        stored_vision = 0
        vision_working = _vision_block_bytes_per_patch(arch) * patches // 2
    head_working = min(mb.target_tokens, HEAD_CHUNK_TOKENS) * arch.vocab * HEAD_BYTES_PER_LOGIT
    working = {"one decoder layer (recompute + backward)": layer_working,
               "LM head chunk (fp32 log-softmax)": head_working, "one vision block": vision_working}
    top = max(working, key=working.get)
    return {"stored: decoder layer inputs" if s.checkpointing else "stored: decoder activations": stored_text,
            "stored: vision tower": stored_vision, f"working: {top}": working[top]}


def forward_activation_bytes(arch: Architecture, s: Settings, mb: MicroBatch) -> dict[str, int]:
    """A forward without gradients (reference log-probs, reward scoring): transients only."""
    layer = (FORWARD_BYTES_PER_HIDDEN * arch.hidden + FORWARD_BYTES_PER_INTERMEDIATE * arch.intermediate) * mb.tokens
    layer += _attention_scores_bytes(arch, mb, s)
    head = min(mb.target_tokens, HEAD_CHUNK_TOKENS) * arch.vocab * HEAD_BYTES_PER_LOGIT_NO_GRAD
    vision = _vision_block_bytes_per_patch(arch) * mb.vision_samples * mb.patches_per_sample // 2
    working = {"one decoder layer": layer, "LM head chunk": head, "one vision block": vision}
    top = max(working, key=working.get)
    return {"hidden states": 2 * arch.hidden * s.weight_bytes * mb.tokens, f"working: {top}": working[top]}


def generation_bytes(arch: Architecture, s: Settings, batch: int, prompt_tokens: int, new_tokens: int,
                     vision_samples: int = 0, patches_per_sample: int = 0) -> dict[str, int]:
    """`generate()` with a KV cache: the cache, the prefill's largest layer transient, last-token logits."""
    b = s.weight_bytes
    cache = 2 * arch.layers * arch.kv_dim * b * batch * (prompt_tokens + new_tokens)
    prefill = (FORWARD_BYTES_PER_HIDDEN * arch.hidden + FORWARD_BYTES_PER_INTERMEDIATE * arch.intermediate) \
        * batch * prompt_tokens
    vision = _vision_block_bytes_per_patch(arch) * vision_samples * patches_per_sample // 2
    return {"KV cache": cache, "working: prefill layer": max(prefill, vision),
            "last-token logits": batch * arch.vocab * 4 * 2}


@dataclass
class Estimate:
    stage: str
    components: dict[str, int]
    activation_keys: tuple[str, ...]

    @property
    def allocated(self) -> int:
        """Peak of torch's allocated memory (what `torch.cuda.max_memory_allocated` reports)."""
        return sum(self.components.values())

    @property
    def needed(self) -> int:
        """What the GPU must have free: allocated peak + allocator slack on activations + CUDA context."""
        act = sum(self.components[k] for k in self.activation_keys)
        return int(self.allocated + ALLOCATOR_SLACK * act + CUDA_CONTEXT_BYTES)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "allocated_gib": round(self.allocated / GIB, 2),
                "needed_gib": round(self.needed / GIB, 2),
                "components_gib": {k: round(v / GIB, 3) for k, v in self.components.items()}}


def estimate_training(arch: Architecture, s: Settings, mb: MicroBatch, stage: str = "dpo",
                      reward_head: str | None = None) -> Estimate:
    act = training_activation_bytes(arch, s, mb)
    comps = {**weight_bytes(arch, s), **trainable_bytes(arch, s, reward_head), **act}
    return Estimate(stage, comps, tuple(act))


def estimate_forward(arch: Architecture, s: Settings, mb: MicroBatch, stage: str = "reference",
                     reward_head: str | None = None) -> Estimate:
    act = forward_activation_bytes(arch, s, mb)
    comps = {**weight_bytes(arch, s), **act}
    if reward_head:
        comps["reward head"] = (arch.hidden ** 2 if reward_head == "mlp" else arch.hidden) * 4
    return Estimate(stage, comps, tuple(act))


def estimate_generation(arch: Architecture, s: Settings, batch: int, prompt_tokens: int, new_tokens: int,
                        stage: str = "score", vision_samples: int = 0, patches_per_sample: int = 0) -> Estimate:
    act = generation_bytes(arch, s, batch, prompt_tokens, new_tokens, vision_samples, patches_per_sample)
    return Estimate(stage, {**weight_bytes(arch, s), **act}, tuple(act))


# --------------------------------------------------------------------------------------------------
# budgets

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*$", re.I)


def parse_memory(text: str) -> int:
    """`16GB` (10^9 bytes, as GPU spec sheets count), `16GiB` (2^30), `15.5g`, `16000MB` -> bytes. A T4's
    "16 GB" is 15.0 GiB as the driver reports it, so reading GB as 10^9 (14.9 GiB) errs on the safe side."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot read memory size {text!r}; use e.g. 16GB or 24GiB")
    value, unit = float(m.group(1)), (m.group(2) or "gb").lower()
    scale = {"gib": GIB, "gb": 10 ** 9, "g": 10 ** 9, "mib": 2 ** 20, "mb": 10 ** 6, "m": 10 ** 6}[unit]
    return int(value * scale)


def detect_gpu() -> tuple[str, int] | None:
    """(name, total bytes) of CUDA device 0, or None without a GPU."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return props.name, int(props.total_memory)
    except Exception:  # noqa: BLE001 - no driver, broken install: no GPU to compare with
        return None


def fits(estimate: Estimate, budget: int) -> bool:
    return estimate.needed <= budget






# --------------------------------------------------------------------------------------------------
# FSDP2 over N GPUs (docs/distributed.md): the training stages' weights and trainable state are sharded

SHARDED_KEYS = ("decoder linears", "decoder linears (nf4)", "LoRA + AdamW", "reward head + AdamW")
ROOT_KEYS = ("embeddings, norms, LM head", "vision tower + projector")   # the root unit: gathered for a step
GATHERED_BLOCKS = 2   # the block running and the one prefetched


def fsdp_training_estimate(stage: dict, processes: int, layers: int, load: dict | None = None) -> dict:
    """Per-GPU memory of a training stage (a `Estimate.to_dict()`) when FSDP2 shards the base over
    `processes` GPUs as the trainers do: each decoder layer is a unit, gathered only while it runs
    (about `GATHERED_BLOCKS` decoder blocks at a time); the root unit (embeddings, norms, LM head, the
    vision tower and merger, reward head) stays gathered through the forward and backward, so it counts in
    full plus its 1/N shard. LoRA and AdamW states are sharded too; activations are those of one GPU's
    micro-batch. `load` (`largest_linear`, `weight_bytes`, `load_in_4bit`): also the peak while the base is
    loaded (`fsdp_load_estimate`); the stage needs the larger of the two."""
    comps = dict(stage["components_gib"])
    out: dict[str, float] = {}
    for k, v in comps.items():
        if k in SHARDED_KEYS:
            out[k + f" / {processes}"] = v / processes
        elif k in ROOT_KEYS:
            out[k + " (gathered)"] = v + v / processes
        else:
            out[k] = v
    block = comps.get("decoder linears", comps.get("decoder linears (nf4)", 0.0)) / max(1, layers)
    out[f"{GATHERED_BLOCKS} gathered blocks"] = GATHERED_BLOCKS * block
    allocated = sum(out.values())
    overhead = stage["needed_gib"] - stage["allocated_gib"]   # allocator slack on activations + CUDA context
    result = {"allocated_gib": round(allocated, 2), "needed_gib": round(allocated + overhead, 2),
              "components_gib": {k: round(v, 3) for k, v in out.items()}}
    if load is not None:
        result["load"] = fsdp_load_estimate(stage, processes, **load)
        result["needed_gib"] = max(result["needed_gib"], result["load"]["needed_gib"])
    return result


def fsdp_load_estimate(stage: dict, processes: int, largest_linear: int, weight_bytes: int,
                       load_in_4bit: bool) -> dict:
    """Per-GPU memory while a training stage loads its model under FSDP2 (`load_model(..., shard=True)`,
    models/sharded_loading.py): the shards only, 1/N of every weight and of the trainable parameters, and
    for a 4-bit base one decoder linear at a time read whole in the compute dtype and quantised on the GPU
    (`largest_linear` parameters, plus its packed copy). `whole_base_gib`: what a rank that loaded the base
    whole before sharding it would hold (the weights of one GPU), for comparison."""
    comps = stage["components_gib"]
    out = {f"{k} / {processes}": comps[k] / processes for k in SHARDED_KEYS + ROOT_KEYS if k in comps}
    if load_in_4bit:
        out["one linear read whole + packed"] = largest_linear * (weight_bytes + NF4_BYTES_PER_PARAM) / GIB
    allocated = sum(out.values())
    whole = sum(comps.get(k, 0.0) for k in SHARDED_KEYS + ROOT_KEYS)
    return {"allocated_gib": round(allocated, 2), "needed_gib": round(allocated + CUDA_CONTEXT_BYTES / GIB, 2),
            "whole_base_gib": round(whole + CUDA_CONTEXT_BYTES / GIB, 2),
            "components_gib": {k: round(v, 3) for k, v in out.items()}}
