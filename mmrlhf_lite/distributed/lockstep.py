"""Work split over the ranks of a launch, run in lockstep (batch k of every rank together): global progress,
per-rank throughput and one agreed stop point. The precompute stages' cache fills (cache/sharded.py,
cache/store.py) and the eval stage (evaluate/pipeline.py) run their groups through here, with one process
or many. ("Lockstep", not "rounds": that word is kept for rounds of online training.)

Each rank holds its own list of batches; the lists may differ in length (a content-hash split is
uneven; a rank may have none). Before each step every rank puts its numbers (batches, groups, groups
done, whether it saw a stop request, groups and entries computed) into its slots of one vector, and one
all-reduce sums it. So:
- every rank runs the same number of collectives (the longest list's batches, plus one after the last
  step): a rank out of batches keeps joining the steps without working, and uneven shards cannot
  deadlock;
- rank 0's progress events count every rank's groups (`n` of `total`), and its metrics events carry
  `groups_per_s` over all ranks and, under a launcher, `rankN_groups_per_s` per rank (at the end, and
  every `METRICS_EVERY_S` seconds);
- a stop request (the run folder's STOP file, SIGTERM, the UI's Stop) seen by any rank before a step
  stops every rank after the same step, with the same message (`StageStopped`: exit code 3); what the
  batches wrote stays.
One process: the same loop, the collective a no-op. The price is that ranks move from batch to batch
together (a rank whose batch is quicker waits for the others at each step).

    python -m pytest tests/test_lockstep.py tests/test_distributed.py -q -k lockstep
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..events import StageStopped
from .collectives import all_reduce_sum, gather
from .launch import is_distributed, rank, shards_base, world_size

METRICS_EVERY_S = 30.0
_SLOTS = ("batches", "groups", "done", "stop", "computed_groups", "computed")


@dataclass
class LockstepResult:
    groups: int                  # groups of all ranks (work done earlier included)
    computed: int                # what `work` returned, summed over batches and ranks (e.g. cache entries)
    computed_groups: list[int]   # groups each rank worked on this time, by rank
    seconds: float


def work_split() -> tuple[int, int]:
    """(ranks, this rank) of the work being split: 1 process, or a launch not inside `distributed.alone()`."""
    if is_distributed():
        return world_size(), rank()
    return 1, 0


def rank_of(keys: Sequence[str], world: int) -> int:
    """The rank (of `world`) that works on an item with these content keys: `sha256(keys[0]) mod world`."""
    digest = hashlib.sha256((keys[0] if keys else "").encode()).digest()
    return int.from_bytes(digest[:8], "big") % world


def shares(item_keys: Sequence[Sequence[str]]) -> list[int]:
    """The indices of the items this rank works on (one process: all of them). An item goes to the rank
    `rank_of` its content keys names: a stable assignment by content, so a resumed launch with the same
    number of ranks gives each rank the same items, and items of identical content land on one rank
    (computed once there)."""
    world, me = work_split()
    return [i for i, keys in enumerate(item_keys) if world == 1 or rank_of(keys, world) == me]


def throughput(computed_groups: Sequence[float], seconds: float) -> dict[str, float]:
    """`groups_per_s` over all ranks and, with several, `rankN_groups_per_s` of each (they add up)."""
    rates = [g / max(seconds, 1e-9) for g in computed_groups]
    out = {"groups_per_s": sum(rates)}
    if len(rates) > 1:
        out.update({f"rank{i}_groups_per_s": r for i, r in enumerate(rates)})
    return out


def run_in_lockstep(batches: Sequence, work: Callable[[Any], int | None], *, events,
                    stopped: Callable[[int, int], str], size: Callable[[Any], int] = len, done: int = 0,
                    stop_requested: Callable[[], bool] = lambda: False, unit: str = "group",
                    idle_forward: Callable[[], Any] | None = None, **extra: Any) -> LockstepResult:
    """Run `work(batch)` for each of this rank's `batches`, step by step with the other ranks.

    `size(batch)`: the groups in a batch; `done`: this rank's groups that need no work (already cached),
    counted as done from the start; `work` returns the number of entries it computed (or None);
    `stopped(done, total)`: the StageStopped message, from numbers every rank agrees on. `extra` fields
    (e.g. `part`) go into the progress and metrics events. `idle_forward()`: a forward of the model `work`
    runs (on any input, its result discarded), run instead of `work` in a step where this rank has no batch
    left (or none at all) when the launch shards the model (`shards_base()`): FSDP forwards are
    collectives, so every rank must make one in each step. Without sharding it is never called."""
    world, me = work_split()
    mine = {"batches": len(batches), "groups": done + sum(size(b) for b in batches), "done": done, "stop": 0.0,
            "computed_groups": 0, "computed": 0}
    start = last_metrics = time.time()
    k, steps = 0, 0
    while True:
        mine["stop"] = 1.0 if stop_requested() else 0.0
        vec = [0.0] * (len(_SLOTS) * world)
        for i, slot in enumerate(_SLOTS):
            vec[i * world + me] = float(mine[slot])
        vec = all_reduce_sum(vec)
        per = {slot: vec[i * world:(i + 1) * world] for i, slot in enumerate(_SLOTS)}
        if k == 0:
            steps = int(max(per["batches"]))
        total, all_done = int(sum(per["groups"])), int(sum(per["done"]))
        if total:
            events.progress(all_done, total, unit=unit, **extra)
        now = time.time()
        final = k >= steps
        if k and (final or now - last_metrics >= METRICS_EVERY_S):
            events.metrics(**extra, **throughput(per["computed_groups"], now - start))
            last_metrics = now
        if final:
            return LockstepResult(groups=total, computed=int(sum(per["computed"])),
                                computed_groups=[int(x) for x in per["computed_groups"]], seconds=now - start)
        if any(per["stop"]):
            raise StageStopped(stopped(all_done, total))
        if k < len(batches):
            got = work(batches[k])
            n = size(batches[k])
            mine["computed"] += int(got or 0)
            mine["computed_groups"] += n
            mine["done"] += n
        elif idle_forward is not None and shards_base():
            idle_forward()
        k += 1


def chunk_seed(seed: int, index: int) -> int:
    """The sampling seed of chunk `index` of a `sharded_map`: the run seed mixed with the chunk's index,
    so sampled critiques and answers do not depend on which rank computes the chunk, or how many ranks
    there are."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def sharded_map(items: Sequence, chunk_size: int, fn: Callable[[list, int], list], *, events,
                stopped: Callable[[int, int], str], stop_requested: Callable[[], bool] = lambda: False,
                **extra: Any) -> list:
    """`fn(chunk, index)` (one result per item of `chunk`) over chunks of `chunk_size` consecutive items,
    dealt round-robin to the ranks; every rank gets every item's result, in item order (one gather at the
    end). Chunk boundaries and seeds (`chunk_seed(seed, index)`) come from the recipe, not from the
    number of ranks, so each chunk is computed alike wherever it runs, and the code that aggregates the
    results is the one-process code."""
    world, me = work_split()
    chunk_size = max(1, int(chunk_size))
    chunks = [list(items[s:s + chunk_size]) for s in range(0, len(items), chunk_size)]
    mine = list(range(me, len(chunks), world))
    results: dict[int, list] = {}

    def work(ci: int) -> int:
        out = fn(chunks[ci], ci)
        if len(out) != len(chunks[ci]):
            raise RuntimeError(f"sharded_map: {len(out)} results for a chunk of {len(chunks[ci])} items")
        results[ci] = list(out)
        return len(out)

    run_in_lockstep(mine, work, size=lambda ci: len(chunks[ci]), events=events, stopped=stopped,
                  stop_requested=stop_requested, **extra)
    merged: dict[int, list] = {}
    for part in (gather(results) if world > 1 else [results]):
        merged.update(part)
    return [r for ci in range(len(chunks)) for r in merged[ci]]
