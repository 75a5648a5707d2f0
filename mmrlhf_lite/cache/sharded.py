"""The precompute stages (score, reference) under N processes: each rank fills its share of a shared,
content-keyed cache, and every rank then reads the whole of it.

The share is a stable assignment by content: a group goes to rank `hash(its first content key) mod N`,
so a resumed run with the same N gives each rank the same groups, and groups with identical content
land on the same rank (computed once there). Whatever any rank wrote before a kill is in the cache and
is not computed again. Appends from several ranks are serialised by `JsonlStore.put_many`'s lock.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

from .. import distributed
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


def fill_missing_sharded(groups: Sequence, keys: list[list[str]], store: JsonlStore, compute: Callable, **kwargs
                         ) -> tuple[JsonlStore, int]:
    """`fill_missing` on this rank's share; after every rank has finished, the whole cache re-read and the
    number of entries computed by all ranks. One process: `fill_missing` itself."""
    if not distributed.is_distributed():
        return store, fill_missing(groups, keys, store, compute, **kwargs)
    world, me = distributed.world_size(), distributed.rank()
    idx = [i for i, ks in enumerate(keys) if rank_of(ks, world) == me]
    computed = fill_missing([groups[i] for i in idx], [keys[i] for i in idx], store, compute, **kwargs)
    distributed.barrier(f"all ranks filled {store.path.name}")
    total = sum(distributed.gather_objects(computed))
    return JsonlStore(store.path, store.fields), total
