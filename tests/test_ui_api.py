"""The web UI's actions through its API (gradio_client), against a real `python app.py` with temp roots:
upload (good, bad, too big, not data), preview, recipe form, start / stop / resume a job, the live
view, the reward playground and cache browser, compare, save as recipe.

    python -m pytest -q tests/test_ui_api.py
"""
from __future__ import annotations

import math
import shutil

import pytest
import yaml

from test_ui_support import demo_zip, events, start_server, stop_server, wait_for

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from mmrlhf_lite.ui import jobs  # noqa: E402
from mmrlhf_lite.ui.form import FIELDS  # noqa: E402

KEYS = [f.key for f in FIELDS]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("ui-api"), "--max-upload-mb", "1")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False, download_files=False)


def form(client, recipe: str, **changes) -> tuple[list, str]:
    values = list(client.predict(recipe, api_name="/load_recipe"))
    run_name = values.pop()
    by_key = dict(zip(KEYS, values))
    for key, value in changes.items():
        by_key[key.replace("__", ".")] = value
    return [by_key[k] for k in KEYS], run_name


def settle(client, server, name: str, status: str, timeout: float) -> dict:
    """The app's view of run `name` once it shows `status`. Waited for in the run folder first (read here:
    asking the app's view twice a second while a job trains is the app's work, each call building every curve,
    the log and the runs table), then in the view, which can lag a moment behind (a trainer that wrote its
    last event and is exiting is still "running" there)."""
    wait_for(lambda: jobs.job_state(server.runs / name).status == status, timeout,
             what=f"{name} {status}; app log:\n{server.log()[-2000:]}")

    def shown():
        v = view(client, name)
        return v if f"status: **{status}**" in v["status"] else None
    return wait_for(shown, 60, what=f"the view of {name} saying {status}")


def view(client, run: str) -> dict:
    out = client.predict(run, api_name="/view")
    names = ["status", "progress", "error", "points", "reward_loss", "reward_acc", "dpo_loss", "dpo_acc", "margins",
             "beta", "tokens", "gpu", "log", "jobs"]
    return dict(zip(names, out))


@pytest.fixture(scope="module")
def uploaded(client, tmp_path_factory):
    """The demo set uploaded as a .zip (data file + images)."""
    zip_path = demo_zip(tmp_path_factory.mktemp("zip"))
    update = client.predict(handle_file(str(zip_path)), api_name="/upload")
    return update["value"]


@pytest.fixture(scope="module")
def job(client, server, uploaded):
    """The tiny recipe's reward, score and eval stages (the browser test runs all five), started first so
    it trains while the quick tests run, and asked to stop at once: the stop is held until the job takes
    its run lock, so it stops during the reward stage."""
    values, _ = form(client, "tiny.yaml", data__path=uploaded, run__stages=["reward", "score", "eval"])
    status, run_update = client.predict("tiny-api", *values, api_name="/start")
    stop_message = client.predict("tiny-api", api_name="/stop")
    return {"status": status, "run_update": run_update, "values": values, "stop": stop_message}


def test_upload_zip_shows_preview(client, server, uploaded, job):
    assert uploaded == "uploads/demo-data/demo.jsonl"
    assert (server.data / uploaded).is_file() and len(list((server.data / "uploads/demo-data/images").iterdir())) == 20
    summary, problems, slider, gallery, question, responses, pairs = client.predict(
        uploaded, "auto", "", "", api_name="/inspect")
    assert "20 groups from 20 rows (ranked); no problems found" in summary
    assert problems["data"] == []
    assert slider["maximum"] == 19
    assert len(gallery) == 1 and gallery[0]["caption"] == "image 1"
    assert "demo-00000" in question and "demo-data/demo.jsonl:1" in question
    assert responses["headers"][:3] == ["#", "rank", "response"] and len(responses["data"]) == 4
    assert sorted(r[1] for r in responses["data"]) == [1, 2, 3, 4]
    assert "Pairs training forms** (6; better > worse)" in pairs
    # another group, by index
    gallery, question, responses, _ = client.predict(uploaded, "auto", "", 5, "", api_name="/group")
    assert "demo-00005" in question


def test_bad_upload_lists_each_problem_with_file_line_and_fix(client, server, tmp_path):
    good = (server.data / "uploads/demo-data/demo.jsonl").read_text().splitlines()[0]
    bad = tmp_path / "bad rows.jsonl"
    bad.write_text("\n".join([good, "{not json", good.replace("images/demo-00000.png", "images/missing.png")
                              .replace('"demo-00000"', '"other"'), "[1, 2]"]) + "\n")
    name = client.predict(handle_file(str(bad)), api_name="/upload")["value"]
    assert name == "uploads/bad_rows.jsonl"
    # alone, its images are missing: every row is listed, none hidden behind the first error
    summary, problems, *_ = client.predict(name, "auto", "", "", api_name="/inspect")
    assert "no preference groups were loaded from 4 row(s); all 4 skipped" in summary
    assert [r[0] for r in problems["data"]] == [f"uploads/bad_rows.jsonl:{i}" for i in (1, 2, 3, 4)]
    # with the media root of the uploaded images, the good row loads
    summary, problems, *_ = client.predict(name, "auto", "uploads/demo-data", "", api_name="/inspect")
    assert "1 groups from 4 rows" in summary and "3 row(s) skipped" in summary
    rows = {r[0].rsplit(":", 1)[1]: r for r in problems["data"]}
    assert set(rows) == {"2", "3", "4"}
    assert "malformed JSON" in rows["2"][1] and "fix the JSON" in rows["2"][2]
    assert "image not found" in rows["3"][1] and "media root" in rows["3"][2]
    assert "object" in rows["4"][2]


def test_unusable_uploads_are_refused_with_a_clear_message(client, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AppError, match="Invalid file type.*jsonl"):  # gradio checks file_types first
        client.predict(handle_file(str(text)), api_name="/upload")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    name = client.predict(handle_file(str(empty)), api_name="/upload")["value"]
    summary, *_ = client.predict(name, "auto", "", "", api_name="/inspect")
    assert summary.startswith("**Cannot use") and "no preference groups were loaded" in summary
    big = tmp_path / "big.jsonl"
    big.write_bytes(b" " * (2 * 2**20))
    with pytest.raises(Exception, match="(?i)too large|size|limit|413"):
        client.predict(handle_file(str(big)), api_name="/upload")


def test_form_comes_from_the_recipe_dataclasses(client):
    values, run_name = form(client, "tiny.yaml")
    by_key = dict(zip(KEYS, values))
    assert run_name.startswith("tiny-")
    assert by_key["reward.train.max_steps"] == 3 and by_key["model.load_in_4bit"] is False
    assert by_key["dpo.beta"] == 0.1 and by_key["run.stages"] == ["reward", "score", "reference", "dpo", "eval", "rounds"]
    assert by_key["model.lora_target_modules"].startswith("q_proj, k_proj")
    with pytest.raises(AppError, match="not found"):
        client.predict("nope.yaml", api_name="/load_recipe")


def test_start_stop_resume_and_live_view(client, server, job):
    assert "Started **tiny-api**" in job["status"] and job["run_update"]["value"] == "tiny-api"
    assert "stop requested for 'tiny-api'" in job["stop"]
    run = server.runs / "tiny-api"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["data"]["path"] == str(server.data / "uploads/demo-data/demo.jsonl")
    assert recipe["run"]["dir"] == str(run) and recipe["reward"]["train"]["max_steps"] == 3
    with pytest.raises(AppError, match="already exists"):
        client.predict("tiny-api", *job["values"], api_name="/start")
    last = list(client.predict("@last", api_name="/load_recipe"))   # "last used" = the newest run's recipe
    assert last.pop().startswith("tiny-api-")
    assert dict(zip(KEYS, last))["data.path"] == "uploads/demo-data/demo.jsonl"
    assert dict(zip(KEYS, last))["run.stages"] == ["reward", "score", "eval"]

    v = settle(client, server, "tiny-api", "stopped", 180)
    assert "data-stage='reward' data-status='stopped'" in v["progress"] and "stopped after" in v["progress"]
    assert "data-stage='score' data-status='pending'" in v["progress"]
    ends = [e for e in events(run) if e["type"] in ("stage_end", "run_end")]
    assert [(e["type"], e.get("stage"), e["status"]) for e in ends] == [("stage_end", "reward", "stopped"),
                                                                        ("run_end", None, "stopped")]
    steps_before = max(e["step"] for e in events(run) if e["type"] == "metrics")
    assert steps_before < 3 and list((run / "reward").rglob("checkpoint-*"))
    with pytest.raises(AppError, match="not running"):
        client.predict("tiny-api", api_name="/stop")

    assert "Resumed" in client.predict("tiny-api", api_name="/resume")
    settle(client, server, "tiny-api", "done", 300)
    evs = events(run)
    assert any(e["type"] == "log" and "resuming from" in e.get("message", "") for e in evs)
    steps = [e["step"] for e in evs if e["type"] == "metrics" and e.get("stage") == "reward" and "loss" in e]
    assert steps == list(range(1, 4))   # continued from the checkpoint, not restarted
    v = view(client, "tiny-api")
    assert v["points"] == "Curve points: reward 3"
    assert v["progress"].count("data-status='done'") == 3 and "ETA" not in v["progress"]
    assert [r[0] for r in v["reward_loss"]["data"] if r[2] == "total"] == [1, 2, 3]
    assert {r[2] for r in v["reward_acc"]["data"]} == {"train pairs", "held-out pairs"}
    # no DPO points: the beta and tokens/s plots hold only their series' names (NaN rows, not drawn)
    assert {r[2] for r in v["beta"]["data"]} == {"min", "mean", "max"} and {r[2] for r in v["tokens"]["data"]} == {"tokens/s"}
    assert all(r[0] is None and r[1] is None for r in v["beta"]["data"] + v["tokens"]["data"])
    assert "== stage eval: done" in v["log"] and v["error"] == ""
    assert ["tiny-api", "done", "reward, score, eval"] == v["jobs"]["data"][0][:3]
    with pytest.raises(AppError, match="has finished"):
        client.predict("tiny-api", api_name="/resume")


def test_start_launches_only_what_the_preflight_accepts(client, server, job):
    """A model folder that does not exist: the pre-flight names it, Start refuses and makes no run folder."""
    values, _ = form(client, "tiny.yaml", model__path="./no-such-model")
    estimate = client.predict("broken-api", *values, 1, "none", api_name="/estimate")  # (Start's state: no API)
    assert "cannot start" in estimate and "model.path" in estimate and "path not found" in estimate
    with pytest.raises(AppError, match="pre-flight does not accept.*model.path.*path not found"):
        client.predict("broken-api", *values, api_name="/start")
    assert not (server.runs / "broken-api").exists()
    # a taken run name is the pre-flight's too
    values, _ = form(client, "tiny.yaml", data__path="uploads/demo-data/demo.jsonl")
    estimate = client.predict("tiny-api", *values, 1, "none", api_name="/estimate")
    assert "cannot start" in estimate and "run name 'tiny-api' is taken" in estimate


def test_a_failing_job_shows_a_readable_error(client, server, job, tmp_path):
    """A model folder with its config but no weights passes the pre-flight and fails as the job loads it: the
    view shows the CLI's message, no traceback."""
    from mmrlhf_lite.models.tiny import ensure_tiny

    half = tmp_path / "no-weights"
    half.mkdir()
    for f in ensure_tiny("tiny:qwen2_vl").iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, half / f.name)
    values, _ = form(client, "tiny.yaml", model__path=str(half), data__path="uploads/demo-data/demo.jsonl",
                     run__stages=["reward"])
    client.predict("broken-api", *values, api_name="/start")
    v = settle(client, server, "broken-api", "error", 180)
    assert v["error"].startswith("**Error:** ") and "Traceback" not in v["error"], v["error"]
    assert "Traceback" not in v["log"]


def test_playground_cache_compare_and_save(client, server, job):
    values = job["values"]
    image = server.data / "uploads/demo-data/images/demo-00001.png"
    cards, table = client.predict("tiny-api", handle_file(str(image)), "What shape is the object?",
                                  "It is a circle.", "It is a square.", "", "It is a star.", "", "generate", 4,
                                  api_name="/score")
    assert cards.count("class='mm-card'") == 3
    ranks = sorted(r[1] for r in table["data"])
    assert ranks == [1, 2, 3] and all(math.isfinite(r[2]) for r in table["data"])
    assert [r[3] for r in table["data"]] == ["It is a circle.", "It is a square.", "It is a star."]

    summary, pairs = client.predict("tiny-api", api_name="/reward_cache")
    assert "pairs** in 20 groups" in summary
    rows = pairs["data"]
    head = pairs["headers"]
    for r in rows[:20]:
        delta, beta_i = r[head.index("delta")], r[head.index("beta")]
        assert beta_i == pytest.approx(max(1e-3, 0.1 * (1 + 0.1 * (1 - math.exp(-0.5 * delta)))), abs=2e-5)

    table, plot = client.predict(["tiny-api"], "reward_loss", api_name="/compare")
    assert table["headers"] == ["metric", "tiny-api"]  # a row per metric, a column per run
    rows = dict(map(tuple, table["data"]))
    assert rows["status"] == "done" and rows["Acc (none)"].endswith("%")
    assert {r[2] for r in plot["data"]} == {"tiny-api: total", "tiny-api: ranking (BT)", "tiny-api: critique CE"}

    status, _ = client.predict("my-recipe", *values, api_name="/save_recipe")
    saved = yaml.safe_load((server.recipes / "my-recipe.yaml").read_text())
    assert saved["reward"]["train"]["max_steps"] == 3 and saved["run"]["dir"] == "runs/my-recipe"
    with pytest.raises(AppError, match="already exists"):
        client.predict("my-recipe", *values, api_name="/save_recipe")
