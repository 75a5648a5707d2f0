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

    def __init__(self, warmup: int, steps: int | None = None):
        self.warmup, self.steps = warmup, steps
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
        """The timed steps: after the warm-up, up to `steps` of them (a profiled step after them is not timed)."""
        end = None if self.steps is None else self.warmup + self.steps
        return self.times[self.warmup:end]

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


# --------------------------------------------------------------------------------------------------
# where a step's time goes

OP_CATEGORIES = (  # (category, substrings of the profiler's op name), first match wins
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
    ("4-bit dequantisation", ("bitsandbytes", "dequantize", "bnb")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "gemm", "aten::linear")),
    ("convolution", ("conv",)),
    ("softmax / log-softmax", ("softmax",)),
    ("copies and layout", ("aten::copy_", "aten::to", "aten::contiguous", "aten::clone", "aten::cat", "aten::index",
                           "aten::gather", "aten::scatter", "aten::fill_", "aten::zero_", "aten::empty")),
    ("optimizer", ("optimizer", "adam", "_foreach")),
)


def op_category(name: str) -> str:
    low = name.lower()
    for category, keys in OP_CATEGORIES:
        if any(k.lower() in low for k in keys):
            return category
    return "other (element-wise, norms, autograd bookkeeping)"


def profile_summary(prof, wall_s: float, top: int = 12) -> dict[str, Any]:
    """Self time per op (device time on CUDA, CPU time elsewhere) of one profiled step: the top ops and
    the share per category (matmul, attention, 4-bit dequantisation, ...). Self times add up to the
    profiled thread time, so shares are of that sum; `wall_s` is the step's wall time under the profiler."""
    device = cuda()
    rows = []
    for ev in prof.key_averages():
        t = (getattr(ev, "self_device_time_total", 0) if device else ev.self_cpu_time_total) or 0
        if t > 0:
            rows.append((ev.key, t / 1e6, ev.count))
    total = sum(t for _, t, _ in rows) or 1.0
    cats: dict[str, float] = {}
    for name, t, _ in rows:
        c = op_category(name)
        cats[c] = cats.get(c, 0.0) + t
    rows.sort(key=lambda r: -r[1])
    return {"time_of": "device" if device else "cpu", "profiled_step_wall_s": wall_s, "self_time_s": total,
            "categories": {c: {"s": t, "share": t / total} for c, t in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": n, "s": t, "share": t / total, "calls": k} for n, t, k in rows[:top]]}


def step_callbacks(spec) -> tuple[StepTimer, "StepProfiler | None"]:
    """The step timer of a `RunSpec` (warm-up, then `spec.steps` timed steps) and, with `spec.profile`, a
    profiler over one more step after the timed ones."""
    timer = StepTimer(spec.warmup, spec.steps)
    return timer, (StepProfiler(spec.warmup + spec.steps) if spec.profile else None)


class StepProfiler(TrainerCallback):
    """`torch.profiler` over one optimizer step (`step`, 0-based), summarised by `profile_summary`."""

    def __init__(self, step: int):
        self.step, self._seen, self._prof, self._t0 = step, 0, None, 0.0
        self.summary: dict[str, Any] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._seen == self.step:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
            self._prof = profile(activities=acts)
            self._prof.__enter__()
            self._t0 = now()

    def on_step_end(self, args, state, control, **kwargs):
        if self._prof is not None:
            wall = now() - self._t0
            self._prof.__exit__(None, None, None)
            self.summary = profile_summary(self._prof, wall)
            self._prof = None
        self._seen += 1
