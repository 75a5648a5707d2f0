"""FSDP2: the frozen base sharded over the ranks (docs/distributed.md).

`shard_model` makes each decoder layer a `fully_shard` unit and the whole model the root unit; `shard`
is what a stage calls on the model it loaded (shard it under an FSDP2 launch, say what each rank holds);
`forward` runs the packed forward (which calls the model's parts directly) inside the root's forward so
that its hooks gather and reduce-scatter; `trainable_state` / `load_trainable_state` move the LoRA and head
parameters between shards and full tensors for saving and resuming.

    python -m pytest tests/test_fsdp.py -q
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

from ..models.wrappers import unwrap
from .collectives import gather
from .launch import RankFailure, shards_base, world_size

T = TypeVar("T")


def shard_units(hf_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the decoder layers of the language model and the encoder layers / blocks of
    the vision tower (transformers' `GradientCheckpointingLayer`s); else the classes the model names in
    `_no_split_modules`, as accelerate's transformer-based wrap policy takes them."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()  # noqa: N806
    blocks = [m for m in hf_model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if blocks:
        return blocks
    names = set(getattr(hf_model, "_no_split_modules", None) or ())
    return [m for m in hf_model.modules() if type(m).__name__ in names]


def shard_model(model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """FSDP2 over every rank: each decoder layer of the language model is one `fully_shard` unit (gathered
    when it runs, freed after), and the whole `...ForConditionalGeneration` is the root unit holding the
    rest (embeddings, final norm, LM head, the vision tower and merger, reward head). The packed forward
    calls those parts directly, not the root's forward, so `forward` runs it inside the root's forward:
    its hooks gather the root's parameters and reduce-scatter their gradients. Gradients are averaged over
    ranks by FSDP (once), so the trainers must not also run `average_gradients`. Returns the root.

    The vision blocks are not units of their own: every forward then makes the same collectives (the root,
    then each decoder layer once) whatever its media, so ranks whose batches differ (images on one, text
    only or a video on the other, or a dummy forward) stay in lockstep; with the vision blocks as units, a
    rank without images would skip their gathers and the collectives would no longer match.

    `device`: where the shards live (default: the device of the model's first parameter); parameters on
    the meta device stay there, sharded (`models/sharded_loading.py` fills them)."""
    from torch.distributed.fsdp import fully_shard

    hf = unwrap(model)
    units = shard_units(hf)
    if callable(getattr(hf, "get_decoder", None)):
        inside = {id(m) for m in hf.get_decoder().modules()}
        units = [u for u in units if id(u) in inside]
    if not units:
        raise RankFailure(f"FSDP: {type(hf).__name__} names no transformer block class (_no_split_modules) to shard; "
                          "launch with recipes/accelerate/ddp.yaml instead")
    from torch.distributed.device_mesh import init_device_mesh

    device = device or next(hf.parameters()).device   # the mesh of the model's device type (cuda:LOCAL_RANK, cpu)
    mesh = init_device_mesh(device.type, (world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(hf, mesh=mesh)
    return hf


def shard(model: torch.nn.Module, events) -> None:
    """Hold a loaded model as the launch says: under an FSDP2 launch (`shards_base()`) its base sharded over
    the ranks (`shard_model`, unless `load_model(..., shard=True)` loaded it straight into its shards), and an
    `FSDP2:` event with what each rank holds (`sharded_numel`); otherwise nothing. The trainers call it
    before their optimizer exists, score and reference on the model they load. Collective under FSDP2:
    every rank calls it."""
    if not shards_base():
        return
    if sharded_root(model) is None:
        shard_model(model)
    held = gather(sharded_numel(model))
    total = held[0]["frozen_total_bytes"]
    events.info(f"FSDP2: the base is sharded over {len(held)} ranks (decoder layers; the vision tower is "
                "gathered with the root); frozen weights held per rank: "
                + ", ".join(f"rank {r} {h['frozen_local_bytes'] / 2**20:.2f} MiB" for r, h in enumerate(held))
                + f" of {total / 2**20:.2f} MiB", sharded_params=held)


def sharded_root(model: torch.nn.Module):
    from torch.distributed.fsdp import FSDPModule

    hf = unwrap(model)
    return hf if isinstance(hf, FSDPModule) else None


def forward(model: torch.nn.Module, fn: Callable[[], T]) -> T:
    """`fn()`, a forward that calls the model's parts directly (the packed forward: backbone, then the LM
    head on response positions only), under the sharding: inside the FSDP root's forward, so that its hooks
    gather the root unit's parameters (and, with grad, reduce-scatter their gradients after backward).
    Without sharding: `fn()`."""
    root = sharded_root(model)
    if root is None:
        return fn()
    box: list = []

    def run_inside(*_args, **_kwargs):
        box.append(fn())
        return box[0]

    root.forward = run_inside   # an instance attribute: nn.Module.__call__ runs the FSDP hooks around it
    try:
        root()
    finally:
        del root.forward
    from torch.utils._pytree import tree_leaves
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(box[0])):
        root.reshard()       # no backward follows (an evaluation): the root keeps its parameters gathered otherwise
    return box[0]


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (LoRA, reward head) as full CPU tensors by name, gathered from the shards.
    Collective under sharding: every rank must call it (the same parameters in the same order)."""
    with torch.no_grad():
        return {name: _full(p.detach()).cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (from `trainable_state`) into the model's parameters, each rank taking its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise RankFailure(f"checkpoint has parameters this model does not: {missing[:3]}")
    with torch.no_grad():
        for name, full in state.items():
            p = params[name]
            if isinstance(p, DTensor):
                local = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements).to_local()
                p.to_local().copy_(local)
            else:
                p.copy_(full.to(device=p.device, dtype=p.dtype))


def sharded_numel(model: torch.nn.Module) -> dict[str, int]:
    """Parameter elements and bytes held by this rank (its shards) and in the whole model, frozen and trainable
    (a 4-bit weight counts its packed storage)."""
    from torch.distributed.tensor import DTensor

    out = {f"{kind}_{what}": 0 for kind in ("frozen", "trainable") for what in ("local", "total", "local_bytes",
                                                                                 "total_bytes")}
    for p in model.parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        local = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        out[f"{kind}_local"] += local
        out[f"{kind}_total"] += p.numel()
        out[f"{kind}_local_bytes"] += local * p.element_size()
        out[f"{kind}_total_bytes"] += p.numel() * p.element_size()
    return out
