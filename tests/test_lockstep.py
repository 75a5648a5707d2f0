"""distributed/lockstep.py in one process (the collective is a no-op): progress and throughput events, the stop point,
chunking and seeds of sharded_map. The multi-process behaviour (uneven shards, a stop seen by one rank) is
tested under torchrun in tests/test_distributed.py (-k lockstep)."""
from __future__ import annotations

import pytest

from mmrlhf_lite.events import EventLog, StageStopped, read_events
from mmrlhf_lite.distributed.lockstep import chunk_seed, run_in_lockstep, sharded_map, throughput


def _stopped(done: int, total: int) -> str:
    return f"stopped after {done} of {total} groups"


def test_one_process_runs_every_batch_with_progress_from_the_cached_groups_on(tmp_path):
    events = EventLog(tmp_path, echo=False)
    worked = []
    res = run_in_lockstep([["a", "b"], ["c"]], lambda b: worked.extend(b) or 5 * len(b), done=1, events=events,
                        stopped=_stopped, part="x")
    assert worked == ["a", "b", "c"] and res.groups == 4 and res.computed == 15 and res.computed_groups == [3]
    got, _ = read_events(tmp_path)
    assert [(e["n"], e["total"], e["part"]) for e in got if e["type"] == "progress"] == [
        (1, 4, "x"), (3, 4, "x"), (4, 4, "x")]
    rates = [e for e in got if e["type"] == "metrics"]
    assert len(rates) == 1 and rates[0]["groups_per_s"] > 0 and rates[0]["part"] == "x"
    assert not any(k.startswith("rank") for k in rates[0])           # per-rank rates only under a launcher


def test_nothing_to_do_writes_no_progress_and_a_stop_is_not_needed(tmp_path):
    events = EventLog(tmp_path, echo=False)
    res = run_in_lockstep([], lambda b: 1 / 0, events=events, stopped=_stopped, stop_requested=lambda: True)
    assert res.groups == 0 and res.computed == 0
    assert read_events(tmp_path)[0] == []


def test_a_stop_request_is_seen_before_the_next_batch_and_names_the_groups_done(tmp_path):
    events = EventLog(tmp_path, echo=False)
    worked: list = []
    with pytest.raises(StageStopped, match="stopped after 3 of 5 groups"):
        run_in_lockstep([[1, 2], [3, 4]], worked.extend, done=1, events=events, stopped=_stopped,
                      stop_requested=lambda: bool(worked))
    assert worked == [1, 2]


def test_sharded_map_keeps_item_order_and_cuts_chunks_by_size_alone(tmp_path):
    events = EventLog(tmp_path, echo=False)
    out = sharded_map(list("abcde"), 2, lambda chunk, i: [(i, x) for x in chunk], events=events, stopped=_stopped)
    assert out == [(0, "a"), (0, "b"), (1, "c"), (1, "d"), (2, "e")]
    with pytest.raises(RuntimeError, match="1 results for a chunk of 2 items"):
        sharded_map(list("ab"), 2, lambda chunk, i: chunk[:1], events=events, stopped=_stopped)


def test_throughput_and_chunk_seeds():
    assert throughput([6, 2], 2.0) == {"groups_per_s": 4.0, "rank0_groups_per_s": 3.0, "rank1_groups_per_s": 1.0}
    assert throughput([6], 2.0) == {"groups_per_s": 3.0}
    seeds = {chunk_seed(s, i) for s in (0, 1) for i in range(50)}
    assert len(seeds) == 100 and all(0 <= x < 2 ** 31 for x in seeds)
    assert chunk_seed(0, 3) == chunk_seed(0, 3)
