"""The most groups (ours) or pairs (TRL) per step that train under a memory cap.

The cap is `torch.cuda.set_per_process_memory_fraction(cap / total)`, set in a fresh process before the
model loads (each trial is its own process, so an out-of-memory leaves nothing behind). Batch sizes
double from 1 until a trial runs out of memory, then a binary search between the last that fit and the
first that did not. A trial is `warmup` + `steps` short steps of the real system. CUDA only: on CPU the
search is recorded as skipped.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


def search(spec, cap_gb: float, runner: Callable[[object], dict], max_batch: int = 64, steps: int = 2,
           warmup: int = 1) -> dict:
    """`runner(spec) -> row` runs one trial; returns one `kind: memcap` row."""
    from .runs import TRL_SYSTEMS, cuda

    base = {"kind": "memcap", "system": spec.system, "model": spec.model, "cap_gb": cap_gb,
            "batch_unit": "pairs" if spec.system in TRL_SYSTEMS else "groups",
            "image_tokens_target": spec.image_tokens, "response_tokens_target": spec.response_tokens}
    if not cuda():
        return {**base, "status": "skipped",
                "reason": "memory caps need CUDA (torch.cuda.set_per_process_memory_fraction); none here"}
    tried: dict[int, dict] = {}

    def trial(b: int) -> str:
        row = runner(dataclasses.replace(spec, batch=b, mem_cap_gb=cap_gb, steps=steps, warmup=warmup))
        tried[b] = {k: row.get(k) for k in ("status", "reason", "peak_allocated_gib", "peak_reserved_gib",
                                             "pairs_per_step", "pairs_per_s")}
        return row["status"]

    ok, fail, b = 0, None, 1
    while b <= max_batch:
        status = trial(b)
        if status == "ok":
            ok, b = b, b * 2
        elif status == "oom":
            fail = b
            break
        else:  # skipped or error: nothing to search
            return {**base, "status": status, "reason": tried[b].get("reason"), "tried": tried}
    if fail is not None:
        lo, hi = ok, fail  # lo fits (or 0), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if trial(mid) == "ok":
                lo = mid
            else:
                hi = mid
        ok = lo
    best = tried.get(ok, {})
    return {**base, "status": "ok", "max_batch": ok, "pairs_per_step": best.get("pairs_per_step") if ok else 0,
            "hit_max_batch": fail is None, "peak_allocated_gib": best.get("peak_allocated_gib"),
            "pairs_per_s": best.get("pairs_per_s"), "tried": {str(k): v for k, v in sorted(tried.items())}}
