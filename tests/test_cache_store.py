"""JsonlStore under damage and concurrency: lines of the wrong shape are dropped once (named by file and
line) and the file is repaired; a torn tail is cut in place; two processes appending to one store lose
and duplicate nothing, also when one of them is killed; a kill during a repair loses nothing.

    python -m pytest -q tests/test_cache_store.py -p no:cacheprovider
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mmrlhf_lite.cache.store import JsonlStore, fill_missing

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"logp": (int, float), "n_tokens": int}


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_bytes().splitlines() if ln.strip()]


def test_line_of_the_wrong_shape_is_dropped_named_and_repaired_once(tmp_path):
    p = tmp_path / "reference.jsonl"
    good = [{"key": f"k{i}", "logp": -1.5 * i, "n_tokens": 3} for i in range(5)]
    lines = [json.dumps(r) for r in good]
    lines.insert(2, json.dumps({"key": "bad", "n_tokens": 3}))        # valid JSON, no logp
    lines.insert(4, '{"key": "torn", "lo')                            # torn, in the middle
    lines.insert(5, "42")                                             # not an object
    lines.insert(6, json.dumps({"key": "b2", "logp": "x", "n_tokens": 1}))  # wrong type
    p.write_text("\n".join(lines) + "\n")
    s = JsonlStore(p, FIELDS)
    assert sorted(s.records) == [r["key"] for r in good]
    assert s.problems == ["line 3: field 'logp' missing or not int or float",
                          "line 5: not JSON (Unterminated string starting at, column 17)",
                          "line 6: a JSON int, not an object",
                          "line 7: field 'logp' missing or not int or float"]
    msg = s.warning("reference cache")
    assert msg.startswith(f"reference cache {p}: dropped 4 damaged line(s) (line 3: ")
    assert msg.endswith("they were removed from the file, and their entries are recomputed")
    assert _lines(p) == good                     # repaired: only the good lines, in order
    again = JsonlStore(p, FIELDS)                # said once: the next load finds nothing to say
    assert again.problems == [] and again.warning("reference cache") is None
    assert sorted(again.records) == sorted(s.records)


def test_torn_tail_is_cut_in_place_and_a_complete_last_line_kept(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"key": "a", "v": 1}\n{"key": "b", "v"')
    ino = p.stat().st_ino
    s = JsonlStore(p)
    assert sorted(s.records) == ["a"] and s.problems == ["line 2: torn (an interrupted write)"]
    assert p.read_text() == '{"key": "a", "v": 1}\n' and p.stat().st_ino == ino  # truncated, not rewritten
    p.write_text('{"key": "a", "v": 1}\n{"key": "b", "v": 2}')                       # an edited file
    s = JsonlStore(p)
    assert sorted(s.records) == ["a", "b"] and s.problems == [] and p.read_text().endswith("}\n")


def test_append_after_a_killed_writer_cuts_its_torn_line_first(tmp_path):
    p = tmp_path / "c.jsonl"
    s = JsonlStore(p)                            # opened before the other writer died
    s.put_many([{"key": "a", "v": 1}])
    with open(p, "a") as fh:
        fh.write('{"key": "x", "v"')             # another process, killed mid-line
    s.put_many([{"key": "b", "v": 2}])
    assert _lines(p) == [{"key": "a", "v": 1}, {"key": "b", "v": 2}]


def test_a_second_writer_sees_the_first_ones_lines_and_writes_no_duplicate(tmp_path):
    p = tmp_path / "c.jsonl"
    a, b = JsonlStore(p), JsonlStore(p)
    a.put_many([{"key": "x", "v": 1}, {"key": "y", "v": 2}])
    b.put_many([{"key": "y", "v": 2}, {"key": "z", "v": 3}])   # y computed by both: written once
    assert [r["key"] for r in _lines(p)] == ["x", "y", "z"]
    assert sorted(b.records) == ["x", "y", "z"]


WRITER = textwrap.dedent("""
    import sys, time
    from mmrlhf_lite.cache.store import JsonlStore
    path, name, start, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = JsonlStore(path)
    print("ready", flush=True)
    for i in range(start, start + n):
        # keys overlap between the two writers (both compute k50..k99), payload ~2 KiB per line
        store.put_many([{"key": f"k{i}", "by": name, "pad": "x" * 2000}, {"key": f"k{i}b", "by": name}])
        time.sleep(0.002)
""")


def test_two_writers_and_a_kill_lose_nothing_duplicate_nothing(tmp_path):
    p = tmp_path / "shared.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    a = subprocess.Popen([sys.executable, str(script), str(p), "a", "0", "100"], stdout=subprocess.PIPE,
                         env=_env(), text=True)
    b = subprocess.Popen([sys.executable, str(script), str(p), "b", "50", "100"], stdout=subprocess.PIPE,
                         env=_env(), text=True)
    try:
        assert a.stdout.readline().strip() == "ready" and b.stdout.readline().strip() == "ready"
        time.sleep(0.15)
        b.send_signal(signal.SIGKILL)            # b dies somewhere in its appends
        assert a.wait(timeout=60) == 0
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    raw = p.read_bytes()
    assert raw.endswith(b"\n")
    recs = _lines(p)                             # every line parses: nothing torn in the middle
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys)), "a key was written twice"
    want_a = {f"k{i}" for i in range(100)} | {f"k{i}b" for i in range(100)}
    assert want_a <= set(keys), "a line of the surviving writer was lost"
    # the next run computes only what is missing: b's range k100..k149 not yet written
    from mmrlhf_lite.data.groups import PreferenceGroup, Response

    groups = [PreferenceGroup(id=str(i), prompt="p", responses=[Response(f"r{i}"), Response(f"s{i}")])
              for i in range(50, 150)]
    store_keys = [[f"k{i}", f"k{i}b"] for i in range(50, 150)]
    store = JsonlStore(p)
    asked: list[str] = []

    def compute(batch):
        asked.extend(g.id for g in batch)
        return [[{"by": "next"} for _ in g.responses] for g in batch]

    class _Quiet:
        def progress(self, *a, **k):
            pass

        def metrics(self, *a, **k):
            pass

    fill_missing(groups, store_keys, store, compute, per_batch=8, events=_Quiet())
    missing_before = {str(i) for i in range(50, 150) if f"k{i}" not in keys or f"k{i}b" not in keys}
    assert set(asked) == missing_before
    final = [r["key"] for r in _lines(p)]
    assert len(final) == len(set(final)) and set(final) >= {k for ks in store_keys for k in ks}


def _repair_under_a_file_size_limit(path: Path, limit: int) -> int:
    """Open `path` as a store in a process that the kernel kills (SIGXFSZ) the moment it writes past
    `limit` bytes: a kill in the middle of a write, at the worst moment for an in-place rewrite."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = ("import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it\n"
            "from mmrlhf_lite.cache.store import JsonlStore; JsonlStore(sys.argv[1])")
    return subprocess.run([sys.executable, "-c", code, str(path)], env=_env(), preexec_fn=small_files,
                          capture_output=True, timeout=120).returncode


def test_a_kill_during_the_repair_loses_no_good_line(tmp_path):
    """The old repair rewrote the file in place (`open(path, "wb")`): killed during that write, the cache
    was gone. Now a torn tail is cut with os.truncate (nothing written) and middle lines are dropped by
    write-and-rename (a kill leaves the old file whole; the next repair removes the partial copy)."""
    p = tmp_path / "big.jsonl"
    good = b"".join(json.dumps({"key": f"k{i}", "pad": "y" * 200}).encode() + b"\n" for i in range(2000))
    p.write_bytes(good + b'{"key": "torn"')                 # torn tail
    rc = _repair_under_a_file_size_limit(p, 64 * 1024)
    assert p.read_bytes() == good, f"good lines lost (repair exit code {rc})"
    half = good.index(b'{"key": "k1000"')
    mid = good[:half] + b'{"key": 1}\n' + good[half:]
    p.write_bytes(mid)                                      # a bad line in the middle: rewritten
    rc = _repair_under_a_file_size_limit(p, 64 * 1024)
    assert rc == -signal.SIGXFSZ                            # killed while writing the new copy
    assert p.read_bytes() == mid
    assert JsonlStore(p).problems == ["line 1001: no string field 'key'"]   # without a limit: repaired
    assert p.read_bytes() == good and sorted(f.name for f in tmp_path.iterdir()) == ["big.jsonl", "big.jsonl.lock"]


def test_a_cache_that_cannot_be_repaired_still_leaves_bad_lines_out(tmp_path):
    """A read-only or full cache folder: the lock (or the repair) cannot be written. Here the lock path is
    a folder, which fails the same way for root too."""
    p = tmp_path / "c.jsonl"
    p.write_text('{"key": "a", "logp": 1.0, "n_tokens": 1}\n{"key": "b"}\n')
    (tmp_path / "c.jsonl.lock").mkdir()
    s = JsonlStore(p, FIELDS)
    assert sorted(s.records) == ["a"] and s.repair_error
    assert "the file could not be repaired (Is a directory), so this is said again next time" in s.warning("x")


def test_an_adapter_saved_twice_has_one_fingerprint_whatever_order_peft_lists_its_modules(tmp_path):
    """peft writes `target_modules` from a set, so two processes saving the same adapter can list them in
    another order (seen: two identical reward runs got different reward-cache keys and split their groups
    over the ranks differently). Key order and those lists' order do not change the fingerprint; their
    content does."""
    from mmrlhf_lite.cache.store import directory_fingerprint

    def adapter(name: str, config: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(config))
        (d / "adapter_model.safetensors").write_bytes(b"\0" * 64)
        return d

    a = adapter("a", {"r": 16, "target_modules": ["q_proj", "v_proj", "o_proj"], "modules_to_save": ["head", "x"]})
    b = adapter("b", {"modules_to_save": ["x", "head"], "target_modules": ["o_proj", "q_proj", "v_proj"], "r": 16})
    c = adapter("c", {"r": 16, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["head", "x"]})
    fp = lambda d: directory_fingerprint(d, hash_files=("adapter_model.safetensors",))  # noqa: E731
    assert fp(a) == fp(b)
    assert fp(a) != fp(c)
