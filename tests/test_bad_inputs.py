"""Damaged and hostile inputs met through the real entry points, one test per example of each class
(docs/errors.md): `python -m mmrlhf_lite.train`, `python -m mmrlhf_lite.data stats`,
`python -m mmrlhf_lite.evaluate`, and the UI's run readers. Each gives exit 1 or 2 (or 0 with a named
warning), no traceback, and a message naming the file and line or the key. Each command is run once as a real
process (its exit code, nothing printed by the interpreter); the other calls run its `main` in the test process
(tests/run_support.run_main: the same code, exit code and output, without ~7 CPU s of imports each).

    python -m pytest -q tests/test_bad_inputs.py -p no:cacheprovider
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image
from run_support import run_main

from mmrlhf_lite.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny:qwen2_vl:xs"


def _run(module: str, *args, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    return out


def train(*args, cwd, **kw):
    return _run("mmrlhf_lite.train", *args, cwd=cwd, **kw)


@pytest.fixture
def here(capsys):
    """`here(module, *args, cwd=...)`: the command `python -m module args` run in this process (run_main)."""
    from mmrlhf_lite.data.__main__ import main as data_main
    from mmrlhf_lite.evaluate.__main__ import main as evaluate_main
    from mmrlhf_lite.train import main as train_main

    mains = {"mmrlhf_lite.train": train_main, "mmrlhf_lite.data": data_main, "mmrlhf_lite.evaluate": evaluate_main}
    return lambda module, *args, cwd: run_main(mains[module], args, cwd=cwd, capsys=capsys)


@pytest.fixture
def train_here(here):
    """`train_here(*args, cwd=...)`: `python -m mmrlhf_lite.train args` run in this process."""
    return lambda *args, cwd: here("mmrlhf_lite.train", *args, cwd=cwd)


def rows(n: int = 6) -> list[dict]:
    return [{"id": f"g{i}", "prompt": f"<image>What colour is shape {i}?", "images": ["red.png"],
             "responses": [{"text": f"It is red, shape {i}.", "rank": 1, "critique": "Right."},
                           {"text": f"It is blue, shape {i}.", "rank": 2, "critique": "Wrong colour."}]}
            for i in range(n)]


@pytest.fixture
def data(tmp_path) -> Path:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return path


@pytest.fixture
def recipe(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n  path: {TINY}\n  device: cpu\n  load_in_4bit: false\ndata:\n  path: {data.name}\n"
                    "  eval_fraction: 0\nreward:\n  max_new_tokens: 8\n  critique_mode: given\n"
                    "  train: {max_steps: 1, groups_per_step: 2, grad_accum: 1, max_length: 512}\n"
                    "dpo:\n  w: 0\n  margin_source: none\n"
                    "  train: {max_steps: 1, groups_per_step: 2, grad_accum: 1, max_length: 512}\n"
                    "run:\n  dir: runs/a\n")
    return path


def latin1(tmp_path) -> Path:
    lines = [json.dumps(r).encode() for r in rows()]
    lines[2] = lines[2].replace(b"red, shape 2", b"r\xe9d, shape 2")     # one Latin-1 byte
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def bomb(tmp_path) -> Path:
    """A 100-byte PNG whose header claims 30000 x 30000 pixels (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(png)
    rs = rows()
    rs[1]["images"] = ["bomb.png"]
    path = tmp_path / "bomb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    return path


def run_folder(tmp_path, recipe: Path) -> Path:
    """A folder with the recipe.yaml that `evaluate` reads its model settings from."""
    run = tmp_path / "runs" / "ev"
    run.mkdir(parents=True)
    load_recipe(recipe).save(run / "recipe.yaml")
    return run


# --------------------------------------------------------------------------------------------------
# 1. text that is not UTF-8

def test_non_utf8_line_under_data_stats_train_and_evaluate(tmp_path, recipe, here, train_here):
    bad = latin1(tmp_path)
    want = "latin1.jsonl:3: not UTF-8 text: byte 0xe9 at byte "
    out = _run("mmrlhf_lite.data", "stats", bad, cwd=tmp_path)
    assert out.returncode == 1 and want in out.stderr and "re-encode the file as UTF-8" in out.stderr
    assert "file offset " in out.stderr
    out = train(recipe, f"data.path={bad}", "--dry-run", cwd=tmp_path)
    assert out.returncode == 1 and want in out.stderr, out.stderr
    out = train_here(recipe, f"data.path={bad}", "data.on_error=skip", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0 and "skipped 1 row(s): 1 bad_encoding" in out.stderr, out.stderr
    out = here("mmrlhf_lite.evaluate", "reward", run_folder(tmp_path, recipe), "--data", bad, cwd=tmp_path)
    assert out.returncode == 1 and want in out.stderr, out.stderr


def test_unpaired_surrogate_escape_is_refused_at_its_row_and_key(tmp_path, recipe, train_here):
    """`"\\ud800"` alone is valid JSON but no character: it used to reach the tokenizer and fail there
    (`TypeError: TextEncodeInput must be Union[...]`, under --dry-run)."""
    rs = rows()
    rs[3]["responses"][1]["text"] = "It is blue \ud800."
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rs))
    out = train_here(recipe, f"data.path={bad}", "--dry-run", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "surrogate.jsonl:4: key 'responses[1].text': text holds an unpaired UTF-16 surrogate escape" in out.stderr


# --------------------------------------------------------------------------------------------------
# 2. images too large to open

def test_decompression_bomb_is_a_validation_error_naming_row_image_and_key(tmp_path, recipe, train_here):
    bad = bomb(tmp_path)
    for out in (_run("mmrlhf_lite.data", "stats", bad, cwd=tmp_path),
                train_here(recipe, f"data.path={bad}", "--dry-run", cwd=tmp_path)):
        assert out.returncode == 1, out.stderr
        assert "bomb.jsonl:2: key 'images': image too large to open: " in out.stderr
        assert "bomb.png is 30000x30000 = 900,000,000 pixels, over the limit of 178,956,970" in out.stderr
        assert "raise data.max_image_pixels" in out.stderr
    out = train_here(recipe, f"data.path={bad}", "data.on_error=skip", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0 and "1 image_too_large" in out.stderr
    out = train_here(recipe, f"data.path={bad}", "data.max_image_pixels=1000", "--dry-run", cwd=tmp_path)
    assert out.returncode == 1 and "red.png is 32x32 = 1,024 pixels, over the limit of 1,000" in out.stderr


# --------------------------------------------------------------------------------------------------
# 3. cache lines that parse but have the wrong shape; 4. damaged model files

def _damage_middle_line(path: Path, drop: str) -> str:
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    del rec[drop]
    lines[1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    return rec["key"]


def test_reference_cache_line_without_logp_is_dropped_once_and_recomputed(tmp_path, recipe, train_here):
    out = train_here(recipe, "--stages", "reference", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cache = tmp_path / "runs" / "a" / "cache" / "reference.jsonl"
    n = len(cache.read_text().splitlines())
    key = _damage_middle_line(cache, "logp")
    out = train_here(recipe, "--stages", "dpo", cwd=tmp_path)       # the next stage, which read rec["logp"]
    assert out.returncode == 0, out.stderr
    assert ("[dpo] WARNING: reference cache runs/a/cache/reference.jsonl: dropped 1 damaged line(s) (line 2: field "
            "'logp' missing") in out.stderr
    assert "computing them now" in out.stderr
    recs = [json.loads(ln) for ln in cache.read_text().splitlines()]
    assert len(recs) == n and sum(r["key"] == key for r in recs) == 1 and all("logp" in r for r in recs)
    out = train_here(recipe, "--stages", "dpo", "--redo", "dpo", cwd=tmp_path)
    assert out.returncode == 0 and "damaged line" not in out.stderr     # said once: the file was repaired


def test_reward_cache_damage_recomputed_and_damaged_adapter_named(tmp_path, recipe, train_here):
    out = train_here(recipe, "--stages", "reward,score", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cache = tmp_path / "runs" / "a" / "cache" / "reward.jsonl"
    _damage_middle_line(cache, "critiques")
    shared = [f"reward.model_from={tmp_path / 'runs' / 'a'}", f"cache.dir={tmp_path / 'runs' / 'a' / 'cache'}"]
    out = train_here(recipe, "run.dir=runs/b", *shared, "--stages", "score", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"reward cache {cache}: dropped 1 damaged line(s) (line 2: field 'critiques' missing" in out.stderr
    assert "(1 computed, 11 from cache)" in out.stderr
    # 4. a truncated adapter: named, said damaged, and what rebuilds it; in the dry run as in the run
    adapter = tmp_path / "runs" / "a" / "reward" / "final" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:40])
    want = f"saved adapter file {adapter} is damaged: unreadable safetensors"
    out = train_here(recipe, "run.dir=runs/c", *shared, "--stages", "score", "--dry-run", cwd=tmp_path)
    assert out.returncode == 1 and want in out.stdout and "--redo reward" in out.stdout, out.stdout
    out = train_here(recipe, "--stages", "score", "--redo", "score", cwd=tmp_path)   # the run's own reward model
    want = "saved adapter file runs/a/reward/final/adapter_model.safetensors is damaged: unreadable safetensors"
    assert out.returncode == 1 and want in out.stderr and "rebuild it with --redo reward" in out.stderr, out.stderr


# --------------------------------------------------------------------------------------------------
# 5. malformed lines in events.jsonl (the UI's runs table and live view)

def test_damaged_events_file_shows_the_run_as_damaged_not_a_crash(tmp_path):
    from mmrlhf_lite.events import read_events
    from mmrlhf_lite.ui import jobs
    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.tabs.live import LiveHandlers

    runs = tmp_path / "runs"
    for name in ("bad", "good"):
        rd = runs / name
        rd.mkdir(parents=True)
        load_recipe(None, [f"run.dir={rd}"], check_paths=False).save(rd / "recipe.yaml")
        good = [{"time": 1.0, "type": "run_start", "stages": ["reward"], "skip": []},
                {"time": 2.0, "type": "run_end", "status": "done"}]
        lines = [json.dumps(e).encode() for e in good]
        if name == "bad":
            lines[1:1] = [b'{"time": 1.5, "type": "log", "message": "caf\xe9"}', b"42",
                          b'{"time": "soon", "type": "progress"}', b'{"time": 1.6, "type": "metrics", "step": "x"}']
        (rd / "events.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    damaged: list[str] = []
    events, _ = read_events(runs / "bad", damaged=damaged)
    assert [e["type"] for e in events] == ["run_start", "run_end"]
    assert [d.split(": ", 1)[1] for d in damaged] == ["not UTF-8", "a JSON int, not an object", "no number 'time'",
                                                      "field 'step' is not int"]
    assert jobs.job_state(runs / "bad").status == "done"
    h = LiveHandlers(UIConfig(data_root=tmp_path, runs_root=runs, recipes_root=tmp_path, upload_dir=tmp_path,
                              max_upload_bytes=1))
    table = h.jobs_frame().set_index("run")
    assert table.loc["good", "status"] == "done"
    assert table.loc["bad", "status"] == "done (damaged: 4 unreadable line(s) in events.jsonl)"
    status, *_rest = h.view("bad")
    text = " ".join(str(x) for x in _rest[:2])
    assert "events.jsonl: skipped 4 unreadable line(s) (byte " in text
    # a damaged ui_job.json or stage status file reads as absent, not as a crash
    (runs / "bad" / "ui_job.json").write_bytes(b"[1, 2]")
    (runs / "bad" / "stages").mkdir()
    (runs / "bad" / "stages" / "reward.json").write_bytes(b"\xff\xfe")
    assert h.jobs_frame().set_index("run").loc["bad", "stages done"] == "-"


# --------------------------------------------------------------------------------------------------
# 6. accepted silently although it cannot work

@pytest.mark.parametrize("override, want", [
    ("model.path=tiny:nosuchfamily", "ERROR: model.path 'tiny:nosuchfamily': no tiny model for family 'nosuchfamily'"),
    ("model.backend=unsloth", "ERROR: model.backend=unsloth needs a CUDA GPU"),
    ("model.path=mymodels/qwen", "ERROR: model.path 'mymodels/qwen' is neither a local folder nor in the Hugging "
                                 "Face cache, and the hub is offline"),
    ("model.path=models/qwen/v1", "ERROR: model.path 'models/qwen/v1' is not an existing folder (nor a hub id"),
])
def test_dry_run_refuses_what_the_real_run_refuses(tmp_path, recipe, override, want, train_here):
    out = train_here(recipe, override, "--dry-run", cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    assert want in out.stdout and "plan OK" not in out.stdout


def test_empty_recipe_says_it_uses_the_defaults(tmp_path, train_here):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    out = train_here(empty, "--dry-run", "--stages", "reward", "data.demo.groups=8", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith(f"warning: {empty}: recipe is empty: using the defaults")


def test_evaluate_refuses_negative_max_groups_and_names_its_format_flag(tmp_path, recipe):
    run = run_folder(tmp_path, recipe)
    out = _run("mmrlhf_lite.evaluate", "reward", run, "--data", "good.jsonl", "--max-groups", "-3", cwd=tmp_path)
    assert out.returncode == 2 and "argument --max-groups: must be >= 0 (0 = all groups), got -3" in out.stderr
    assert not (run / "eval").exists()
    out = _run("mmrlhf_lite.evaluate", "reward", run, "--data", "good.jsonl", "--format", "csv", cwd=tmp_path)
    assert out.returncode == 2 and "argument --format: invalid choice: 'csv'" in out.stderr
    assert "data.format" not in out.stderr


# --------------------------------------------------------------------------------------------------
# 7. messages that name the wrong thing

def test_yaml_error_at_the_line_where_the_bracket_opened(tmp_path, data, train_here):
    path = tmp_path / "y.yaml"
    path.write_text(f"model:\n  path: {TINY}\ndata:\n  path: {data.name}\nreward: {{train: [1, 2\n"
                    "run:\n  dir: runs/x\n")
    out = train_here(path, "--dry-run", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {path}:5: not valid YAML: a flow sequence starts here (column 17) and is "
                                 "never closed"), out.stderr


def test_gpu_mem_that_is_not_a_size_is_a_usage_error_before_any_work(tmp_path, recipe):
    out = train(recipe, "--dry-run", "--gpu-mem", "lots", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.endswith("error: --gpu-mem: cannot read memory size 'lots'; give a number with a unit, e.g. "
                               "--gpu-mem 16GB or --gpu-mem 24GiB\n")
    assert "data:" not in out.stderr and not (tmp_path / "runs").exists()


def test_run_dir_that_is_a_file(tmp_path, recipe, train_here):
    (tmp_path / "afile").write_text("x")
    out = train_here(recipe, "run.dir=afile", "--stages", "score", cwd=tmp_path)
    assert (out.returncode, out.stderr) == (1, "error: run.dir 'afile' is a file, not a folder; choose another "
                                               "run.dir (e.g. run.dir=runs/try2) or move the file away\n")
    out = train_here(recipe, "run.dir=afile/sub", "--dry-run", cwd=tmp_path)
    assert out.returncode == 1 and "run.dir 'afile/sub' lies under 'afile', which is a file" in out.stderr


def test_reward_model_from_that_is_not_a_run_is_caught_in_the_preflight(tmp_path, recipe, train_here):
    (tmp_path / "notarun").mkdir()
    want = (f"reward.model_from '{tmp_path / 'notarun'}' holds no trained reward model (not a run folder; "
            f"expected {tmp_path / 'notarun' / 'reward' / 'final'}/adapter_config.json)")
    out = train_here(recipe, "reward.model_from=notarun", "--stages", "score", "--dry-run", cwd=tmp_path)
    assert out.returncode == 1 and f"ERROR: {want}" in out.stdout, out.stdout
    out = train_here(recipe, "reward.model_from=notarun", "--stages", "score", cwd=tmp_path)
    assert out.returncode == 1 and want in out.stderr and "not starting" in out.stderr, out.stderr
