"""Collectives of a launch, each a no-op in one process: join the group (`init`), barriers, sums and
maxima over ranks, gathers, `on_main` (rank 0 works, the others get its result or its error),
`any_rank` (one rank's stop request is every rank's) and the gradient average of data-parallel training.

Failures: a rank that dies ends the job through the launcher (it stops the other processes and names
the failed rank); a collective that does not complete within `MMRLHF_LITE_DIST_TIMEOUT` seconds (default
1800) raises instead of hanging; a rank waiting for rank 0 (`on_main`) raises with rank 0's error.

    python -m pytest tests/test_distributed.py -q
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, NoReturn, Sequence, TypeVar

import torch

from .launch import (DEFAULT_WAIT_S, WAIT_TIMEOUT_ENV, RankFailure, check_launch, is_distributed, is_main,
                     local_rank, rank, shards_base, timeout_s, world_size)

T = TypeVar("T")
_wait = {"group": None}   # the gloo group of `on_main` waits (long timeout), made by `init`


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


@dataclass(frozen=True)
class Launch:
    """The launch this process is part of, as `start` found it."""
    rank: int
    world: int
    sharded: bool   # the stages shard their models over the ranks (FSDP2)

    @property
    def main(self) -> bool:
        """Rank 0: it owns the run folder (lock, recipe, events, stage status)."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1


def start(backend: str, device_type: str) -> Launch:
    """Refuse the launches that cannot work (`check_launch`, before anything loads), join the process group
    (`init`) and say what this process is. One process: rank 0 of 1, nothing joined."""
    check_launch(backend)
    init(device_type)
    return Launch(rank=rank(), world=world_size(), sharded=shards_base())


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
    """True on every rank when it is True on at least one, so that every rank takes the same branch: a stop
    request seen by one rank stops all of them at the same point; entries missing on one rank make all of
    them join the (collective) fill. Collective."""
    return all_reduce_max(1.0 if flag else 0.0) > 0


def on_main(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only (the run folder's writes, data preparation); every rank gets its result (None
    when it does not pickle), or raises its error naming `name`. One process: `fn()`. The other ranks wait
    in a gloo group of their own with a long timeout (`MMRLHF_LITE_WAIT_TIMEOUT`, default 7 days), since
    rank 0 may work alone for hours (data preparation); a rank 0 that dies ends the job through the
    launcher. It does not wait for the other ranks before `fn` runs: `barrier` first for that."""
    if not _group_ready():
        return fn()

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


def gather(obj: Any) -> list[Any]:
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

    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    n = world_size()
    for ps in by_dtype.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        flat = torch.cat([g.reshape(-1) for g in grads])
        try:
            dist.all_reduce(flat)
        except Exception as exc:  # noqa: BLE001
            raise RankFailure(f"rank {rank()}: averaging gradients failed ({_short(exc)}); another rank died or "
                              "hung (see the launcher's report for which)") from None
        flat /= n
        for p, g, part in zip(ps, grads, flat.split([g.numel() for g in grads])):
            if p.grad is None:
                p.grad = part.view_as(g).clone()
            else:
                p.grad.copy_(part.view_as(g))


def destroy() -> None:
    """Leave the process group once every rank is done with it (the barrier: no rank tears down its gloo
    connections while another still completes the last collective), and let go of the `on_main` group, whose
    gloo threads outlived destroy_process_group while this module held it (seen with the threads' names in
    /proc). A failure here is logged, not raised: the run's outcome is already known. Threads torch itself keeps
    can still abort the interpreter's teardown; a rank skips that teardown (`exit_rank`)."""
    if _group_ready():
        import torch.distributed as dist
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - best effort at exit
            logging.getLogger(__name__).debug("leaving the process group: %s", _short(exc))
    _wait["group"] = None


def exit_rank(code: int) -> NoReturn:
    """End this process with `code`, as `sys.exit(code)` does outside a launch. In a launch (WORLD_SIZE > 1)
    the interpreter's own teardown is skipped: the atexit handlers run while everything is alive (logging's
    flush and close, multiprocessing's children, temporary folders), stdout and stderr are flushed, then
    `os._exit(code)`. In that teardown a C++ thread that torch still runs (gloo's, whose process group outlives
    destroy_process_group while torch holds it) can reach for the interpreter as it goes away and abort the
    whole process ("terminate called without an active exception", SIGABRT): a rank that had stopped cleanly
    with exit code 3 was then reported by the launcher as killed by signal 6 (CI, a two-rank eval stop, at
    3359e87). Every rank of a launch leaves through here, whatever its code."""
    if world_size() <= 1:
        sys.exit(code)
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):   # closed
                pass
        os._exit(code)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
