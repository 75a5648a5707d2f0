"""Property-based fuzzing of every reader of user files (hypothesis): mutated data rows, recipes, cache
lines and event lines. The property is the same everywhere: no traceback and no unexpected exception; a
refusal is the project's own error class (DataError / MediaError, RecipeError) whose message names the
file and line or the key; a CLI exits 0, 1 or 2; a cache or event reader skips what it cannot read and
says which line.

Seeded (`derandomize`) and bounded (`max_examples`), so CI runs the same cases every time in well under a
minute; the number of cases generated per target is printed at the end of the module (`-s` not needed).

    python -m pytest -q tests/test_fuzz.py -p no:cacheprovider
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmrlhf_lite.cache.store import JsonlStore
from mmrlhf_lite.data.errors import REASONS, DataError
from mmrlhf_lite.data.media import MediaError
from mmrlhf_lite.data.readers import load_groups
from mmrlhf_lite.events import read_events
from mmrlhf_lite.recipe import RecipeError, load_recipe, recipe_fields

REPO = Path(__file__).resolve().parents[1]
CASES: Counter = Counter()  # target -> generated cases


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


COUNTS_FILE = "fuzz_counts.{worker}.json"  # one per xdist worker; conftest.pytest_terminal_summary adds them


@pytest.fixture(scope="module", autouse=True)
def _report_counts(cache_dir):
    CASES.clear()
    yield
    (cache_dir / COUNTS_FILE.format(worker=os.environ.get("PYTEST_XDIST_WORKER", "main"))).write_text(json.dumps({"session": os.environ.get("MMRLHF_LITE_TEST_SESSION"),
                                                     "counts": dict(CASES)}, indent=1))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "red.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
                                    + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return root


# --------------------------------------------------------------------------------------------------
# strategies: mutations of valid rows

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
ODD_TEXT = st.one_of(
    st.text(alphabet=st.characters(codec=None), max_size=40),           # any code point, surrogates too
    st.sampled_from(["<image>", "<image><image>", "<|im_end|>", "<|vision_start|><|image_pad|>", "\u202e\u200b",
                     "\x00", "\ufeff", "é" * 3, "🙂" * 5, "<video>", " ", ""]),
    st.text(min_size=5000, max_size=12000).map(lambda t: t or "x" * 6000),  # overlong
)


def valid_rows():
    ranked = {"id": "g1", "category": "colour", "prompt": "<image>What colour is it?", "images": ["red.png"],
              "responses": [{"text": "Red.", "rank": 1, "critique": "Right."},
                            {"text": "Blue.", "rank": 2, "critique": "Wrong."}]}
    pair = {"id": "p1", "prompt": "<image>What colour?", "image": "red.png", "chosen": "Red.", "rejected": "Blue."}
    trl = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
           "images": ["red.png"], "chosen": [{"role": "assistant", "content": "Red."}],
           "rejected": [{"role": "assistant", "content": "Blue."}]}
    return [ranked, pair, trl]


def _paths(obj, prefix=()):
    """Every (path) to a value inside a row (dict keys and list indices)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_row(draw) -> bytes:
    row = json.loads(json.dumps(draw(st.sampled_from(valid_rows()))))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(row) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = row
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["drop", "retype", "odd_text", "image_ref", "dup_key"]))
        if op == "drop":
            parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
        elif op == "retype":
            parent[path[-1]] = draw(JSON_VALUE)
        elif op == "odd_text":
            parent[path[-1]] = draw(ODD_TEXT)
        elif op == "image_ref":
            parent[path[-1]] = draw(st.sampled_from(["broken.png", "bomb.png", "missing.png", "../../etc/passwd", "/dev/zero",
                                                     ".", "red.png", ["red.png", "red.png"], {"bytes": "AAAA"}]))
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(JSON_VALUE)
    line = json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    damage = draw(st.sampled_from(["none", "none", "bytes", "truncate", "not_object"]))
    if damage == "bytes":
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.binary(min_size=1, max_size=4)) + line[at:]
    elif damage == "truncate":
        line = line[: draw(st.integers(0, max(0, len(line) - 1)))]
    elif damage == "not_object":
        line = json.dumps(draw(JSON_LEAF)).encode()
    return line


def _check_data_error(exc: Exception, path: Path) -> None:
    msg = str(exc)
    assert str(path) in msg, msg
    if isinstance(exc, DataError):
        assert exc.reason in REASONS
        if exc.reason not in ("bad_source", "too_few_responses"):
            assert re.search(rf"{re.escape(str(path))}:\d+", msg), msg   # row-level: file:line


@fuzz(250)
@given(lines=st.lists(mutated_row(), min_size=1, max_size=3), on_error=st.sampled_from(["raise", "skip"]))
def test_data_reader_names_file_and_line_for_any_mutated_row(media, lines, on_error):
    CASES["data rows -> load_groups"] += 1
    path = media / "rows.jsonl"
    good = json.dumps(valid_rows()[0]).encode()
    path.write_bytes(b"\n".join([good] + lines) + b"\n")
    try:
        result = load_groups(str(path), on_error=on_error, allow_empty=True)
    except (DataError, MediaError) as exc:
        _check_data_error(exc, path)
        return
    for err in result.errors:
        _check_data_error(err, path)
    for g in result.groups:
        assert len(g.responses) >= 2
        # what loads can be tokenized and written: no unpaired surrogate reaches a model or a cache line
        json.dumps([g.prompt, [r.text for r in g.responses], [r.critique for r in g.responses]],
                   ensure_ascii=False, default=str).encode("utf-8")


@fuzz(40)
@given(body=st.one_of(st.binary(max_size=200), mutated_row()), suffix=st.sampled_from([".json", ".jsonl"]))
def test_whole_file_formats_never_crash(media, body, suffix):
    CASES["whole files (.json/.jsonl) -> load_groups"] += 1
    path = media / f"whole{suffix}"
    path.write_bytes(body if suffix == ".jsonl" else b"[" + body + b"]")
    try:
        load_groups(str(path), on_error="skip", allow_empty=True)
    except (DataError, MediaError) as exc:
        assert str(path) in str(exc), str(exc)


# --------------------------------------------------------------------------------------------------
# recipes

KEYS = [k for k, _, _ in recipe_fields()]


@st.composite
def recipe_tree(draw):
    tree: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)))
        parts = key.split(".") if draw(st.booleans()) else [key]
        node = tree
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = draw(JSON_VALUE)
    return tree


def _check_recipe_error(exc: RecipeError, path: Path) -> None:
    msg = str(exc)
    assert msg.startswith(str(path)), msg
    assert exc.key or re.match(rf"{re.escape(str(path))}(:\d+)?: ", msg), msg


@fuzz(250)
@given(tree=recipe_tree(), raw=st.one_of(st.none(), st.binary(max_size=80), st.text(max_size=80)))
def test_recipe_loader_names_file_and_key_or_line(tmp_path, tree, raw):
    CASES["recipes -> load_recipe"] += 1
    import yaml

    path = tmp_path / "fuzz.yaml"
    if raw is None:
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    else:
        path.write_bytes(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    try:
        load_recipe(path, check_paths=False)
    except RecipeError as exc:
        _check_recipe_error(exc, path)


@fuzz(250)
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), value=st.one_of(JSON_LEAF.map(json.dumps),
                                                                                  st.text(max_size=12)))
def test_recipe_overrides_name_the_key(tmp_path, key, value):
    CASES["overrides key=value -> load_recipe"] += 1
    path = tmp_path / "base.yaml"
    path.write_text("model:\n  path: tiny:qwen2_vl:xs\n")
    try:
        load_recipe(path, [f"{key}={value}"], check_paths=False)
    except RecipeError as exc:
        assert str(exc).startswith(str(path)) and "override" in str(exc) or "key" in str(exc), str(exc)


def _main(argv) -> tuple[int, str, str]:
    from mmrlhf_lite import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


CHOICES = {k: f.metadata.get("choices") or () for k, f, _ in recipe_fields()}
PLAUSIBLE = ["0", "1", "2", "-1", "0.5", "1e9", "true", "false", "null", "[]", "tiny:nope", "./nowhere", "a/b",
             "tiny:llava_onevision:xs", "16GB"]


@st.composite
def override(draw) -> tuple[str, str]:
    """A key of the recipe with a value of its kind (one of its choices, a small or huge number, null, a
    path), so that most cases get past validation into the data, the checks and the plan."""
    key = draw(st.sampled_from([k for k in KEYS if k.split(".")[0] in ("model", "data", "run", "reward", "cache")]))
    values = [str(c) for c in CHOICES[key]] + PLAUSIBLE
    return key, draw(st.one_of(st.sampled_from(values), JSON_LEAF.map(json.dumps)))


@fuzz(12)
@given(kv=override())
def test_dry_run_in_process_exits_0_1_2_without_an_unexpected_error(media, kv):
    key, value = kv
    CASES["recipe overrides -> --dry-run (in process)"] += 1
    rows = media / "dry.jsonl"
    if not rows.exists():
        rows.write_text("".join(json.dumps({**valid_rows()[0], "id": f"g{i}"}) + "\n" for i in range(4)))
    recipe = media / "dry.yaml"
    recipe.write_text(f"model:\n  path: tiny:qwen2_vl:xs\n  device: cpu\ndata:\n  path: {rows}\n  eval_fraction: 0\n"
                      f"run:\n  dir: {media / 'runs' / 'dry'}\n")
    code, out, err = _main([recipe, f"{key}={value}", "--dry-run", "--stages", "reward"])
    assert code in (0, 1, 2), (code, err)
    assert "the full trace is in" not in err, err          # an error the project did not expect
    if code == 2:
        assert "key '" in err or "error: " in err, err
    if code == 1:
        assert "ERROR: " in out or "error: " in err


@st.composite
def odd_text_row(draw) -> bytes:
    """A valid ranked row whose prompt, responses or critiques hold odd text (special tokens, `<image>`,
    control and bidi characters, overlong): rows that load and reach the tokenizer."""
    row = json.loads(json.dumps(valid_rows()[0]))
    row["id"] = draw(st.text(min_size=1, max_size=8))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["prompt", "r0", "r1", "c0"]))
        text = draw(ODD_TEXT)
        if where == "prompt":
            row["prompt"] = "<image>" + text if draw(st.booleans()) else text
        elif where == "c0":
            row["responses"][0]["critique"] = text
        else:
            row["responses"][int(where[1])]["text"] = text
    return json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@fuzz(15)
@given(lines=st.lists(st.one_of(odd_text_row(), odd_text_row(), mutated_row()), min_size=1, max_size=3),
       on_error=st.sampled_from(["raise", "skip"]))
def test_dry_run_in_process_on_mutated_data(media, lines, on_error):
    """Rows that load go on to the token counter of the dry run (special tokens, `<image>` in answers,
    overlong and odd text): it reports, it does not crash."""
    CASES["data rows -> --dry-run (in process)"] += 1
    rows = media / "dry-rows.jsonl"
    good = [json.dumps({**valid_rows()[0], "id": f"ok{i}",
                        "responses": [{"text": f"Red {i}.", "rank": 1}, {"text": f"Blue {i}.", "rank": 2}]}).encode()
            for i in range(2)]
    rows.write_bytes(b"\n".join(good + lines) + b"\n")
    recipe = media / "dry-rows.yaml"
    recipe.write_text(f"model:\n  path: tiny:qwen2_vl:xs\n  device: cpu\ndata:\n  path: {rows}\n  eval_fraction: 0\n"
                      f"  on_error: {on_error}\nrun:\n  dir: {media / 'runs' / 'dry-rows'}\n")
    code, out, err = _main([recipe, "--dry-run"])
    assert code in (0, 1), (code, err)
    assert "the full trace is in" not in err, err
    if code == 1:
        assert str(rows) in err or "ERROR: " in out, (out, err)


# --------------------------------------------------------------------------------------------------
# cache lines

FIELDS = {"logp": (int, float), "n_tokens": int}


@st.composite
def cache_line(draw) -> bytes:
    rec = {"key": draw(st.text(min_size=1, max_size=8)), "logp": -1.25, "n_tokens": 3}
    op = draw(st.sampled_from(["good", "drop", "retype", "extra", "bytes", "truncate", "leaf"]))
    if op == "drop":
        rec.pop(draw(st.sampled_from(sorted(rec))))
    elif op == "retype":
        rec[draw(st.sampled_from(sorted(rec)))] = draw(JSON_VALUE)
    elif op == "extra":
        rec[draw(st.text(max_size=5))] = draw(JSON_VALUE)
    line = json.dumps(rec, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if op == "bytes":
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.binary(min_size=1, max_size=3)) + line[at:]
    elif op == "truncate":
        line = line[: draw(st.integers(0, len(line) - 1))]
    elif op == "leaf":
        line = json.dumps(draw(JSON_LEAF)).encode()
    return line.replace(b"\n", b" ")


@fuzz(250)
@given(lines=st.lists(cache_line(), max_size=8), newline_at_end=st.booleans())
def test_cache_store_drops_bad_lines_once_and_keeps_good_ones(tmp_path, lines, newline_at_end):
    CASES["cache lines -> JsonlStore"] += 1
    path = tmp_path / "reference.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline_at_end and lines else b""))
    store = JsonlStore(path, FIELDS)
    for rec in store.records.values():
        assert isinstance(rec["logp"], (int, float)) and type(rec["n_tokens"]) is int
    for problem in store.problems:
        assert re.match(r"line \d+: ", problem)
    if store.problems:
        assert str(path) in store.warning("reference cache")
    again = JsonlStore(path, FIELDS)                    # repaired: nothing more to say, the same records
    assert again.problems == [] and again.records == store.records
    store.put_many([{"key": "new", "logp": 0.5, "n_tokens": 1}])
    assert "new" in JsonlStore(path, FIELDS)


# --------------------------------------------------------------------------------------------------
# event lines and the UI's run readers

EVENT_TYPES = ["run_start", "run_end", "stage_start", "stage_end", "progress", "metrics", "warning", "error", "log"]


@st.composite
def event_line(draw) -> bytes:
    ev = {"time": draw(st.floats(0, 2e9)), "type": draw(st.sampled_from(EVENT_TYPES)),
          "stage": draw(st.sampled_from(["reward", "dpo", "data", None]))}
    for name in draw(st.lists(st.sampled_from(["n", "total", "step", "seconds", "status", "message", "tokens",
                                                "gpu_mem_gb", "stages", "skip", "loss", "time", "type"]),
                              max_size=4)):
        ev[name] = draw(st.one_of(JSON_VALUE, st.integers(0, 100), st.just(["reward", "dpo"])))
    line = json.dumps(ev).encode()
    damage = draw(st.sampled_from(["none", "none", "none", "bytes", "leaf", "truncate"]))
    if damage == "bytes":
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.binary(min_size=1, max_size=3)).replace(b"\n", b"") + line[at:]
    elif damage == "leaf":
        line = json.dumps(draw(JSON_LEAF)).encode()
    elif damage == "truncate":
        line = line[: draw(st.integers(0, len(line) - 1))]
    return line


@fuzz(250)
@given(lines=st.lists(event_line(), max_size=10))
def test_event_readers_and_ui_run_views_skip_what_they_cannot_read(tmp_path, lines):
    CASES["event lines -> read_events + UI run readers"] += 1
    from mmrlhf_lite.ui import jobs, runview

    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "events.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    damaged: list[str] = []
    events, _ = read_events(run, damaged=damaged)
    assert len(events) + len(damaged) == sum(1 for ln in lines if ln.strip())
    views = runview.stage_views(events)
    runview.progress_html(views)
    for name in runview.CURVES:
        runview.curve_frame(events, name)
    runview.tokens_per_second(events, 4)
    runview.gpu_memory(events)
    runview.point_counts(events)
    runview.messages(events)
    runview.final_metrics(events)
    jobs.job_state(run, events)
    tail = runview.EventTail()
    assert tail.events(run) == events and len(tail.damaged(run)) == len(damaged)


@fuzz(150)
@given(job=st.one_of(st.binary(max_size=40), JSON_VALUE.map(lambda v: json.dumps(v).encode())),
       lock=st.one_of(st.binary(max_size=20), st.integers(-2 ** 70, 2 ** 70).map(lambda n: f"{n} 1.0".encode())),
       status=st.one_of(st.binary(max_size=40), JSON_VALUE.map(lambda v: json.dumps(v).encode())))
def test_run_folder_files_of_any_content_read_as_absent_or_valid(tmp_path, job, lock, status):
    CASES["ui_job.json / run.lock / stages/*.json -> run readers"] += 1
    from mmrlhf_lite.runs import LOCK_FILE, RunDir
    from mmrlhf_lite.ui import jobs

    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True, exist_ok=True)
    (run / jobs.JOB_FILE).write_bytes(job)
    (run / LOCK_FILE).write_bytes(lock)
    for stage in ("reward", "score"):
        (run / "stages" / f"{stage}.json").write_bytes(status)
    state = jobs.job_state(run, [])
    assert state.status in ("new", "starting", "running", "stopping", "done", "stopped", "error", "interrupted")
    rd = RunDir(run)
    rd.stale_stages()
    rd.is_done("score")


@fuzz(80)
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
       config=st.one_of(st.none(), st.binary(max_size=30), JSON_VALUE.map(lambda v: json.dumps(v).encode())))
def test_damaged_adapter_files_are_named_or_load(tmp_path, cut, flips, config):
    """Truncated or byte-flipped safetensors and adapter configs of any content: the loader's check names
    the file as damaged, or the file really loads (the check never lets a broken file through)."""
    CASES["adapter files (safetensors, config) -> check_saved_files"] += 1
    import torch
    from safetensors.torch import load_file, save_file

    from mmrlhf_lite.models.loading import ModelLoadError, check_saved_files

    folder = tmp_path / "reward" / "final"
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "adapter_model.safetensors"
    save_file({"lora_A": torch.ones(4, 8), "lora_B": torch.zeros(8, 4)}, str(weights))
    data = bytearray(weights.read_bytes())
    for at, byte in flips:
        data[at % len(data)] = byte
    weights.write_bytes(bytes(data[: len(data) - cut % len(data)] if cut else data))
    (folder / "adapter_config.json").write_bytes(config if config is not None else b'{"r": 8}')
    try:
        check_saved_files(folder, "saved adapter")
    except ModelLoadError as exc:
        assert "is damaged" in str(exc) and str(folder) in str(exc) and "--redo reward" in str(exc), str(exc)
        return
    load_file(str(weights))
    assert isinstance(json.loads((folder / "adapter_config.json").read_bytes()), dict)


# --------------------------------------------------------------------------------------------------
# a handful through the real CLI

@fuzz(4)
@given(lines=st.lists(mutated_row(), min_size=1, max_size=3))
def test_data_stats_cli_on_mutated_files(media, lines):
    CASES["data rows -> python -m mmrlhf_lite.data stats (subprocess)"] += 1
    path = media / "cli.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "mmrlhf_lite.data", "stats", str(path)], env=env,
                         capture_output=True, text=True, timeout=120, cwd=media)
    assert out.returncode in (0, 1, 2), out.stderr
    assert "Traceback" not in out.stderr and "the full trace is in" not in out.stderr, out.stderr
    if out.returncode:
        assert str(path) in out.stderr, out.stderr
