"""Loading a base straight into its FSDP2 shards: no rank ever holds the whole base, in memory or on its GPU.

FSDP2 exists for a base that does not fit one GPU, so the base cannot be loaded whole on every rank and
sharded after (a plain `from_pretrained` before `distributed.shard_model`). Under an FSDP2 launch
`load_model(..., shard=True)` comes here instead; every rank:
1. builds the model on the meta device with transformers' own `from_pretrained(device_map="meta")`: the same
   modules, dtypes and 4-bit layers as a normal load, and no weights;
2. computes the buffers (rotary frequencies: transformers' own `initialize_weights`; persistent ones read from
   the checkpoint), gives the base weights placeholders that take no memory (CPU tensors never written: the
   kernel maps no page until one is), and attaches the reward head, the adapter or a fresh LoRA as a normal
   load does: the same random draws, so the LoRA and the head equal a one-process run's;
3. puts the base weights back on the meta device and shards the model (`distributed.shard_model`): the base
   stays on meta, sharded; the trainable parameters and buffers go to the rank's device, sharded;
4. allocates its shards (`to_empty`) and reads into them its rows of each base weight from the checkpoint's
   safetensors files, with plain file reads (a memory map would count the file's pages against the
   process): a rank reads 1/N of every weight. A 4-bit weight is read whole, one at a time, quantised as
   transformers quantises it (bitsandbytes nf4 with its storage in the compute dtype; the quantisation
   state stays on the module, where bitsandbytes finds it after FSDP gathers the weight), and only its rows
   of the packed result are kept.
Beyond its shards a rank holds, while loading, one weight read whole (4-bit) or one weight's rows: the
largest weight bounds it (`memory.fsdp_load_estimate`). The shards equal those of a normal load sharded
after, value for value (tested in bf16 and 4-bit).

A checkpoint whose tensors transformers converts on load beyond renaming them (fused or split weights) is
refused with what to do. The tiny twins of the five families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA-OneVision, Idefics3) load this way equal bit for bit, fp32 and 4-bit (by hand; the test runs Qwen2-VL);
checkpoints saved in the hub's older key layouts are read through transformers' own renaming, reverted.

    python -m pytest tests/test_fsdp_loading.py -q
"""
from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class ShardedLoadError(RuntimeError):
    """The checkpoint cannot be loaded straight into shards (the message says why and what to do)."""


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int   # of its first byte in the file

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint:
    """The tensors of a folder's safetensors files (`model.safetensors`, or the shards that
    `model.safetensors.index.json` names), read by rows of their first dimension with plain file reads."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ShardedLoadError(f"{folder} holds no .safetensors weights: a base loaded sharded (FSDP2) is read "
                                   "from safetensors files; save it with save_pretrained(safe_serialization=True)")
        self.tensors: dict[str, StoredTensor] = {}
        for f in files:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise ShardedLoadError(f"{f}: tensor {key} is stored as {info['dtype']}, which this loader does "
                                           "not read; launch with recipes/accelerate/ddp.yaml instead")
                self.tensors[key] = StoredTensor(f, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                                 8 + size + info["data_offsets"][0])

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the tensor (all of it by default), in its stored dtype."""
        t = self.tensors[key]
        if not t.shape:   # a scalar: read whole
            start, stop, shape = 0, 1, ()
        else:
            stop = t.shape[0] if stop is None else stop
            shape = (stop - start, *t.shape[1:])
        buf = bytearray((stop - start) * t.row_bytes)
        if not buf:
            return torch.empty(shape, dtype=t.dtype)
        with open(t.file, "rb", buffering=0) as fh:
            fh.seek(t.offset + start * t.row_bytes)
            view, done = memoryview(buf), 0
            while done < len(buf):
                n = fh.readinto(view[done:])
                if not n:
                    raise ShardedLoadError(f"{t.file} ends inside tensor {key}: the file is truncated; restore or "
                                           "download the model files again")
                done += n
        return torch.frombuffer(buf, dtype=t.dtype).reshape(shape)


def checkpoint_folder(path: str) -> Path:
    """A local folder as is; a hub id's snapshot in the Hugging Face cache (weights and configs)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(path), allow_patterns=["*.safetensors", "*.json"]))


@dataclass
class BaseWeight:
    """A base parameter of the skeleton and where it comes from."""
    module: torch.nn.Module
    name: str                          # its attribute on the module
    key: str                           # its checkpoint tensor
    dtype: torch.dtype                 # what a normal load casts the checkpoint tensor to
    shape: tuple[int, ...]             # unquantised
    quantization: dict[str, Any] | None = None   # a bitsandbytes 4-bit weight: its Params4bit settings


def _owners(skeleton: torch.nn.Module, persistent_buffers: bool) -> dict[int, list[tuple[torch.nn.Module, str, str]]]:
    """Per tensor (by id): the (module, attribute, full name) places it is found at (a tied weight: several)."""
    out: dict[int, list] = {}
    for prefix, module in skeleton.named_modules():
        items = list(module._parameters.items()) if not persistent_buffers else [
            (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for name, t in items:
            if t is not None:
                out.setdefault(id(t), []).append((module, name, f"{prefix}.{name}" if prefix else name))
    return out


def _stored_names(skeleton: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Full name -> the checkpoint key transformers reads it from (its load-time renaming, reverted)."""
    from transformers.core_model_loading import revert_weight_conversion

    by_id = {id(t): name for name, t in tensors.items()}
    return {by_id[id(t)]: key for key, t in revert_weight_conversion(skeleton, dict(tensors)).items() if id(t) in by_id}


def _key_of(places: list, stored_as: dict[str, str], checkpoint: Checkpoint) -> str:
    for _, _, full in places:
        for key in (stored_as.get(full), full):
            if key and key in checkpoint:
                return key
    raise ShardedLoadError(
        f"the checkpoint has no tensor for {places[0][2]} (transformers converts this model's weights on load "
        "beyond renaming them, or the checkpoint is incomplete): it cannot be loaded straight into shards; launch "
        "with recipes/accelerate/ddp.yaml (each GPU holds the whole 4-bit base) instead")


def base_weights(skeleton: torch.nn.Module, checkpoint: Checkpoint) -> list[BaseWeight]:
    """The skeleton's parameters with their checkpoint keys: the key transformers would read (its own
    renaming, reverted), else the parameter's own name."""
    owners = _owners(skeleton, persistent_buffers=False)
    named = {full: t for places in owners.values() for m, n, full in places for t in [m._parameters[n]]}
    stored_as = _stored_names(skeleton, named)
    out = []
    for places in owners.values():
        module, name, full = places[0]
        t = module._parameters[name]
        key = _key_of(places, stored_as, checkpoint)
        if tuple(checkpoint.tensors[key].shape) != tuple(t.shape):
            raise ShardedLoadError(f"{key}: shape {list(checkpoint.tensors[key].shape)} in the checkpoint, "
                                   f"{list(t.shape)} in the model ({full})")
        quantization = {k: getattr(t, k) for k in ("blocksize", "compress_statistics", "quant_type", "quant_storage")
                        } if type(t).__name__ == "Params4bit" else None
        out.append(BaseWeight(module, name, key, t.dtype, tuple(t.shape), quantization))
    return out


def compute_buffers(skeleton: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Every buffer of the meta skeleton on the CPU: persistent ones read from the checkpoint, the others
    (rotary frequencies) computed by transformers' `initialize_weights`, told that every parameter is loaded
    (it then writes no parameter and draws no random number)."""
    owners = _owners(skeleton, persistent_buffers=True)
    named = {full: m._buffers[n] for places in owners.values() for m, n, full in places}
    stored_as = _stored_names(skeleton, named)
    for places in owners.values():
        key = next((k for _, _, full in places for k in (stored_as.get(full), full) if k and k in checkpoint), None)
        if key is None:
            continue   # not stored: initialised below, as a normal load initialises it
        value = checkpoint.read(key).to(places[0][0]._buffers[places[0][1]].dtype)
        value._is_hf_initialized = True
        for module, name, _ in places:
            module._buffers[name] = value
    for module in skeleton.modules():
        for name, t in module._buffers.items():
            if t is not None and t.is_meta:
                module._buffers[name] = torch.empty(t.shape, dtype=t.dtype)
        if hasattr(module, "_is_hf_initialized"):
            module._is_hf_initialized = False
    for p in skeleton.parameters():
        p._is_hf_initialized = True
    skeleton.initialize_weights()


def _new_weight(w: BaseWeight, device: str) -> torch.nn.Parameter:
    """An unwritten tensor on `device` for a base weight: a 4-bit one as a `Params4bit` of its packed shape
    (two values a byte, in its storage dtype), which is what FSDP shards."""
    if w.quantization is None:
        return torch.nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device=device), requires_grad=False)
    import bitsandbytes as bnb

    storage = w.quantization["quant_storage"]
    packed = ((math.prod(w.shape) + 1) // (torch.empty((), dtype=storage).element_size() * 2), 1)
    return bnb.nn.Params4bit(torch.empty(packed, dtype=storage, device=device), requires_grad=False,
                             bnb_quantized=True, module=w.module, **w.quantization)


def place_weights(model: torch.nn.Module, weights: list[BaseWeight], device: str) -> None:
    """Give every base weight a fresh unwritten tensor on `device` ("cpu" or "meta"), everywhere it appears
    (tied weights stay tied)."""
    new: dict[int, torch.nn.Parameter] = {}
    for w in weights:
        old = w.module._parameters[w.name]
        if id(old) not in new:
            new[id(old)] = _new_weight(w, device)
    for module in model.modules():
        for name, t in module._parameters.items():
            if t is not None and id(t) in new:
                module._parameters[name] = new[id(t)]


def allocate_shards(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate the shards of the weights FSDP sharded on the meta device (`to_empty`), keeping the values
    of everything already on `device` (trainable parameters, buffers)."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    keep = [(module, kind, name, local(t).detach().clone())
            for module in model.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(module, kind).items() if t is not None and not t.is_meta]
    model.to_empty(device=device)
    with torch.no_grad():
        for module, kind, name, value in keep:
            local(getattr(module, kind)[name]).copy_(value)


def release_freed_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc `malloc_trim`; elsewhere nothing). A whole
    weight read for quantisation is freed at once, but glibc keeps freed heap blocks that smaller live ones
    pin, and one weight after another the resident set grows by about one weight each (measured on a 97M-
    parameter 4-bit base: 120 MB kept for 38 MB of shards without it, 49 MB with it)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):   # not glibc
        return None


def read_shards(weights: list[BaseWeight], checkpoint: Checkpoint, rank: int, world: int,
                device: torch.device) -> None:
    """Each base weight's rows of this rank (FSDP2's dim-0 chunks: ceil(rows / world) per rank) read into its
    shard. A 4-bit weight is read whole and quantised first, as transformers' `Bnb4bitQuantize` does: the
    weight cast to the model's dtype, then `Params4bit(weight, **settings).to(device)`."""
    from torch.distributed.tensor import DTensor

    done: set[int] = set()
    for w in weights:
        param = w.module._parameters[w.name]
        if id(param) in done:   # a tied weight: filled once
            continue
        done.add(id(param))
        sharded = isinstance(param, DTensor)
        local = param.to_local() if sharded else param.data
        rows = param.shape[0] if param.dim() else 1
        start = min(rank * math.ceil(rows / world), rows) if sharded else 0
        stop = start + (local.shape[0] if local.dim() else 1)
        with torch.no_grad():
            if w.quantization is not None:
                import bitsandbytes as bnb

                full = checkpoint.read(w.key).to(device=device, dtype=w.dtype)
                packed = bnb.nn.Params4bit(full, requires_grad=False, **w.quantization).to(device)
                local.copy_(packed.data[start:stop])
                w.module.quant_state = packed.quant_state   # found there after FSDP gathers the weight
                del full, packed
                release_freed_memory()
            else:
                local.copy_(checkpoint.read(w.key, start, stop).reshape(local.shape).to(local.dtype))


def load_sharded(path: str, from_pretrained: Callable[..., torch.nn.Module], device: torch.device,
                 attach: Callable[[torch.nn.Module], torch.nn.Module]) -> torch.nn.Module:
    """The model of `path`, its base sharded over the ranks of this FSDP2 launch and never whole (steps 1-4
    above). `from_pretrained(**placement)`: a normal load's `from_pretrained` (dtype, attention, 4-bit
    settings), here given `device_map="meta"`; `attach(model)`: what a normal load does after it (reward head,
    adapter or LoRA, gradient checkpointing), returning the model to shard. Collective: every rank calls it."""
    from ..distributed import rank, shard_model, world_size

    checkpoint = Checkpoint(checkpoint_folder(path))
    skeleton = from_pretrained(device_map="meta")
    weights = base_weights(skeleton, checkpoint)
    compute_buffers(skeleton, checkpoint)
    place_weights(skeleton, weights, "cpu")
    model = attach(skeleton)
    place_weights(model, weights, "meta")
    shard_model(model, device)
    allocate_shards(model, device)
    read_shards(weights, checkpoint, rank(), world_size(), device)
    return model
