"""One run, N processes: the helpers every stage uses under `torchrun` / `accelerate launch`.

The launcher starts N copies of `python -m mmrlhf_lite.train recipe.yaml` with RANK / WORLD_SIZE /
LOCAL_RANK set. Rank 0 owns the run folder (lock, recipe, events.jsonl, data preparation, stage
status); the other ranks wait for what it writes and then read it. Training stages are data-parallel
(the trainers are `transformers.Trainer`s; `average_gradients` averages the trainable gradients once
per step), or, under accelerate's FSDP launch, hold the base sharded over the ranks (`check_launch` reads
the choice, `shard_model` applies FSDP2, `through_root` runs the packed forward in its root unit); score / reference / eval split their groups over the ranks, in lockstep rounds with global
progress and one agreed stop point (rounds.py, cache/sharded.py). Without those variables (a plain `python -m ...`) every helper is a no-op.

Failures: a rank that dies ends the job through the launcher (it stops the other processes and names
the failed rank); a collective that does not complete within `MMRLHF_LITE_DIST_TIMEOUT` seconds (default
1800) raises instead of hanging; a rank waiting for rank 0 (`main_first`) raises with rank 0's error.

    torchrun --nproc_per_node 2 -m mmrlhf_lite.train recipes/demo.yaml
"""
from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
TIMEOUT_ENV = "MMRLHF_LITE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
WAIT_TIMEOUT_ENV = "MMRLHF_LITE_WAIT_TIMEOUT"   # ranks waiting for rank 0's work alone (main_first)
DEFAULT_WAIT_S = 7 * 24 * 3600.0


class RankFailure(RuntimeError):
    """Another rank failed (its message is included) or a collective timed out."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


_alone = {"depth": 0}


def is_distributed() -> bool:
    """Several processes, and this code is not running on rank 0 alone (`alone()`)."""
    return world_size() > 1 and not _alone["depth"]


@contextmanager
def alone():
    """Rank 0 working alone while the others wait (work that runs on rank 0 only): the
    collectives of the code inside are no-ops, as in one process."""
    _alone["depth"] += 1
    try:
        yield
    finally:
        _alone["depth"] -= 1


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise RankFailure(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


SHARDING_ENV = ("ACCELERATE_USE_FSDP",)   # read here, then removed so accelerate does not wrap the model itself
_sharding = {"mode": None}
SUPPORTED = ("supported: DDP (recipes/accelerate/ddp.yaml or torchrun; each GPU holds the whole 4-bit base and "
             "the LoRA) or FSDP2 (recipes/accelerate/fsdp2.yaml; the base, 4-bit or bf16, sharded over the GPUs); "
             "see docs/distributed.md")


def sharding() -> str | None:
    """'fsdp2' when this launch shards the frozen base over the ranks (set by `check_launch`), else None."""
    return _sharding["mode"]


def check_launch(backend: str) -> None:
    """Refuse, before anything loads, the launches that cannot work (the message says what to use), and
    take the sharding choice from accelerate's launch environment: `accelerate launch --config_file
    recipes/accelerate/fsdp2.yaml` sets ACCELERATE_USE_FSDP=true and FSDP_VERSION=2. The trainers then
    shard the base themselves (`shard_model`; a 4-bit base is loaded with its nf4 storage in the compute
    dtype so that it shards); the variable is removed so that accelerate and transformers.Trainer do not
    wrap the model a second time."""
    _sharding["mode"] = None
    fsdp = _env_true("ACCELERATE_USE_FSDP")
    deepspeed = _env_true("ACCELERATE_USE_DEEPSPEED") or bool(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
    if backend == "unsloth" and (fsdp or deepspeed):
        raise RankFailure(f"model.backend=unsloth cannot be sharded ({'FSDP' if fsdp else 'DeepSpeed'}): unsloth's "
                          "patched model is single-GPU; use model.backend=transformers; " + SUPPORTED)
    if deepspeed:
        raise RankFailure("accelerate launch with DeepSpeed (ZeRO) is not supported: DeepSpeed is not a "
                          "dependency of mmrlhf-lite and its ZeRO-3 partitioning is untested with the trainers' "
                          "packed forward; " + SUPPORTED)
    for key in SHARDING_ENV:
        os.environ.pop(key, None)
    if not is_distributed():
        return
    if backend == "unsloth":
        raise RankFailure("model.backend=unsloth under a multi-process launcher is not supported (unsloth's "
                          "patched model is single-GPU); use model.backend=transformers")
    if fsdp:
        version = os.environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise RankFailure(f"accelerate launch with FSDP version {version} is not supported: the trainers shard "
                              "with FSDP2 (torch fully_shard); set fsdp_version: 2 in the accelerate config (as "
                              "recipes/accelerate/fsdp2.yaml does); " + SUPPORTED)
        if _env_true("FSDP_OFFLOAD_PARAMS"):
            raise RankFailure("fsdp_offload_params is not supported: the trainers shard the base over the GPUs "
                              "without CPU offload; set fsdp_offload_params: false (recipes/accelerate/fsdp2.yaml "
                              "does), or use DDP QLoRA (recipes/accelerate/ddp.yaml) to fit a large model")
        _sharding["mode"] = "fsdp2"


def init(device_type: str = "cpu") -> None:
    """Join the process group (gloo on CPU, nccl on CUDA) with the collective timeout; accelerate and
    `transformers.Trainer` then use this group. Idempotent; nothing without a launcher."""
    import torch.distributed as dist

    if not is_distributed() or dist.is_initialized():
        return
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RankFailure(f"WORLD_SIZE={world_size()} but {key} is not set: start the run with torchrun or "
                              "accelerate launch (they set it), see docs/distributed.md")
    backend = "nccl" if device_type == "cuda" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s()))
    try:
        wait = float(os.environ.get(WAIT_TIMEOUT_ENV, DEFAULT_WAIT_S))
    except ValueError:
        raise RankFailure(f"{WAIT_TIMEOUT_ENV}={os.environ[WAIT_TIMEOUT_ENV]!r} is not a number of seconds") from None
    _wait["group"] = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait))


def _group_ready() -> bool:
    import torch.distributed as dist
    return is_distributed() and dist.is_available() and dist.is_initialized()


def barrier(what: str) -> None:
    """All ranks reach `what`; raises RankFailure (naming `what`) when one does not within the timeout."""
    if not _group_ready():
        return
    import torch.distributed as dist
    try:
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - gloo/nccl raise RuntimeError subclasses of their own
        raise RankFailure(f"rank {rank()}: waiting for all ranks at '{what}' failed ({_short(exc)}); "
                          f"another rank died or hung (see the launcher's report for which)") from None


def all_reduce_max(value: float) -> float:
    if not _group_ready():
        return value
    import torch.distributed as dist
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    except Exception as exc:  # noqa: BLE001
        raise RankFailure(f"rank {rank()}: a collective failed ({_short(exc)}); another rank died or hung") from None
    return float(t.item())


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The element-wise sum over all ranks of `values` (same length on every rank), in one collective.
    A rank fills its own slots of a vector and leaves the others 0 to share per-rank numbers."""
    if not _group_ready():
        return [float(v) for v in values]
    import torch.distributed as dist
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    try:
        dist.all_reduce(t)
    except Exception as exc:  # noqa: BLE001
        raise RankFailure(f"rank {rank()}: a collective failed ({_short(exc)}); another rank died or hung") from None
    return [float(x) for x in t.cpu().tolist()]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on at least one (e.g. a stop request seen by one rank)."""
    return all_reduce_max(1.0 if flag else 0.0) > 0


_wait = {"group": None}


def main_first(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only; the other ranks wait and get its result, or raise its error. They wait in a
    gloo group of their own with a long timeout (`MMRLHF_LITE_WAIT_TIMEOUT`, default 7 days), since rank 0
    may work alone for hours (data preparation); a rank 0 that dies ends the job through the launcher."""
    if not _group_ready():
        return fn()
    import torch.distributed as dist

    box: list = [None]
    value = None
    if is_main():
        try:
            value = fn()
            box[0] = ("ok", value)
        except BaseException as exc:
            box[0] = ("error", type(exc).__name__, str(exc) or type(exc).__name__)
            _broadcast(box, name)
            raise
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - an unpicklable result: the others compute what they need themselves
            box[0] = ("ok", None)
    _broadcast(box, name)
    if is_main():
        return value
    status, *rest = box[0]
    if status == "error":
        kind, message = rest
        raise RankFailure(f"rank 0 failed at '{name}': {kind}: {message}")
    return rest[0]


def _broadcast(box: list, name: str) -> None:
    import torch.distributed as dist
    try:
        dist.broadcast_object_list(box, src=0, group=_wait["group"])
    except Exception as exc:  # noqa: BLE001
        raise RankFailure(f"rank {rank()}: lost rank 0 at '{name}' ({_short(exc)}); see the launcher's report") from None


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not _group_ready():
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * world_size()
    try:
        dist.all_gather_object(out, obj)
    except Exception as exc:  # noqa: BLE001
        raise RankFailure(f"rank {rank()}: gathering results failed ({_short(exc)}); another rank died or hung") from None
    return out


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` (the trainable LoRA/head parameters, same order on every rank)
    over all ranks, one flat all-reduce per dtype. The trainers' packed forward calls the language model
    below the DDP wrapper (to take the LM head on response positions only), so DDP's own hooks never fire;
    this is the same averaging, done once per optimizer step."""
    if not _group_ready():
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    n = world_size()
    for ps in by_dtype.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        flat = _flatten_dense_tensors(grads)
        try:
            dist.all_reduce(flat)
        except Exception as exc:  # noqa: BLE001
            raise RankFailure(f"rank {rank()}: averaging gradients failed ({_short(exc)}); another rank died or "
                              "hung (see the launcher's report for which)") from None
        flat /= n
        for p, g in zip(ps, _unflatten_dense_tensors(flat, grads)):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


# --------------------------------------------------------------------------------------------------
# FSDP2: the frozen base sharded over the ranks (docs/distributed.md)

class ShardedModel(torch.nn.Module):
    """The trainer's handle on a model whose base `shard_model` sharded: transformers.Trainer takes a model it
    did not build as already wrapped, so accelerate neither wraps it in DDP (which cannot hold DTensors) nor
    shards it again. `models.loading.unwrap` looks through it."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):  # the trainers call the model's parts through `through_root`
        return self.module(*args, **kwargs)


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


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over every rank: each decoder layer of the language model is one `fully_shard` unit (gathered
    when it runs, freed after), and the whole `...ForConditionalGeneration` is the root unit holding the
    rest (embeddings, final norm, LM head, the vision tower and merger, reward head). The packed forward
    calls those parts directly, not the root's forward, so `through_root` runs it inside the root's forward:
    its hooks gather the root's parameters and reduce-scatter their gradients. Gradients are averaged over
    ranks by FSDP (once), so the trainers must not also run `average_gradients`. Returns the root.

    The vision blocks are not units of their own: every forward then makes the same collectives (the root,
    then each decoder layer once) whatever its media, so ranks whose batches differ (images on one, text
    only or a video on the other, or a dummy forward) stay in lockstep; with the vision blocks as units, a
    rank without images would skip their gathers and the collectives would no longer match."""
    from torch.distributed.fsdp import fully_shard

    from .models.loading import unwrap

    hf = unwrap(model)
    units = shard_units(hf)
    if callable(getattr(hf, "get_decoder", None)):
        inside = {id(m) for m in hf.get_decoder().modules()}
        units = [u for u in units if id(u) in inside]
    if not units:
        raise RankFailure(f"FSDP: {type(hf).__name__} names no transformer block class (_no_split_modules) to shard; "
                          "launch with recipes/accelerate/ddp.yaml instead")
    from torch.distributed.device_mesh import init_device_mesh

    device = next(hf.parameters()).device   # the mesh of the model's own device type (cuda:LOCAL_RANK, cpu)
    mesh = init_device_mesh(device.type, (world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(hf, mesh=mesh)
    return hf


def shards_base() -> bool:
    """Whether the stages shard the model they load (reward and dpo training, score, reference): an FSDP2
    launch of several ranks (not inside `alone()`)."""
    return sharding() is not None and is_distributed()


def shard_frozen(model: torch.nn.Module, events) -> list[dict]:
    """`shard_model(model)` (reward and dpo before their optimizer exists; score, reference), and an
    `FSDP2:` event with what each rank holds (`sharded_numel`). Collective: every rank calls it."""
    shard_model(model)
    held = gather_objects(sharded_numel(model))
    total = held[0]["frozen_total_bytes"]
    events.info(f"FSDP2: the base is sharded over {len(held)} ranks (decoder layers; the vision tower is "
                "gathered with the root); frozen weights held per rank: "
                + ", ".join(f"rank {r} {h['frozen_local_bytes'] / 2**20:.2f} MiB" for r, h in enumerate(held))
                + f" of {total / 2**20:.2f} MiB", sharded_params=held)
    return held


def sharded_root(model: torch.nn.Module):
    from torch.distributed.fsdp import FSDPModule

    from .models.loading import unwrap

    hf = unwrap(model)
    return hf if isinstance(hf, FSDPModule) else None


def through_root(model: torch.nn.Module, fn: Callable[[], T]) -> T:
    """`fn()` (a forward that calls the model's parts directly), run inside the FSDP root's forward so that
    its hooks gather the root unit's parameters (and, with grad, reduce-scatter their gradients after
    backward). Without sharding: `fn()`."""
    root = sharded_root(model)
    if root is None:
        return fn()
    box: list = []

    def forward(*_args, **_kwargs):
        box.append(fn())
        return box[0]

    root.forward = forward   # an instance attribute: nn.Module.__call__ runs the FSDP hooks around it
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


def destroy() -> None:
    """Leave the process group once every rank is done with it. Without the barrier a rank that finished
    first could tear down its gloo connections while another still completed the last collective: seen as
    an intermittent "terminate called without an active exception" (SIGABRT) of that rank at exit, in 3 of
    28 runs of a 2-rank FSDP2 script on CPU, none in 24 runs with a barrier before destroy_process_group."""
    if _group_ready():
        import torch.distributed as dist
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
