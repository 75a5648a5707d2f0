"""The precompute stages (score, reference) under N processes: each rank fills its share of a shared,
content-keyed cache, and every rank then reads the whole of it.

The share is a stable assignment by content: a group goes to rank `hash(its first content key) mod N`,
so a resumed run with the same N gives each rank the same groups, and groups with identical content
land on the same rank (computed once there). Whatever any rank wrote before a kill is in the cache and
is not computed again. Appends from several ranks are serialised by `JsonlStore.put_many`'s lock.
The ranks fill their shares in lockstep (distributed/lockstep.py): the progress events count every rank's
groups, the metrics carry each rank's throughput, and a stop request seen by one rank stops them all
after the same batch.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

from .. import distributed
from ..distributed.lockstep import work_split
from .store import JsonlStore, fill_missing


def open_shared_store(path: Path, fields: dict | None = None) -> JsonlStore:
    """Rank 0 opens (and repairs: torn or damaged lines) the cache first; the others open it after."""
    mine = {}

    def first() -> None:
        mine["store"] = JsonlStore(path, fields)
    distributed.main_first(f"open {Path(path).name}", first)
    return mine.get("store") or JsonlStore(path, fields)


def rank_of(keys: list[str], world: int) -> int:
    digest = hashlib.sha256((keys[0] if keys else "").encode()).digest()
    return int.from_bytes(digest[:8], "big") % world


def fill_missing_sharded(groups: Sequence, keys: list[list[str]], store: JsonlStore, compute: Callable, *,
                         per_batch: int, events, stop_requested: Callable[[], bool] = lambda: False,
                         idle: Callable[[], None] | None = None) -> tuple[JsonlStore, int]:
    """`store.fill_missing` on this rank's share, in lockstep with the other ranks (one process: all groups).
    Returns the store holding every rank's entries (re-read under a launcher) and the number of entries
    computed by all ranks. A stop request seen by any rank raises StageStopped on every rank after the
    same round, naming the groups done by all of them. `idle`: what a rank runs in a round it has no batch
    for (a dummy forward under FSDP)."""
    world, me = work_split()
    idx = [i for i, ks in enumerate(keys) if world == 1 or rank_of(ks, world) == me]
    computed = fill_missing([groups[i] for i in idx], [keys[i] for i in idx], store, compute, per_batch=per_batch,
                            events=events, stop_requested=stop_requested, idle=idle)
    if world > 1:  # every rank's appends are in the file (each appended before the last round)
        store = JsonlStore(store.path, store.fields)
    return store, computed
