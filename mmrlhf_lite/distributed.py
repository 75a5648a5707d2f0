"""One run, N processes: the helpers every stage uses under `torchrun` / `accelerate launch`.

The launcher starts N copies of `python -m mmrlhf_lite.train recipe.yaml` with RANK / WORLD_SIZE /
LOCAL_RANK set. Rank 0 owns the run folder (lock, recipe, events.jsonl, data preparation, stage
status); the other ranks wait for what it writes and then read it. Training stages are data-parallel
(the trainers are `transformers.Trainer`s; `average_gradients` averages the trainable gradients once
per step); score / reference / eval split their groups over the ranks, in lockstep rounds with global
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


def check_launch(backend: str) -> None:
    """Refuse, before anything loads, the launches that cannot work; the message says what to use."""
    if not is_distributed():
        return
    sharded = "FSDP" if _env_true("ACCELERATE_USE_FSDP") else "DeepSpeed" if _env_true("ACCELERATE_USE_DEEPSPEED") else None
    if sharded:
        raise RankFailure(
            f"accelerate launch with {sharded} is not supported yet: the trainers' packed forward runs the language "
            "model below the wrapper (it takes the LM head on response positions only), so parameters that "
            f"{sharded} shards would never be gathered. Launch with recipes/accelerate/ddp.yaml (each GPU holds "
            "the 4-bit base and the LoRA) or torchrun; see docs/distributed.md")
    if backend == "unsloth":
        raise RankFailure("model.backend=unsloth under a multi-process launcher is not supported (unsloth's "
                          "patched model is single-GPU); use model.backend=transformers")


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


def destroy() -> None:
    if _group_ready():
        import torch.distributed as dist
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
