"""`load_model(model_cfg) -> (model, processor)`: one entry point whatever the backend.

    python -c "from mmrlhf_lite.recipe import load_recipe; from mmrlhf_lite.models.loading import load_model; \
print(load_model(load_recipe('recipes/demo.yaml').model)[0])"

Backends: `unsloth` (FastVisionModel, CUDA only, only when asked for), `transformers` (bitsandbytes nf4 +
double quant, peft LoRA; also runs on CPU). `auto` = transformers: the unsloth path has not yet been run
end to end here (its attention on the packed mask, policy == reference at step 0, `lora_target_modules`),
so it is not picked for you; `auto` says so when unsloth would have been usable.
The 4-bit model keeps every non-quantised weight in the compute dtype: peft's
`prepare_model_for_kbit_training` would upcast them to fp32 (3x slower, +50% memory on a 7B step),
so gradient checkpointing and input gradients are enabled here directly.

One model in memory at a time: the pre-flight's estimates (docs/memory.md) count one, so a stage that loads a
second model drops its references to the first before (`release_memory`); `load_model` logs a warning naming
any model still alive when it loads another (`models_in_memory`).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import json
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..recipe import ModelConfig
from .families import FamilySpec, apply_pixel_limits, cap_model_grid, detect_family
from .precision import auto_dtype, native_bf16
from .reward_score import RewardHead, processor_without_torchvision

log = logging.getLogger(__name__)

META_FILE = "mmrlhf_lite.json"

_IN_MEMORY: weakref.WeakSet = weakref.WeakSet()   # every model load_model returned that is still referenced


def release_memory() -> None:
    """Collect what the caller has dropped and return the CUDA allocator's cached blocks to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def models_in_memory(collect: bool = True) -> list[str]:
    """What each model loaded by `load_model` and still referenced somewhere was loaded from (after a garbage
    collection, unless the caller just ran one)."""
    if collect:
        gc.collect()
    return sorted(getattr(getattr(m, "mmrlhf", None), "what", "?") for m in list(_IN_MEMORY))


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def _rebuild_hint(folder: Path) -> str:
    """What rebuilds a saved folder: the stage that wrote it (`<run>/reward/final`, `<run>/dpo/final`)."""
    parts = folder.resolve().parts
    for stage in ("reward", "dpo"):
        if stage in parts[-3:]:
            return f"rebuild it with --redo {stage} (in the run that trained it)"
    if any(part.startswith("tiny") for part in parts[-3:]):
        return "delete the folder; the tiny model is rebuilt on the next run"
    return "restore or download the model files again"


def check_saved_files(folder: str | os.PathLike, what: str) -> None:
    """Refuse a damaged saved model or adapter before a library trips over it, naming the file: each JSON
    config must parse to an object, each .safetensors file's header must read (a truncated or zeroed
    file fails here, cheaply: only the header is read)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return
    for f in sorted(folder.iterdir()):
        problem = None
        if f.suffix == ".json" and f.is_file() and f.stat().st_size < 1 << 24:
            try:
                if not isinstance(json.loads(f.read_bytes()), dict) and f.name.endswith("config.json"):
                    problem = "not a JSON object"
            except (ValueError, RecursionError) as exc:
                problem = f"not valid JSON ({exc.__class__.__name__})"
        elif f.suffix == ".safetensors" and f.is_file():
            try:
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the file is unreadable
                problem = f"unreadable safetensors ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        if problem:
            raise ModelLoadError(f"{what} file {f} is damaged: {problem}; {_rebuild_hint(folder)}")


@dataclass
class LoadedModel:
    """What the rest of the code needs besides the module itself."""
    path: str
    family: FamilySpec
    backend: str
    device: torch.device
    dtype: torch.dtype
    what: str = ""      # the base folder, and the adapter folder when one was loaded


def resolve_model_path(path: str) -> str:
    if path.startswith("tiny:"):
        from .tiny import ensure_tiny
        return str(ensure_tiny(path))
    return path


def in_hub_cache(repo_id: str) -> bool:
    """Whether a hub id's config is in the local Hugging Face cache (an offline run can load it)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id
        return False


def resolve_device(name: str) -> torch.device:
    """`auto`/`cuda` -> the GPU of this process: under torchrun / accelerate launch, `cuda:LOCAL_RANK`
    (each rank holds its own copy of the 4-bit base and LoRA), else `cuda`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but no CUDA GPU is visible; use model.device=auto or cpu")
    if name == "cuda" and "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ModelLoadError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible; launch at "
                                 f"most that many processes per node (--nproc_per_node)")
        return torch.device(f"cuda:{local}")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU with native bf16, float16 on older GPUs (a T4), float32 on CPU
    (models/precision.py); an explicit bfloat16 on a GPU without native bf16 runs emulated, with a warning."""
    if name == "auto":
        return auto_dtype(device)
    dtype = getattr(torch, name)
    if dtype == torch.bfloat16 and device.type == "cuda" and not native_bf16(device):
        log.warning("model.compute_dtype=bfloat16 on a GPU without native bf16 (compute capability %s < 8.0): it is "
                    "emulated, slowly, and SDPA falls back to its math kernel; model.compute_dtype=auto uses float16",
                    ".".join(map(str, torch.cuda.get_device_capability(device))))
    return dtype


def unsloth_available() -> bool:
    """Whether the unsloth backend could run here: CUDA and an installed unsloth. Looked up without importing
    it: importing unsloth patches transformers, peft and TRL process-wide, and this is asked for every
    `backend: auto` load and every cache key, so a transformers run on a machine with requirements-gpu.txt
    installed would otherwise train on unsloth's patched classes. unsloth is imported on its own path only
    (`_load_unsloth`)."""
    if not torch.cuda.is_available():
        return False
    try:
        return importlib.util.find_spec("unsloth") is not None
    except (ImportError, ValueError):  # a broken install: a module without a spec, a failing parent
        return False


AUTO_BACKEND_NOTE = ("model.backend=auto uses transformers: the unsloth backend is not verified yet (packed "
                     "attention mask, policy == reference at step 0, model.lora_target_modules are unchecked); "
                     "set model.backend=unsloth to use it anyway")


def resolve_backend(cfg: ModelConfig, device: torch.device, family: FamilySpec) -> str:
    """`unsloth` only when asked for; `auto` is transformers (logs AUTO_BACKEND_NOTE where unsloth would run)."""
    if cfg.backend == "unsloth":
        if device.type != "cuda":
            raise ModelLoadError("model.backend=unsloth needs a CUDA GPU (FastVisionModel is CUDA only); "
                                 "use model.backend=transformers (4-bit also works on CPU) or auto")
        if not unsloth_available():
            raise ModelLoadError("model.backend=unsloth but unsloth is not installed; "
                                 "pip install -r requirements-gpu.txt, or use model.backend=transformers")
        return "unsloth"
    if cfg.backend == "auto" and device.type == "cuda" and family.unsloth and unsloth_available():
        log.warning(AUTO_BACKEND_NOTE)
    return "transformers"


# --------------------------------------------------------------------------------------------------
# processor

def _torchvision_available() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # noqa: BLE001
        return False


def local_processor_files(path: str) -> str:
    """A hub id's tokenizer/processor files (no weights) as a local folder, for the torchvision-free
    path that reads them by file name; a local folder is returned as is."""
    if Path(path).exists():
        return path
    from huggingface_hub import snapshot_download
    return snapshot_download(str(path), allow_patterns=["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"])


def load_processor(path: str, family: FamilySpec, cfg: ModelConfig | None = None):
    """AutoProcessor where it works; without torchvision, the family's PIL image processor and no video one."""
    import transformers

    trust = bool(cfg and cfg.trust_remote_code)
    if _torchvision_available():
        processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust)
    else:
        processor = processor_without_torchvision(local_processor_files(path),
                                                  getattr(transformers, family.processor_class),
                                                  family.image_processor_type(), trust)
    if cfg is not None:
        for note in apply_pixel_limits(processor.image_processor, family, cfg.min_pixels, cfg.max_pixels):
            log.warning(note)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


# --------------------------------------------------------------------------------------------------
# model

def _quantization_config(cfg: ModelConfig, family: FamilySpec, dtype: torch.dtype):
    if not cfg.load_in_4bit:
        return None
    try:
        importlib.import_module("bitsandbytes")
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"model.load_in_4bit needs bitsandbytes ({exc}); pip install bitsandbytes, "
                             "or set model.load_in_4bit=false") from None
    from transformers import BitsAndBytesConfig

    from ..distributed import sharding
    # FSDP2 shards a parameter by its storage: the packed nf4 bytes are stored as the compute dtype so that
    # they shard (and gather) with the block's other weights; the dequantised values are the same
    storage = {"bnb_4bit_quant_storage": dtype} if sharding() else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(family.skip_4bit), **storage)


def disable_bnb_cpu_packed_kernel(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes switches eval-mode no-grad 4-bit matmuls to a packed kernel
    that needs a hub download and crashes offline (or, where it loads, computes differently from the
    training path); keep the portable kernel. Also for a 4-bit model loaded elsewhere (TRL's, in bench/gate.py)."""
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_target_names(model: torch.nn.Module, family: FamilySpec, cfg: ModelConfig) -> list[str]:
    """Full module names LoRA wraps: the language model's named linears, plus (optionally) every linear
    of the vision tower/projector. Anchoring on the module path keeps Qwen2.5-VL's vision MLP (which
    reuses gate/up/down_proj) out unless asked for."""
    wanted = set(cfg.lora_target_modules)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) and type(module).__name__ not in ("Linear4bit", "Linear8bitLt"):
            continue
        if name.startswith(family.text_prefix + ".") and name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
        elif cfg.lora_vision and any(name.startswith(p + ".") or name == p for p in family.vision_prefixes):
            names.append(name)
    if not names:
        raise ModelLoadError(f"no linear layer named {sorted(wanted)} under '{family.text_prefix}'; "
                             "check model.lora_target_modules")
    return names


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing, with grads enabled on the text embeddings' output only.

    transformers' `gradient_checkpointing_enable` calls `enable_input_require_grads`, which hooks every
    sub-model's input embeddings, the vision tower's patch embedding included: that kept a frozen vision
    tower on the autograd graph (its activations stored and back-propagated through for nothing). Those
    hooks are removed; only the language model's inputs need one. With LoRA on the vision tower its own
    trainable weights put it on the graph.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()
    base.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    base.config.use_cache = False


def load_model(cfg: ModelConfig, *, adapter: str | os.PathLike | None = None, trainable: bool = True,
               reward_head: dict | None = None, lora: bool = True, shard: bool = False):
    """Load model + processor.

    adapter: a saved adapter folder to load (trainable or frozen); else a fresh LoRA when `lora`.
    reward_head: {"kind": "mlp"|"linear", "dropout": p} attaches a scalar head saved with the adapter.
    shard: the caller holds the model sharded under an FSDP2 launch (the reward and dpo trainers, score,
    reference: `distributed.shard`); there the base is loaded straight into its shards, never whole
    (models/sharded_loading.py). One process or a DDP launch: ignored. Collective under FSDP2.
    Returns (model, processor); `model.mmrlhf` is a `LoadedModel` with family/backend/device/dtype.
    """
    path = resolve_model_path(cfg.path)
    release_memory()
    if _IN_MEMORY and (alive := models_in_memory(collect=False)):   # (release_memory collected)
        log.warning("loading a model while %d loaded before %s still in memory (%s): the memory they hold "
                    "adds up, and the pre-flight's estimate counts one model", len(alive),
                    "is" if len(alive) == 1 else "are", "; ".join(alive))
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1" and not in_hub_cache(path):
        raise ModelLoadError(f"model.path '{cfg.path}' is not a local folder, not in the Hugging Face cache, "
                             "and the hub is offline (HF_HUB_OFFLINE=1)")
    try:
        family = detect_family(path, cfg.family)
    except (ValueError, FileNotFoundError) as exc:
        raise ModelLoadError(str(exc)) from None
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.compute_dtype, device)
    backend = resolve_backend(cfg, device, family)
    if Path(path).is_dir():
        check_saved_files(path, "model")
    if adapter is not None:
        check_saved_files(adapter, "saved adapter")
        meta_path = Path(adapter) / META_FILE
        if meta_path.exists() and reward_head is None:
            reward_head = json.loads(meta_path.read_bytes()).get("reward_head")

    if backend == "unsloth":
        model = _load_unsloth(path, cfg, family, dtype, adapter, trainable, reward_head, lora)
    else:
        model = _load_transformers(path, cfg, family, device, dtype, adapter, trainable, reward_head, lora, shard)
    cap_model_grid(model, family, cfg.max_pixels)
    processor = load_processor(path, family, cfg)
    model.mmrlhf = LoadedModel(path=path, family=family, backend=backend, device=device, dtype=dtype,
                               what=f"{path}" + (f" + {adapter}" if adapter is not None else ""))
    _IN_MEMORY.add(model)
    return model, processor


def _load_transformers(path, cfg, family, device, dtype, adapter, trainable, reward_head, lora, shard=False):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    from ..distributed import shards_base

    quant = _quantization_config(cfg, family, dtype)
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=cfg.attn_implementation,
                                  trust_remote_code=cfg.trust_remote_code)
    if quant is not None:
        kwargs["quantization_config"] = quant

    def attach(model):
        """What follows `from_pretrained`: frozen base, reward head, adapter or fresh LoRA, checkpointing."""
        for p in model.parameters():
            p.requires_grad_(False)
        if reward_head is not None:
            hidden = model.config.get_text_config().hidden_size
            model.reward_head = RewardHead(hidden, reward_head.get("kind", "mlp"), reward_head.get("dropout", 0.0),
                                           reward_head.get("response_logp_weight", 0.0)).to(
                device=device, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
        elif lora:
            targets = lora_target_names(model, family, cfg)
            lora_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=targets, bias="none",
                                  modules_to_save=["reward_head"] if reward_head is not None else None)
            model = get_peft_model(model, lora_cfg)
        if trainable and cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if not trainable:
            model.eval()
        return model

    def pretrained(**placement):
        try:
            with _quiet_transformers():
                return AutoModelForImageTextToText.from_pretrained(path, **kwargs, **placement)
        except OSError as exc:
            raise ModelLoadError(f"cannot load model from '{path}': {exc}") from None

    if shard and shards_base():
        from .sharded_loading import ShardedLoadError, load_sharded
        try:
            model = load_sharded(path, pretrained, device, attach)
        except ShardedLoadError as exc:
            raise ModelLoadError(f"cannot load model '{path}' sharded (FSDP2): {exc}") from None
    else:
        model = pretrained(**({"device_map": {"": str(device)}} if quant is not None else {}))
        if quant is None:
            model.to(device)
        if device.type == "cpu":
            disable_bnb_cpu_packed_kernel(model)
        model = attach(model)
    if device.type == "cpu":
        disable_bnb_cpu_packed_kernel(model)
    return model


def _load_unsloth(path, cfg, family, dtype, adapter, trainable, reward_head, lora):  # pragma: no cover - CUDA
    try:
        from unsloth import FastVisionModel  # noqa: I001 - imported here only: it patches libraries process-wide
    except Exception as exc:  # noqa: BLE001 - an install that find_spec sees but that does not import
        raise ModelLoadError(f"model.backend=unsloth but importing unsloth failed ({type(exc).__name__}: {exc}); "
                             "reinstall it (pip install -r requirements-gpu.txt) or use "
                             "model.backend=transformers") from None

    model, _ = FastVisionModel.from_pretrained(path, load_in_4bit=cfg.load_in_4bit, dtype=dtype,
                                               use_gradient_checkpointing=cfg.gradient_checkpointing and trainable,
                                               trust_remote_code=cfg.trust_remote_code)
    if reward_head is not None:
        hidden = model.config.get_text_config().hidden_size
        model.reward_head = RewardHead(hidden, reward_head.get("kind", "mlp"), reward_head.get("dropout", 0.0),
                                       reward_head.get("response_logp_weight", 0.0)).to(
            device=model.device, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    elif lora:
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=cfg.lora_vision, finetune_language_layers=True,
            finetune_attention_modules=True, finetune_mlp_modules=True, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout, bias="none",
            modules_to_save=["reward_head"] if reward_head is not None else None)
    if trainable:
        FastVisionModel.for_training(model)
    else:
        FastVisionModel.for_inference(model)
    return model


@contextlib.contextmanager
def _quiet_transformers():
    from transformers import logging as hf_logging
    from transformers.utils import logging as tl

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = tl.is_progress_bar_enabled()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            tl.enable_progress_bar()


def save_adapter(model, out_dir: str | os.PathLike, state_dict: dict | None = None, **meta: Any) -> Path:
    """Adapter (+ reward head, saved by peft as a module-to-save) and a small JSON of how to reload it.
    `state_dict`: the trainable parameters as full tensors by name, for a model whose parameters are
    sharded (`distributed.trainable_state`, gathered on every rank); the saved adapter is the same as one
    process would write."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        model.save_pretrained(str(out))
    else:
        model.save_pretrained(str(out), state_dict=state_dict)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "reward_head", None)
    info = {"base_model": getattr(model, "mmrlhf", None) and model.mmrlhf.path, **meta}
    if head is not None:
        info["reward_head"] = {"kind": head.kind, "dropout": head.dropout_p,
                               "response_logp_weight": getattr(head, "response_logp_weight", 0.0)}
    (out / META_FILE).write_text(json.dumps(info, indent=2, default=str))
    return out
