"""The precompute stages' caches (score, reference) under N processes: each rank fills its share of a shared,
content-keyed cache, and every rank then reads the whole of it. In one process: the whole fill.

The share is `distributed.shares` of the groups' content keys: a stable assignment by content, so a resumed
run with the same N gives each rank the same groups, and groups with identical content land on the same
rank (computed once there). Whatever any rank wrote before a kill is in the cache and is not computed again.
Appends from several ranks are serialised by `JsonlStore.put_many`'s lock. The ranks fill their shares in
lockstep (`distributed.run_in_lockstep`, through `store.fill_missing`): the progress events count every
rank's groups, the metrics carry each rank's throughput, and a stop request seen by one rank stops them all
after the same batch.

    python -m pytest tests/test_distributed.py -q -k cache
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .. import distributed
from .store import JsonlStore, fill_missing


def open_shared_store(path: Path, fields: dict | None = None) -> JsonlStore:
    """Rank 0 opens (and repairs: torn or damaged lines) the cache first; the others open it after."""
    mine = {}

    def first() -> None:
        mine["store"] = JsonlStore(path, fields)
    distributed.on_main(f"open {Path(path).name}", first)
    return mine.get("store") or JsonlStore(path, fields)


def fill_missing_sharded(groups: Sequence, keys: list[list[str]], store: JsonlStore, compute: Callable, *,
                         per_batch: int, events, stop_requested: Callable[[], bool] = lambda: False,
                         idle_forward: Callable[[], object] | None = None) -> tuple[JsonlStore, int]:
    """`store.fill_missing` on this rank's share, in lockstep with the other ranks (one process: all groups).
    Returns the store holding every rank's entries and the number of entries computed by all ranks. A stop
    request seen by any rank raises StageStopped on every rank after the same round, naming the groups done
    by all of them. `idle_forward`: a forward of the model `compute` uses, run in a round this rank has no
    batch for when the model is sharded (`distributed.run_in_lockstep`)."""
    mine = distributed.shares(keys)
    computed = fill_missing([groups[i] for i in mine], [keys[i] for i in mine], store, compute, per_batch=per_batch,
                            events=events, stop_requested=stop_requested, idle_forward=idle_forward)
    if computed and len(mine) < len(groups):   # other ranks appended entries (each before the last round)
        store = JsonlStore(store.path, store.fields)
    return store, computed
