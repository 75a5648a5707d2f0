"""Timing, memory and environment records shared by every system of the benchmark.

Step times are wall-clock between a synchronised start and a synchronised end of the optimizer step
(`torch.cuda.synchronize()` on CUDA), taken by the same `transformers.TrainerCallback` in our trainer and
in TRL's: batch collation (tokenising, image processing) happens before `on_step_begin` in both, so it is
outside the step time and reported apart where measured. Peak memory is reset when the first timed step
begins, so it covers the timed steps only (load and warm-up peaks are reported apart).
"""
from __future__ import annotations

import importlib
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
from transformers import TrainerCallback

GIB = 2 ** 30


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def now() -> float:
    sync()
    return time.perf_counter()


def reset_peak() -> None:
    if cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float | None]:
    if not cuda():
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def peak_rss_gib() -> float | None:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB). Per run only when the run
    had the process to itself (`--isolate`); in-process runs report the process-lifetime peak."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class StepTimer(TrainerCallback):
    """Per optimizer step: synchronised wall time; the first `warmup` steps are kept apart.

    `first_step_s` is step 1 alone (lazy initialisation, compilation, autotuning land there)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.times: list[float] = []
        self._t0 = 0.0
        self.peak_after_warmup: dict[str, float | None] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        if len(self.times) == self.warmup:
            sync()
            reset_peak()
        self._t0 = now()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(now() - self._t0)
        if len(self.times) > self.warmup:
            self.peak_after_warmup = peak_memory()

    @property
    def timed(self) -> list[float]:
        return self.times[self.warmup:]

    @property
    def first_step_s(self) -> float | None:
        return self.times[0] if self.times else None


def version_of(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - absent or broken: recorded as absent
        return None


def environment() -> dict[str, Any]:
    """The machine and versions a result came from (installed packages only: nothing is imported that
    patches others, e.g. unsloth, unless the run already imported it)."""
    env = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if cuda():
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), gpu_memory_gib=props.total_memory / GIB,
                   capability=f"{props.major}.{props.minor}")
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        env[name] = version_of(name)
    for name in ("trl", "unsloth", "unsloth_zoo", "triton"):
        env[name] = _dist_version(name) if name not in sys.modules else version_of(name)
    return env


def _dist_version(name: str) -> str | None:
    """Installed version without importing (importing unsloth patches transformers process-wide)."""
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None
