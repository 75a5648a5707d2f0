"""The launch this process is part of: its rank and world size (from torchrun / accelerate launch), whether
the base is sharded (FSDP2, read from accelerate's launch environment), and `alone()` for rank 0 working
by itself. Reads only the environment: every other module may import it.

    torchrun --nproc_per_node 2 -m mmrlhf_lite.train recipes/demo.yaml
"""
from __future__ import annotations

import os
from contextlib import contextmanager

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


def shards_base() -> bool:
    """Whether the stages shard the model they load (reward and dpo training, score, reference): an FSDP2
    launch of several ranks (not inside `alone()`)."""
    return sharding() is not None and is_distributed()
