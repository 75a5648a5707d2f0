"""Unit tests of the UI's helpers (no server, no browser): path safety, the recipe form, job states read
from run folders, the live view's numbers (progress, ETA, tokens/s), the data report, the reward
cache browser and the compare table.

    python -m pytest -q tests/test_ui_units.py
"""
from __future__ import annotations

import json
import math
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from mmrlhf_lite.recipe import Recipe, recipe_fields
from test_ui_support import wait_for
from mmrlhf_lite.ui import compare, databrowser, form, jobs, playground, runview
from mmrlhf_lite.ui.safety import Refused, check_bind, clean_filename, inside, is_local_host, parse_auth, safe_name


def write_events(run: Path, events: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


# --------------------------------------------------------------------------------------------------
# safety

def test_inside_resolves_under_the_root_and_refuses_everything_else(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.jsonl").write_text("{}")
    (root / "link").symlink_to(outside)
    assert inside(root, "sub/a.jsonl") == (root / "sub" / "a.jsonl").resolve()
    assert inside(root, "sub/../sub/a.jsonl") == (root / "sub" / "a.jsonl").resolve()
    for bad, why in (("../outside", "outside"), ("sub/../../outside", "outside"), ("link/x", "outside"),
                     ("/etc/passwd", "absolute"), ("", "no path"), ("a\x00b", "NUL")):
        with pytest.raises(Refused, match=why):
            inside(root, bad)
    assert inside(root, str(root / "sub"), allow_absolute=True) == (root / "sub").resolve()
    with pytest.raises(Refused, match="outside"):
        inside(root, str(outside), allow_absolute=True)


def test_names_and_upload_filenames():
    assert safe_name("tiny-2026.run_1") == "tiny-2026.run_1"
    for bad in ("../x", "a/b", "..", ".hidden", "", "x" * 81, "a b", "a..b"):
        with pytest.raises(Refused, match="not allowed"):
            safe_name(bad)
    assert clean_filename("../../etc/pass wd.jsonl") == "pass_wd.jsonl"
    assert clean_filename("C:\\evil\\..\\x.zip") == "x.zip"
    assert clean_filename("...") == "upload"


def test_bind_rules():
    assert is_local_host("127.0.0.1") and is_local_host("localhost") and is_local_host("::1")
    assert is_local_host("127.0.0.2") and not is_local_host("0.0.0.0") and not is_local_host("10.0.0.1")
    assert "this machine only" in check_bind("127.0.0.1", None)
    with pytest.raises(Refused, match="without a login.*--auth user:password"):
        check_bind("0.0.0.0", None)
    assert "login required for user 'ann'" in check_bind("0.0.0.0", ("ann", "pw"))
    assert parse_auth("ann:p:w") == ("ann", "p:w") and parse_auth(None) is None
    for bad in ("ann", ":pw", "ann:"):
        with pytest.raises(Refused):
            parse_auth(bad)


# --------------------------------------------------------------------------------------------------
# the recipe form

def test_form_has_every_recipe_field_with_the_clis_help_text():
    keys = {k: f for k, f, _ in recipe_fields()}
    assert [s.key for s in form.FIELDS] == [k for k in keys if k != "run.dir"]
    for spec in form.FIELDS:
        assert spec.help == keys[spec.key].metadata["help"] and spec.help
        assert spec.info.startswith(spec.help)
    kinds = {s.key: s.kind for s in form.FIELDS}
    assert kinds["model.load_in_4bit"] == "bool" and kinds["model.backend"] == "choice"
    assert kinds["model.lora_r"] == "int" and kinds["dpo.beta"] == "float" and kinds["run.stages"] == "multi"
    assert kinds["model.lora_target_modules"] == "list"
    assert {s.key for s in form.FIELDS if s.optional} >= {"model.max_pixels", "data.eval_path", "cache.dir"}


def test_form_round_trip_gives_the_defaults(tmp_path):
    defaults = Recipe().to_dict()
    values = form.form_values(defaults, tmp_path)
    tree = form.values_tree(values)
    expected = {k: v for k, v in defaults.items()}
    expected["run"] = {k: v for k, v in defaults["run"].items() if k != "dir"}
    assert tree == expected
    text = form.run_recipe(values, data_root=tmp_path, runs_root=tmp_path, run_dir=tmp_path / "r")
    assert yaml.safe_load(text)["run"]["dir"] == str(tmp_path / "r")


def test_form_errors_name_the_key(tmp_path):
    values = form.form_values(Recipe().to_dict(), tmp_path)
    keys = [s.key for s in form.FIELDS]

    def start(key, value):
        assert key in keys
        return form.run_recipe(values.replace({key: value}), data_root=tmp_path, runs_root=tmp_path,
                               run_dir=tmp_path / "r")
    with pytest.raises(Refused, match="key 'dpo.beta': must be > 0"):
        start("dpo.beta", -1)
    with pytest.raises(Refused, match="reward.train.max_steps: expected a whole number"):
        start("reward.train.max_steps", 2.5)
    with pytest.raises(Refused, match="key 'model.backend'"):
        start("model.backend", "tensorflow")
    with pytest.raises(Refused, match="at least one stage"):
        start("run.stages", [])
    with pytest.raises(Refused, match="does not exist under the data root"):
        start("data.path", "missing.jsonl")


def test_recipe_paths_show_relative_to_the_data_root(tmp_path):
    (tmp_path / "data" / "sets").mkdir(parents=True)
    (tmp_path / "data" / "sets" / "a.jsonl").write_text("{}")
    tree = Recipe().to_dict()
    tree["data"]["path"] = str(tmp_path / "data" / "sets" / "a.jsonl")
    values = form.form_values(tree, tmp_path / "data")
    assert values["data.path"] == "sets/a.jsonl"
    tree["data"]["path"] = "/elsewhere/b.jsonl"
    values = form.form_values(tree, tmp_path / "data")
    assert values["data.path"] == "/elsewhere/b.jsonl"  # shown as is; Start refuses it


def test_save_recipe_never_overwrites(tmp_path):
    values = form.form_values(Recipe().to_dict(), tmp_path)
    path = form.save_recipe(values, "mine", recipes_root=tmp_path, data_root=tmp_path, runs_root=tmp_path)
    assert yaml.safe_load(path.read_text())["run"]["dir"] == "runs/mine"
    with pytest.raises(Refused, match="already exists"):
        form.save_recipe(values, "mine.yaml", recipes_root=tmp_path, data_root=tmp_path, runs_root=tmp_path)


# --------------------------------------------------------------------------------------------------
# job states from run folders

T = 1_000.0


@pytest.mark.parametrize("tail,status,message", [
    ([{"type": "run_end", "status": "done"}], "done", ""),
    ([{"type": "stage_end", "stage": "reward", "status": "stopped"}, {"type": "run_end", "status": "stopped"}],
     "stopped", ""),
    ([{"type": "error", "stage": "reward", "message": "CUDA out of memory"},
      {"type": "run_end", "status": "error", "message": "CUDA out of memory"}], "error", "CUDA out of memory"),
    ([], "interrupted", "killed?"),
])
def test_job_state_from_events(tmp_path, tail, status, message):
    run = tmp_path / "r"
    write_events(run, [{"time": T, "type": "run_start", "stages": ["reward"], "skip": []}]
                 + [dict(e, time=T + 1) for e in tail])
    state = jobs.job_state(run)
    assert state.status == status and message in state.message
    assert state.resumable == (status in ("stopped", "error", "interrupted")) and not state.active


def test_job_that_failed_before_its_events_shows_the_clis_message(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    assert jobs.job_state(run).status == "new"
    (run / "ui_job.json").write_text(json.dumps({"pid": 999_999_999, "started": T}))
    (run / "console.log").write_text("=== launched: python -m mmrlhf_lite.train\nerror: r/recipe.yaml, key "
                                     "'dpo.beta': must be > 0, got -1\n")
    state = jobs.job_state(run)
    assert state.status == "error" and state.message.startswith("error: r/recipe.yaml, key 'dpo.beta'")
    (run / "console.log").write_text("=== launched: x\nTraceback (most recent call last):\n  File \"x\", line 1\n"
                                     "ImportError: cannot import name 'y'\n")
    state = jobs.job_state(run)
    assert state.message == "error: ImportError: cannot import name 'y'" and "File" not in state.message


@pytest.fixture
def alive_trainer():
    """A live process whose command line names mmrlhf_lite.train (what job_state checks a pid against): a job
    that is still there, without the cost of one."""
    proc = trainer_stand_in()
    yield proc
    proc.kill()
    proc.wait()


def trainer_stand_in():
    """A sleeping process whose command line names mmrlhf_lite.train, once it has exec'd (its command line is
    empty for a moment after the spawn)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "mmrlhf_lite.train"])
    wait_for(lambda: b"mmrlhf_lite.train" in Path(f"/proc/{proc.pid}/cmdline").read_bytes(), 10, interval=0.01)
    return proc


def test_a_finishing_job_is_running_never_starting_again(tmp_path, alive_trainer):
    """The CLI releases its lock before its process exits: between the two, the job had gone back from
    running to "starting" (running -> starting -> done). Once its CLI began, it is running until it ends."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "ui_job.json").write_text(json.dumps({"pid": alive_trainer.pid, "started": T}))
    assert jobs.job_state(run).status == "starting"  # launched, no event yet
    write_events(run, [{"time": T + 2, "type": "run_start", "stages": ["reward"], "skip": []}])
    assert jobs.job_state(run).status == "running"  # no lock (released), the process still there
    write_events(run, [{"time": T + 2, "type": "run_start", "stages": ["reward"], "skip": []},
                       {"time": T + 9, "type": "run_end", "status": "done"}])
    assert jobs.job_state(run).status == "running" and jobs.job_state(run).active
    # an older run's events do not count for a new launch
    (run / "ui_job.json").write_text(json.dumps({"pid": alive_trainer.pid, "started": T + 60}))
    assert jobs.job_state(run).status == "starting"


def started_at(pid: int) -> int:
    """The kernel's start time of `pid` (clock ticks since boot), read here from /proc/<pid>/stat (field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def test_a_launch_whose_pid_another_trainer_was_given_is_over(tmp_path, alive_trainer):
    """A job's pid reused by a later trainer (another run's, the test suite's ranks: pid_max is often 32768, and
    threads draw from the same pool) made a finished run look running again, and the Live tab polled for good
    (seen in CI on a run that had ended). The launch records its process's start time; another process with
    the same pid is not the job."""
    run = tmp_path / "r"
    write_events(run, [{"time": T, "type": "run_start", "stages": ["reward"], "skip": []},
                       {"time": T + 9, "type": "run_end", "status": "done"}])
    start = started_at(alive_trainer.pid)
    (run / "ui_job.json").write_text(json.dumps({"pid": alive_trainer.pid, "proc_start": start, "started": T}))
    assert jobs.job_state(run).status == "running"   # the launched process itself, still there
    (run / "ui_job.json").write_text(json.dumps({"pid": alive_trainer.pid, "proc_start": start - 1, "started": T}))
    state = jobs.job_state(run)
    assert state.status == "done" and not state.active, state
    # the lock of a trainer started outside the app names its process the same way
    (run / "ui_job.json").unlink()
    (run / "run.lock").write_text(f"{alive_trainer.pid} {T} {start - 1}\n")
    assert jobs.job_state(run).status == "done"
    (run / "run.lock").write_text(f"{alive_trainer.pid} {T} {start}\n")
    assert jobs.job_state(run).status == "running"


def test_the_app_records_the_start_time_of_what_it_launches(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("run: {}\n")
    pid = jobs._launch(run)
    try:
        job = json.loads((run / "ui_job.json").read_text())
        assert job["pid"] == pid and job.get("proc_start") == started_at(pid)
    finally:
        proc = jobs._children.pop(pid)
        proc.kill()
        proc.wait()


def test_a_job_between_fork_and_exec_is_alive(monkeypatch, alive_trainer):
    """Right after the launch, the child's /proc cmdline is empty for a moment (it has not exec'd yet): a job
    the app launched read as ended then ("interrupted" just after Start). Empty means alive for our own child,
    not for another process's (a zombie)."""
    monkeypatch.setattr(jobs, "_cmdline", lambda pid: b"")
    monkeypatch.setitem(jobs._children, alive_trainer.pid, alive_trainer)
    assert jobs._proc_alive(alive_trainer.pid)
    del jobs._children[alive_trainer.pid]
    assert not jobs._proc_alive(alive_trainer.pid)


def _timer_on(timer) -> bool | None:
    """What a handler's timer output does: True / False turn it on / off, None leaves it (gr.skip())."""
    import gradio as gr

    return timer.active if isinstance(timer, gr.Timer) else None


def test_a_run_that_ends_while_its_view_is_read_is_shown_ended_before_the_timer_stops(tmp_path, alive_trainer):
    """Seen in CI: the Live tab stayed on "status: running" for good after the run was done. A tick read the
    run's view (running), the run ended, then the tick asked whether any run was active (none) and turned the
    timer off: no tick ever came to show the end. The same held for a view followed by the timer's check (a
    run picked, Start, a tab opened). Whether a run is active is now read before the view."""
    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.tabs.live import LiveHandlers

    runs = tmp_path / "runs"
    run = runs / "r"
    run.mkdir(parents=True)
    (run / "ui_job.json").write_text(json.dumps({"pid": alive_trainer.pid, "started": T}))
    start = {"time": T + 2, "type": "run_start", "stages": ["reward"], "skip": []}
    write_events(run, [start])
    h = LiveHandlers(UIConfig(data_root=tmp_path, runs_root=runs, recipes_root=tmp_path, upload_dir=tmp_path,
                              max_upload_bytes=1 << 20))
    read_view = h.parts

    trainer = alive_trainer

    def the_run_ends_after_its_view_is_read(name):
        out = read_view(name)
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
            write_events(run, [start, {"time": T + 9, "type": "run_end", "status": "done"}])
        return out

    # a tick
    shown, *_, sig = h.view("r")
    h.parts = the_run_ends_after_its_view_is_read
    status, *_, sig, timer = h.tick("r", sig)
    shown = status if isinstance(status, str) else shown  # (gr.skip(): unchanged on the page)
    assert "status: **running**" in shown
    assert _timer_on(timer) is not False, "the timer stopped on a view that shows the run running"
    h.parts = read_view
    status, *_, sig, timer = h.tick("r", sig)
    assert "status: **done**" in status and _timer_on(timer) is False  # the next tick shows the end, then stops

    # a view, then the timer's check (what follows a pick, a Start, the Live tab opened)
    trainer = trainer_stand_in()
    (run / "ui_job.json").write_text(json.dumps({"pid": trainer.pid, "started": T}))
    write_events(run, [start])
    h.parts = the_run_ends_after_its_view_is_read
    status, *_, sig = h.view("r")
    assert "status: **running**" in status
    assert _timer_on(h.follow(sig)) is True, "the timer stayed off after a view that shows the run running"
    h.parts = read_view
    status, *_, sig, timer = h.tick("r", sig)
    assert "status: **done**" in status and _timer_on(timer) is False


def finished_run(root: Path, name: str, **recipe) -> Path:
    run = root / name
    tree = Recipe().to_dict()
    tree["run"]["dir"] = str(run)
    for key, value in recipe.items():
        section, field = key.split("__")
        tree[section][field] = value
    write_events(run, [{"time": T, "type": "run_start", "stages": ["reward"], "skip": []},
                       {"time": T + 1, "type": "run_end", "status": "done"}])
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    (run / "console.log").write_text("=== launched\n[reward] step=1 loss=0.7\n")
    return run


def test_rename_moves_the_run_and_its_recipe_follows(tmp_path):
    run = finished_run(tmp_path, "old", cache__dir=str(tmp_path / "old" / "shared-cache"))
    assert jobs.rename_run(tmp_path, "old", "new") == "renamed run 'old' to 'new'"
    assert not run.exists() and (tmp_path / "new" / "events.jsonl").exists()
    tree = yaml.safe_load((tmp_path / "new" / "recipe.yaml").read_text())
    assert tree["run"]["dir"] == str((tmp_path / "new").resolve())
    assert tree["cache"]["dir"] == str((tmp_path / "new").resolve() / "shared-cache")
    assert jobs.job_state(tmp_path / "new").status == "done" and jobs.list_runs(tmp_path) == ["new"]
    finished_run(tmp_path, "other")
    with pytest.raises(Refused, match="exists already"):
        jobs.rename_run(tmp_path, "new", "other")
    with pytest.raises(Refused, match="not allowed"):
        jobs.rename_run(tmp_path, "new", "../escape")


def test_delete_and_rename_refuse_a_running_run_and_one_another_run_reads(tmp_path, alive_trainer):
    run = finished_run(tmp_path, "busy")
    (run / "ui_job.json").write_text(json.dumps({"pid": alive_trainer.pid, "started": T + 5}))
    for act in (lambda: jobs.delete_run(tmp_path, "busy"), lambda: jobs.rename_run(tmp_path, "busy", "idle")):
        with pytest.raises(Refused, match="is starting: Stop it"):
            act()
    assert run.exists()
    rm = finished_run(tmp_path, "rm")
    finished_run(tmp_path, "reader", reward__model_from=str(rm))
    with pytest.raises(Refused, match="read by run\\(s\\) reader"):
        jobs.delete_run(tmp_path, "rm")
    with pytest.raises(Refused, match="read by run\\(s\\) reader"):
        jobs.rename_run(tmp_path, "rm", "moved")
    jobs.delete_run(tmp_path, "reader")
    assert jobs.delete_run(tmp_path, "rm").startswith("deleted run 'rm' (") and not rm.exists()


def test_run_files_are_copies_of_the_log_and_report(tmp_path):
    run = finished_run(tmp_path / "runs", "r")
    (run / "eval").mkdir()
    (run / "eval" / "report.md").write_text("# report\n")
    out = tmp_path / "out"
    out.mkdir()
    files = jobs.run_files(run, out)
    assert [f.name for f in files] == ["r-console.log", "r-report.md"]
    assert all(out in f.parents for f in files) and files[1].read_text() == "# report\n"
    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    with pytest.raises(Refused, match="no log or report"):
        jobs.run_files(empty, out)


def test_tail_text_collapses_progress_redraws(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("start\nreward:  10%|#  | 1/10\rreward:  20%|## | 2/10\r[reward] step=2 loss=1\n\x1b[32mok\x1b[0m\n")
    assert jobs.tail_text(log) == "start\n[reward] step=2 loss=1\nok\n"


def test_list_runs_and_run_path(tmp_path):
    for name in ("a", "b"):
        write_events(tmp_path / name, [])
    (tmp_path / "not-a-run").mkdir()
    assert sorted(jobs.list_runs(tmp_path)) == ["a", "b"]
    assert jobs.run_path(tmp_path, "a") == (tmp_path / "a").resolve()
    # newest made first, and a run writing events does not move: seen in the browser, two running jobs writing
    # in turn swapped places in the open list, and the click meant for one picked the other
    import os

    for name, made in (("a", 1_000), ("b", 2_000)):
        for f in (tmp_path / name).iterdir():
            os.utime(f, (made, made))
        (tmp_path / name / "recipe.yaml").write_text("{}")
        os.utime(tmp_path / name / "recipe.yaml", (made, made))
    assert jobs.list_runs(tmp_path) == ["b", "a"]
    os.utime(tmp_path / "a" / "events.jsonl", (3_000, 3_000))  # a's job appends an event
    assert jobs.list_runs(tmp_path) == ["b", "a"]
    with pytest.raises(Refused):
        jobs.run_path(tmp_path, "../a")


# --------------------------------------------------------------------------------------------------
# live view numbers

def run_events():
    return [
        {"time": 0.0, "type": "run_start", "stages": ["reward", "score", "dpo"], "skip": ["score"]},
        {"time": 1.0, "type": "stage_start", "stage": "reward"},
        {"time": 10.0, "type": "progress", "stage": "reward", "n": 1, "total": 10, "unit": "step"},
        {"time": 10.5, "type": "metrics", "stage": "reward", "step": 1, "loss": 0.9, "pair_accuracy": 0.5},
        {"time": 14.0, "type": "progress", "stage": "reward", "n": 3, "total": 10, "unit": "step"},
        {"time": 14.1, "type": "metrics", "stage": "reward", "step": 3, "loss": 0.7, "pair_accuracy": 0.75},
        {"time": 14.2, "type": "metrics", "stage": "reward", "step": 3, "eval_pair_accuracy_given": 0.6},
    ]


def test_stage_progress_and_eta():
    views = {v.name: v for v in runview.stage_views(run_events())}
    r = views["reward"]
    assert (r.status, r.n, r.total) == ("running", 3, 10)
    assert r.rate == pytest.approx(2 / 4) and r.eta == pytest.approx(7 / 0.5)
    assert runview.stage_text(r) == "3/10 steps · 2.0 s/step · ETA 14s"
    assert views["score"].status == "skipped" and views["dpo"].status == "pending"
    done = run_events() + [{"time": 20.0, "type": "stage_end", "stage": "reward", "status": "done", "seconds": 19.0}]
    r = {v.name: v for v in runview.stage_views(done)}["reward"]
    assert r.fraction == 1.0 and runview.stage_text(r) == "done in 19s (3/10 steps)"
    html = runview.progress_html(runview.stage_views(done))
    assert "data-stage='reward' data-status='done'" in html and "data-status='skipped'" in html


def test_eta_follows_the_recent_step_rate():
    """After a resume the first steps came fast and later ones slowly (a busier machine): the ETA takes the
    pace of the last steps (RATE_WINDOW progress events), not the attempt's average: 5 steps of 1 s, then
    steps of 10 s; at step 11 of 20 the recent rate is 1 step per 10 s, so 9 steps are 90 s away."""
    events = [{"time": 0.0, "type": "run_start", "stages": ["dpo"], "skip": []},
              {"time": 0.0, "type": "stage_start", "stage": "dpo"}]
    t = 0.0
    for n in range(1, 12):
        t += 1.0 if n <= 5 else 10.0
        events.append({"time": t, "type": "progress", "stage": "dpo", "n": n, "total": 20, "unit": "step"})
    v = runview.stage_views(events)[0]
    assert v.rate == pytest.approx(5 / 50) and v.eta == pytest.approx(90.0)
    assert runview.stage_text(v) == "11/20 steps · 10.0 s/step · ETA 1m30s"


def test_stage_durations_survive_stop_and_resume():
    """Stop during dpo, then Resume: the stages done before the stop keep their durations (the resumed
    invocation skips them), and the stopped stage's time is the sum of its two pieces."""
    first = [
        {"time": 0.0, "type": "run_start", "stages": ["reward", "score", "dpo"], "skip": []},
        {"time": 1.0, "type": "stage_start", "stage": "reward"},
        {"time": 11.0, "type": "stage_end", "stage": "reward", "status": "done", "seconds": 10.0},
        {"time": 11.0, "type": "stage_start", "stage": "score"},
        {"time": 15.0, "type": "stage_end", "stage": "score", "status": "done", "seconds": 4.0},
        {"time": 15.0, "type": "stage_start", "stage": "dpo"},
        {"time": 17.0, "type": "progress", "stage": "dpo", "n": 2, "total": 10, "unit": "step"},
        {"time": 21.0, "type": "stage_end", "stage": "dpo", "status": "stopped", "seconds": 6.0},
        {"time": 21.0, "type": "run_end", "status": "stopped"},
    ]
    second = [
        {"time": 100.0, "type": "run_start", "stages": ["reward", "score", "dpo"], "skip": ["reward", "score"]},
        {"time": 101.0, "type": "stage_start", "stage": "dpo"},
        {"time": 102.0, "type": "progress", "stage": "dpo", "n": 3, "total": 10, "unit": "step"},
    ]
    running = {v.name: v for v in runview.stage_views(first + second)}
    assert runview.stage_text(running["reward"]) == "done earlier in 10s; skipped now: already done with these settings"
    assert runview.stage_text(running["score"]).startswith("done earlier in 4s")
    assert runview.stage_text(running["dpo"]) == "3/10 steps · 6s before the stop"
    end = [{"time": 107.0, "type": "stage_end", "stage": "dpo", "status": "done", "seconds": 5.5}]
    views = {v.name: v for v in runview.stage_views(first + second + end)}
    assert views["dpo"].seconds == pytest.approx(11.5) and views["dpo"].pieces == 2
    assert runview.stage_text(views["dpo"]) == "done in 12s in 2 pieces (Stop + Resume) (3/10 steps)"
    html = runview.progress_html(list(views.values()))
    assert "done earlier in 10s" in html and "done earlier in 4s" in html and "done in 12s in 2 pieces" in html
    # stopped twice: three pieces add up; a later --redo of the stage starts a new attempt (its own time only)
    again = [{"time": 103.0, "type": "stage_end", "stage": "dpo", "status": "stopped", "seconds": 2.0},
             {"time": 200.0, "type": "run_start", "stages": ["dpo"], "skip": []},
             {"time": 201.0, "type": "stage_start", "stage": "dpo"},
             {"time": 204.0, "type": "stage_end", "stage": "dpo", "status": "done", "seconds": 3.0}]
    dpo = runview.stage_views(first + second + again)[0]
    assert (dpo.seconds, dpo.pieces) == (pytest.approx(11.0), 3)
    redo = [{"time": 300.0, "type": "run_start", "stages": ["dpo"], "skip": []},
            {"time": 301.0, "type": "stage_start", "stage": "dpo"},
            {"time": 309.0, "type": "stage_end", "stage": "dpo", "status": "done", "seconds": 8.0}]
    dpo = runview.stage_views(first + second + again + redo)[0]
    assert (dpo.seconds, dpo.pieces) == (8.0, 1) and runview.stage_text(dpo) == "done in 8s"


def test_curves_and_point_counts():
    ev = run_events()
    frame = runview.curve_frame(ev, "reward_acc")
    assert frame.to_dict("records") == [{"step": 1, "value": 0.5, "series": "train pairs"},
                                        {"step": 3, "value": 0.75, "series": "train pairs"},
                                        {"step": 3, "value": 0.6, "series": "held-out pairs"}]
    assert runview.point_counts(ev) == {"reward": 2}
    assert set(runview.curve_frame(ev, "reward_loss", run_label="x")["series"]) == {"x: total"}


def round_events():
    """The rounds stage as it writes events: round 0's held-out numbers, then per round its progress, its MM-DPO
    steps (stage rounds, part dpo) and one metrics event (step = the round)."""
    held = lambda right, well, rank, score, imp: {"rounds_right_answers": right, "rounds_well_formed": well,
                                                  "rounds_reward_rank": rank, "rounds_reward_score": score,
                                                  "rounds_implicit_accuracy": imp}
    sampled = lambda right, kl, length: {"rounds_sampled_samples": 800, "rounds_sampled_reward_score": -48.0,
                                         "rounds_sampled_right_answers": right, "rounds_sampled_well_formed": 0.9,
                                         "rounds_sampled_empty": 0.0, "rounds_sampled_length_words": length,
                                         "rounds_sampled_kl_to_initial": kl, "rounds_groups": 150, "rounds_pairs": 400,
                                         "rounds_dropped_degenerate": 50, "rounds_dropped_tied": 0}
    return [
        {"time": 1.0, "type": "stage_start", "stage": "rounds"},
        {"time": 2.0, "type": "metrics", "stage": "rounds", "step": 0, "round": 0, **held(0.36, 0.5, 2.25, -49.5, 0.66)},
        {"time": 3.0, "type": "progress", "stage": "rounds", "round": 1, "part": "sample", "n": 4, "total": 8},
        {"time": 4.0, "type": "metrics", "stage": "rounds", "round": 1, "part": "dpo", "step": 10, "loss": 1.7},
        {"time": 4.5, "type": "metrics", "stage": "rounds", "round": 1, "part": "eval", "step": None,
         "eval_implicit_accuracy": 0.62},
        {"time": 5.0, "type": "metrics", "stage": "rounds", "step": 1, "round": 1,
         **held(0.4, 0.6, 1.75, -48.0, 0.7), **sampled(0.32, 0.0, 7.3)},
        {"time": 6.0, "type": "metrics", "stage": "rounds", "step": 2, "round": 2,
         **held(0.44, 0.62, 1.5, -47.0, 0.68), **sampled(0.43, 8.05, 7.7)},
    ]


def test_round_curves_have_one_point_per_round_from_the_round_metrics_events():
    ev = round_events()
    assert runview.has_rounds(ev) and not runview.has_rounds(run_events())
    assert runview.round_frame(ev, "rounds_held_out").to_dict("records") == [
        {"round": "0", "value": 0.36, "series": "right answers"}, {"round": "0", "value": 0.5, "series": "well-formed"},
        {"round": "0", "value": 0.66, "series": "implicit accuracy"},
        {"round": "1", "value": 0.4, "series": "right answers"}, {"round": "1", "value": 0.6, "series": "well-formed"},
        {"round": "1", "value": 0.7, "series": "implicit accuracy"},
        {"round": "2", "value": 0.44, "series": "right answers"}, {"round": "2", "value": 0.62, "series": "well-formed"},
        {"round": "2", "value": 0.68, "series": "implicit accuracy"}]
    # the round's MM-DPO steps (part dpo, step 10) are not a round
    assert runview.round_frame(ev, "rounds_drift").to_dict("records") == [
        {"round": "1", "value": 0.0, "series": "KL to pi_0 (nats)"}, {"round": "1", "value": 7.3, "series": "length (words)"},
        {"round": "2", "value": 8.05, "series": "KL to pi_0 (nats)"}, {"round": "2", "value": 7.7, "series": "length (words)"}]
    assert [(r["round"], r["value"]) for r in runview.round_frame(ev, "rounds_rank").to_dict("records")] == \
        [("0", 2.25), ("1", 1.75), ("2", 1.5)]
    # round 0 only: the sampled series have no point yet, each is named (a NaN row, not drawn) for its colour
    first = runview.round_plot(ev[:2], "rounds_sampled")
    assert list(first["series"]) == runview.round_series_labels("rounds_sampled") and first["value"].isna().all()
    assert runview.round_plot(ev[:2], "rounds_reward").dropna().to_dict("records") == [
        {"round": "0", "value": -49.5, "series": "held-out answers"}]
    # the rounds redone from round 0 (--redo rounds): rounds 1 and 2 of the first attempt are gone
    redo = ev + [{"time": 9.0, "type": "metrics", "stage": "rounds", "step": 0, "round": 0, "rounds_right_answers": 0.3}]
    assert runview.round_frame(redo, "rounds_held_out").to_dict("records") == [
        {"round": "0", "value": 0.3, "series": "right answers"}]
    # rounds past 9 keep their numeric order on the text axis
    many = [{"time": float(r), "type": "metrics", "stage": "rounds", "step": r, "rounds_reward_rank": 1.0 + r / 10}
            for r in range(12)]
    assert list(runview.round_frame(many, "rounds_rank")["round"]) == [str(r) for r in range(12)]


def test_live_view_shows_the_rounds_section_only_for_a_run_with_rounds(tmp_path):
    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.tabs.live import LiveHandlers

    cfg = UIConfig(data_root=tmp_path, runs_root=tmp_path / "runs", recipes_root=tmp_path, upload_dir=tmp_path,
                   max_upload_bytes=1 << 20)
    write_events(cfg.runs_root / "plain", run_events())
    write_events(cfg.runs_root / "online", round_events())
    asked = cfg.runs_root / "asked"
    write_events(asked, run_events())
    (asked / "recipe.yaml").write_text(yaml.safe_dump({"rounds": {"n": 3}}))
    h = LiveHandlers(cfg)
    parts = {name: h.parts(name) for name in ("plain", "online", "asked")}
    assert [parts[n]["rounds"]["visible"] for n in ("plain", "online", "asked")] == [False, True, True]
    held = parts["online"]["plot-rounds_held_out"]
    assert list(held["value"].dropna()["value"]) == [0.36, 0.5, 0.66, 0.4, 0.6, 0.7, 0.44, 0.62, 0.68]
    assert held["sort"] == ["0", "1", "2"]  # the x axis in numeric order
    assert parts["asked"]["plot-rounds_held_out"]["value"]["value"].isna().all()


def test_tokens_per_second_by_hand():
    ev = [{"time": 0.0, "type": "stage_start", "stage": "dpo"},
          {"time": 5.0, "type": "progress", "stage": "dpo", "n": 1, "total": 9},
          {"time": 5.1, "type": "metrics", "stage": "dpo", "step": 1, "tokens": 100.0},
          {"time": 6.0, "type": "progress", "stage": "dpo", "n": 2, "total": 9},
          {"time": 7.0, "type": "progress", "stage": "dpo", "n": 3, "total": 9},
          {"time": 7.1, "type": "metrics", "stage": "dpo", "step": 3, "tokens": 120.0}]
    # steps 1 -> 3: 2 optimizer steps x 4 micro-batches x 120 tokens in 7.0 - 5.0 s
    frame = runview.tokens_per_second(ev, grad_accum=4)
    assert frame.to_dict("records") == [{"step": 3, "value": pytest.approx(2 * 4 * 120 / 2.0), "series": "tokens/s"}]


def test_event_tail_reads_only_what_was_appended(tmp_path):
    run = tmp_path / "r"
    write_events(run, run_events()[:2])
    tail = runview.EventTail()
    assert len(tail.events(run)) == 2
    with open(run / "events.jsonl", "a") as fh:
        fh.write(json.dumps(run_events()[2]) + "\n" + '{"time": 1, "type": "prog')   # a half-written line
    assert len(tail.events(run)) == 3
    with open(run / "events.jsonl", "a") as fh:
        fh.write('ress", "stage": "reward", "n": 2}\n')
    assert tail.events(run)[-1]["n"] == 2
    write_events(run, run_events()[:1])   # replaced by a new file
    assert len(tail.events(run)) == 1


# --------------------------------------------------------------------------------------------------
# data report, uploads, zip

def test_every_data_problem_reason_has_a_fix():
    from mmrlhf_lite.data.errors import REASONS

    assert set(databrowser.FIXES) == set(REASONS)


def test_report_lists_every_bad_row_with_where_and_fix(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows = ['{"prompt": "q1", "chosen": "a", "rejected": "b"}', "{oops", '{"prompt": "q2", "chosen": "same", '
            '"rejected": "same"}', '{"prompt": "q3", "chosen": "a", "rejected": "b", "image": "nope.png"}']
    (root / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    report = databrowser.load_report(root, "pairs.jsonl")
    assert len(report.groups) == 1
    problems = databrowser.problems_frame(report, root).to_dict("records")
    assert [p["where"] for p in problems] == ["pairs.jsonl:2", "pairs.jsonl:3", "pairs.jsonl:4"]
    assert "malformed JSON" in problems[0]["problem"] and "fix the JSON" in problems[0]["how to fix"]
    assert "same text" in problems[1]["problem"] and "two different responses" in problems[1]["how to fix"]
    assert "image not found" in problems[2]["problem"] and str(root) not in problems[2]["problem"]
    summary = databrowser.summary_markdown(report)
    assert "1 groups from 4 rows" in summary and "3 row(s) skipped" in summary


def test_list_data_and_uploads(tmp_path):
    root, up = tmp_path / "data", tmp_path / "up"
    (root / "many").mkdir(parents=True)
    up.mkdir()
    for name in ("a.jsonl", "many/1.jsonl", "many/2.parquet", ".hidden.jsonl", "notes.txt"):
        (root / name).write_text("{}")
    assert databrowser.list_data(root) == ["a.jsonl", "many/", "many/1.jsonl", "many/2.parquet"]
    (up / "x.txt").write_text("hi")
    with pytest.raises(Refused, match="is not a data file"):
        databrowser.save_upload(str(up / "x.txt"), upload_dir=up, data_root=root, max_bytes=10**6)
    with pytest.raises(Refused, match="only from the app's upload folder"):
        databrowser.save_upload(str(root / "a.jsonl"), upload_dir=up, data_root=root, max_bytes=10**6)
    (up / "big.jsonl").write_text("x" * 2000)
    with pytest.raises(Refused, match="limit"):
        databrowser.save_upload(str(up / "big.jsonl"), upload_dir=up, data_root=root, max_bytes=1000)
    (up / "a.jsonl").write_text("{}")
    assert databrowser.save_upload(str(up / "a.jsonl"), upload_dir=up, data_root=root, max_bytes=10**6) == "uploads/a.jsonl"
    assert databrowser.save_upload(str(up / "a.jsonl"), upload_dir=up, data_root=root, max_bytes=10**6) == "uploads/a-1.jsonl"
    z = up / "set.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("set/rows.jsonl", "{}\n")
        zf.writestr("set/img/a.png", b"png")
        zf.writestr("set/run.sh", "rm -rf /")
        zf.writestr("__MACOSX/._rows.jsonl", "junk")
    assert databrowser.save_upload(str(z), upload_dir=up, data_root=root, max_bytes=10**6) == "uploads/set/set/rows.jsonl"
    assert sorted(p.relative_to(root / "uploads/set").as_posix() for p in (root / "uploads/set").rglob("*")
                  if p.is_file()) == ["set/img/a.png", "set/rows.jsonl"]
    bomb = up / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("rows.jsonl", " " * 5_000_000)
    with pytest.raises(Refused, match="unpacks to more than"):
        databrowser.save_upload(str(bomb), upload_dir=up, data_root=root, max_bytes=100_000)


def test_group_view_hides_images_outside_the_roots(tmp_path):
    from PIL import Image

    from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn

    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (900, 300), "red").save(root / "in.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "out.png")
    Image.new("RGB", (8, 8), "green").save(root / "in2.png")
    g = PreferenceGroup("g", [text_to_turn("q", 3)], [Response("a", rank=1), Response("b", rank=2)],
                        images=[str(root / "in.png"), str(tmp_path / "out.png"), str(root / "in2.png")])
    images, notes = databrowser.group_images(g, root)   # a multi-image sample shows all its images
    assert [label for _, label in images] == ["image 1", "image 3"] and images[0][0].size == (640, 213)
    assert images[1][0].getpixel((0, 0)) == (0, 128, 0)
    assert notes == ["image 2: outside the data root, not shown"]
    frame = databrowser.responses_frame(g, {"scores": [0.5, -0.25], "critiques": [["good"], ["bad"]]})
    assert frame[["rank", "reward score", "critique (reward model)"]].values.tolist() == [[1, 0.5, "good"],
                                                                                      [2, -0.25, "bad"]]
    assert databrowser.pairs_markdown(g).startswith("**Pairs training forms** (1; better > worse): #1 > #2")


def round_groups_run(runs: Path) -> Path:
    """A run folder with rounds 1, 2 and 10's groups.jsonl as the rounds stage writes them (`to_record` of the
    round's groups: the sampled answers with the reward model's scores and critiques), round 0 without any."""
    from PIL import Image

    from mmrlhf_lite.data.groups import PreferenceGroup, Response, text_to_turn

    run = runs / "online"
    (run / "data").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(run / "data" / "q1.png")
    (run / "rounds" / "0").mkdir(parents=True)
    (run / "rounds" / "0" / "round.json").write_text("{}")
    for r in (1, 2, 10):
        g = PreferenceGroup("q1", [text_to_turn("Which colour are the dots?", 1)],
                            [Response("Red.", score=2.5, critique="names the colour of the dots"),
                             Response("Blue dots.", score=-1.0, critique="the dots are red, not blue"),
                             Response(f"Round {r}.", score=0.5, critique="says no colour")],
                            images=[str(run / "data" / "q1.png")])
        (run / "rounds" / str(r)).mkdir(parents=True, exist_ok=True)
        (run / "rounds" / str(r) / "groups.jsonl").write_text(json.dumps(g.to_record()) + "\n")
    return run


def test_the_data_browser_opens_a_round_s_sampled_answers_with_scores_and_critiques(tmp_path):
    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.tabs.data import DataHandlers

    cfg = UIConfig(data_root=tmp_path / "data", runs_root=tmp_path / "runs", recipes_root=tmp_path,
                   upload_dir=tmp_path, max_upload_bytes=1 << 20)
    (cfg.data_root).mkdir()
    (cfg.data_root / "a.jsonl").write_text("{}\n")
    round_groups_run(cfg.runs_root)
    (cfg.runs_root / "plain").mkdir()
    names = [f"run:online/rounds/{r}/groups.jsonl" for r in (1, 2, 10)]
    assert databrowser.list_round_data(cfg.runs_root) == names
    h = DataHandlers(cfg)
    assert h.files() == ["a.jsonl", *names]
    summary, problems, _, images, question, responses, pairs = h.inspect(names[0], "auto", "", "")
    assert summary.startswith(f"**{names[0]}** — 1 groups from 1 rows (ranked); no problems found.")
    assert problems.empty and [label for _, label in images] == ["image 1"]
    assert f"`{names[0]}:1`" in question  # where the group was read, named as the list names it
    # ranked by the reward model's scores, each answer with its score and critique
    assert responses[["rank", "response", "score (data)", "critique (data)"]].values.tolist() == [
        [1, "Red.", 2.5, "names the colour of the dots"], [3, "Blue dots.", -1.0, "the dots are red, not blue"],
        [2, "Round 1.", 0.5, "says no colour"]]
    assert pairs.startswith("**Pairs training forms** (3; better > worse): #1 > #2, #1 > #3, #3 > #2")
    # only a round's groups file of a run opens this way, and it is read here, not trained on from this tab
    for bad in ("run:online/recipe.yaml", "run:../runs/online/rounds/1/groups.jsonl", "run:online/rounds/3/groups.jsonl"):
        with pytest.raises(Refused):
            databrowser.resolve_data(cfg.data_root, bad, cfg.runs_root)
    import gradio as gr

    with pytest.raises(gr.Error, match="copy the file under the data root"):
        h.use_data(names[0], "auto", "", True)


# --------------------------------------------------------------------------------------------------
# reward cache browser and compare table

def fake_run(root: Path, name: str, dpo: dict, report: dict | None = None) -> Path:
    run = root / name
    (run / "score").mkdir(parents=True)
    tree = Recipe().to_dict()
    tree["dpo"].update(dpo)
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    write_events(run, [{"time": T, "type": "run_start", "stages": ["eval"], "skip": []},
                       {"time": T, "type": "metrics", "stage": "dpo", "step": 1, "implicit_accuracy": 0.5},
                       {"time": T, "type": "run_end", "status": "done"}])
    margins = [{"group_id": "g1", "split": "train", "category": "colour", "scores": [1.0, 0.2, -1.0],
                "pairs": [{"better": 0, "worse": 1, "delta": 0.8}, {"better": 0, "worse": 2, "delta": 2.0},
                          {"better": 1, "worse": 2, "delta": 1.2}]},
               {"group_id": "g2", "split": "eval", "category": "shape", "scores": [0.1, 0.4],
                "pairs": [{"better": 0, "worse": 1, "delta": -0.3}]}]
    (run / "score" / "margins.jsonl").write_text("".join(json.dumps(m) + "\n" for m in margins))
    if report:
        (run / "eval").mkdir()
        (run / "eval" / "report.json").write_text(json.dumps(report))
    return run


def test_cache_pairs_get_the_dynamic_beta_of_the_runs_dpo_settings(tmp_path):
    fake_run(tmp_path, "mm", {"beta": 0.1, "w": 0.1, "k": 0.5})
    frame, summary = playground.cache_pairs(tmp_path, "mm")
    assert len(frame) == 4 and "**4 pairs** in 2 groups" in summary and "25.0% negative" in summary
    for delta, beta in zip(frame["delta"], frame["beta"]):
        assert beta == pytest.approx(0.1 * (1 + 0.1 * (1 - math.exp(-0.5 * delta))), abs=1e-5)
    assert frame.loc[1, "beta"] == pytest.approx(0.1063212, abs=1e-5)   # dpo/loss.py's worked example
    fake_run(tmp_path, "plain", {"margin_source": "none"})
    frame, summary = playground.cache_pairs(tmp_path, "plain")
    assert set(frame["beta"]) == {0.1} and "margin_source=none" in summary
    (tmp_path / "empty").mkdir()
    with pytest.raises(Refused, match="no reward cache"):
        playground.cache_pairs(tmp_path, "empty")


def test_compare_table_from_reports(tmp_path):
    bench = {"overall": {"acc": 0.75, "acc_plus": 0.5}, "by_category": {"colour": {"acc": 1.0, "acc_plus": 1.0}}}
    report = {"dpo": {"beta": 0.1, "w": 0.0, "k": 0.5}, "reward_model": {"modes": {"given": bench}},
              "policy": {"implicit_accuracy": 0.625, "win_rate": {"win_rate": 0.5}}}
    fake_run(tmp_path, "plain", {}, report)
    fake_run(tmp_path, "noeval", {})
    table = compare.eval_table(tmp_path, ["plain", "noeval"])
    # a row per metric, a column per run: many runs grow the table down the page, never off its right edge
    assert list(table.columns) == ["metric", "plain", "noeval"]
    assert table.set_index("metric")["plain"].to_dict() == {
        "status": "done", "evaluation": "done", "Acc (given)": "75.0%", "Acc+ (given)": "50.0%",
        "colour: Acc / Acc+ (given)": "100.0% / 100.0%", "implicit reward accuracy": "62.5%",
        "win rate after vs before": "50.0%", "DPO settings": "beta=0.1 w=0 k=0.5 (plain DPO)"}
    noeval = table.set_index("metric")["noeval"]
    assert noeval["evaluation"] == "none yet" and noeval["Acc (given)"] == "-"
    curves = compare.overlay(tmp_path, ["plain", "noeval"], "dpo_acc", runview.EventTail())
    assert set(curves["series"]) == {"plain: implicit accuracy", "noeval: implicit accuracy"}


def test_jobs_table_marks_stale_stages(tmp_path):
    """A stage whose input stage was recomputed since it finished is listed as stale."""
    from mmrlhf_lite.recipe import load_recipe
    from mmrlhf_lite.runs import RunDir
    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.tabs.live import LiveHandlers

    runs = tmp_path / "runs"
    recipe = load_recipe(None, [f"run.dir={runs / 'r1'}"], check_paths=False)
    rd = RunDir(recipe.run.dir)
    rd.path.mkdir(parents=True)
    recipe.save(rd.path / "recipe.yaml")  # what makes a folder a run folder for the UI
    for stage in ("reward", "score", "reference", "dpo"):
        rd.mark_done(stage, recipe)
    rd.mark_done("reward", recipe)  # recomputed: score, and dpo through it, are now out of date
    h = LiveHandlers(UIConfig(data_root=tmp_path, runs_root=runs, recipes_root=tmp_path, upload_dir=tmp_path,
                              max_upload_bytes=1))
    row = h.jobs_frame().set_index("run").loc["r1"]
    assert row["stages done"] == "reward, score (stale), reference, dpo (stale)"


def test_every_plot_gets_numeric_axes_even_before_any_point(tmp_path, monkeypatch):
    """gradio's LinePlot keeps the axis types of the first table it draws: an empty table with untyped
    columns made every axis categorical for good (no lines, each value its own tick). Every plot's starting
    value, the live view of no run, a run with DPO points only and a comparison must type step and value
    as numbers."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    import pandas as pd

    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.blocks import build_app
    from mmrlhf_lite.ui.tabs.live import LiveHandlers

    cfg = UIConfig(data_root=tmp_path, runs_root=tmp_path / "runs", recipes_root=tmp_path, upload_dir=tmp_path,
                   max_upload_bytes=1 << 20)
    (tmp_path / "runs").mkdir()
    fake_run(tmp_path / "runs", "dpo-only", {})
    plots = [b for b in build_app(cfg).blocks.values() if isinstance(b, gr.LinePlot)]
    round_plots = [p for p in plots if p.x == "round"]
    plots = [p for p in plots if p.x != "round"]
    assert len(plots) == len(runview.CURVES) + 3 and len(round_plots) == len(runview.ROUND_CURVES)
    # over rounds: the round as text (one tick per round), numeric values, every series named from the start
    for plot in round_plots:
        assert plot.value["datatypes"] == {"round": "nominal", "value": "quantitative", "series": "nominal"}
        assert {row[2] for row in plot.value["data"]} == set(
            runview.round_series_labels(plot.elem_id.removeprefix("plot-"))), plot.elem_id
    numeric = {"step": "quantitative", "value": "quantitative", "series": "nominal"}
    for plot in plots:
        assert plot.value["datatypes"] == numeric, (plot.elem_id, plot.value["datatypes"])
    h = LiveHandlers(cfg)
    tables = [v for v in (*h.view(None), *h.view("dpo-only")) if isinstance(v, pd.DataFrame) and "step" in v]
    tables += [v["value"] for v in (*h.view(None), *h.view("dpo-only")) if isinstance(v, dict) and "value" in v
               and isinstance(v["value"], pd.DataFrame) and "step" in v["value"]]
    tables.append(compare.overlay(tmp_path / "runs", ["dpo-only"], "reward_acc", runview.EventTail()))
    assert len(tables) == 2 * (len(runview.CURVES) + 2) + 1
    # the plots also keep the colour scale of their first table: every series must be named from the start
    # (rows with NaN step and value, which are not drawn), else its line gets no colour
    import math

    assert sum(all(math.isnan(v) for v in t["value"]) for t in tables) >= len(runview.CURVES) + 3
    for table in tables:
        assert plots[0].postprocess(table).datatypes == numeric
    for plot in plots:
        name = plot.elem_id.removeprefix("plot-")
        labels = {"tokens": runview.SPEED_SERIES, "gpu": runview.GPU_SERIES}.get(name) or (
            runview.series_labels(name) if name in runview.CURVES else None)
        if labels:
            assert {row[2] for row in plot.value["data"]} == set(labels), plot.elem_id
    overlay = compare.overlay(tmp_path / "runs", ["dpo-only"], "dpo_acc", runview.EventTail())
    assert set(overlay["series"]) == {"dpo-only: implicit accuracy"}
    events = run_events()
    assert plots[0].postprocess(runview.curve_frame(events, "reward_acc")).datatypes == numeric


def test_eval_card_and_recipe_diff(tmp_path):
    from mmrlhf_lite.ui import evalcard

    report = {"groups": 9, "pairs": 27,
              "reward_model": {"modes": {"none": {"overall": {"acc": 0.75, "acc_plus": 0.5, "pairs": 27}},
                                         "generate": {"overall": {"acc": 0.625, "acc_plus": 0.25, "pairs": 27}}}},
              "policy": {"implicit_accuracy": 0.8, "logp_accuracy": 0.4, "win_rate": {"win_rate": 0.55}}}
    card = evalcard.card_html(report)
    assert "data-modes='2'" in card and "9 groups, 27 pairs" in card
    assert "<td>75.0%</td><td>50.0%</td>" in card and "<td>62.5%</td><td>25.0%</td>" in card
    assert evalcard.MODE_MEANING["generate"] in card and "implicit reward accuracy 80.0%" in card and "55.0%" in card
    assert evalcard.card_html(None) == ""
    for name, steps in (("a", 3), ("b", 6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.yaml").write_text(yaml.safe_dump(
            {"model": {"path": "tiny:qwen2_vl"}, "reward": {"train": {"max_steps": steps}},
             "run": {"dir": str(tmp_path / name), "stages": ["reward"] if steps == 6 else ["reward", "dpo"]}}))
    diff = evalcard.recipe_diff(tmp_path, ["a", "b"]).to_dict("records")
    assert diff == [{"key": "reward.train.max_steps", "a": "3", "b": "6"},
                    {"key": "run.stages", "a": "reward, dpo", "b": "reward"}]


def test_data_navigation_filters_and_csv(tmp_path):
    import csv

    from mmrlhf_lite.data.demo import write_demo
    from mmrlhf_lite.ui import datanav

    root = tmp_path / "data"
    root.mkdir()
    rows = ['{"prompt": "q1", "chosen": "a", "rejected": "b"}', "{oops", '{"prompt": "q2", "chosen": "same", '
            '"rejected": "same"}', '{"prompt": "q3", "chosen": "a", "rejected": "b", "image": "nope.png"}', "{bad"]
    (root / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    report = databrowser.load_report(root, "pairs.jsonl")
    kinds = datanav.problem_kinds(report)
    assert kinds[0] == datanav.ALL and len(kinds) == 4  # malformed JSON, identical responses, missing image
    assert len(datanav.filtered_problems(report, root, datanav.ALL)) == 4
    json_kind = next(k for k in kinds[1:] if datanav.filtered_problems(report, root, k)["where"].tolist()
                     == ["pairs.jsonl:2", "pairs.jsonl:5"])
    assert all("malformed JSON" in p for p in datanav.filtered_problems(report, root, json_kind)["problem"])
    (tmp_path / "out").mkdir()
    path = datanav.report_csv(report, root, tmp_path / "out")
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["where"] for r in table] == ["pairs.jsonl:2", "pairs.jsonl:3", "pairs.jsonl:4", "pairs.jsonl:5"]
    assert table[0]["how to fix"] and path.name == "pairs-validation-report.csv"

    write_demo(root / "demo", groups=12, seed=0)
    demo = databrowser.load_report(root, "demo/demo.jsonl")
    cats = [g.category for g in demo.groups]
    assert datanav.categories(demo) == [datanav.ALL] + sorted(set(cats))
    assert datanav.step(demo, 0, 1) == 1 and datanav.step(demo, 0, -1) == 0 and datanav.step(demo, 11, 1) == 11
    c = cats[5]
    first = datanav.first_of(demo, c)
    assert first == cats.index(c)
    nxt = datanav.step(demo, first, 1, c)
    assert cats[nxt] == c and nxt > first and all(cats[j] != c for j in range(first + 1, nxt))
    assert datanav.step(demo, nxt, -1, c) == first
    last = max(i for i, x in enumerate(cats) if x == c)
    assert datanav.step(demo, last, 1, c) == last  # stays at the end of its category


def test_log_explains_harmless_library_warnings():
    log = ("== stage reward ==\n"
           "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure "
           "you already `pip install kernels` and the kernels >= 0.11.1\n"
           "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure\n"
           "reward: 3/3 steps\n"
           "ModuleNotFoundError: No module named 'kernelsx'")
    out = runview.explain_library_noise(log).splitlines()
    assert out[0] == "== stage reward ==" and out[1].startswith("[note] bitsandbytes") and "harmless" in out[1]
    assert out[2:] == ["reward: 3/3 steps", "ModuleNotFoundError: No module named 'kernelsx'"]  # real errors stay


def test_processes_field_launches_the_same_command_under_torchrun(tmp_path):
    """The Train tab's "processes" > 1 runs the CLI under torchrun (one node); Resume reuses the count."""
    import json
    import sys

    from mmrlhf_lite.ui import jobs

    run = tmp_path / "r"
    one = jobs.launch_command(run, 1)
    assert one == [sys.executable, "-m", "mmrlhf_lite.train", str(run / jobs.RECIPE_FILE), f"run.dir={run}"]
    two = jobs.launch_command(run, 2)
    assert two[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert two[5:] == one[1:]
    run.mkdir()
    assert jobs._processes_of(run) == 1                      # no earlier launch
    (run / jobs.JOB_FILE).write_text(json.dumps({"pid": 1, "command": two, "processes": 2}))
    assert jobs._processes_of(run) == 2
    with pytest.raises(Refused, match="processes must be between 1 and 64"):
        jobs._launch(run, 0)


def test_recipe_list_leaves_out_the_accelerate_configs(tmp_path):
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "ddp.yaml").write_text("distributed_type: MULTI_GPU\n")
    (tmp_path / "demo.yaml").write_text("run: {dir: runs/x}\n")
    assert form.list_recipes(tmp_path) == ["demo.yaml"]
    assert "accelerate/ddp.yaml" not in form.list_recipes(Path(__file__).resolve().parents[1] / "recipes")


def test_the_tabs_hold_only_tabs(tmp_path, monkeypatch):
    """A component made inside gr.Tabs but outside every gr.Tab becomes a child of the Tabs, and the browser
    then draws the tab bar wrong (seen with a gr.Timer: "4 · Reward playground" twice, "5 · Compare runs"
    gone, so the Compare tab could not be opened)."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.blocks import build_app

    cfg = UIConfig(data_root=tmp_path, runs_root=tmp_path / "runs", recipes_root=tmp_path, upload_dir=tmp_path,
                   max_upload_bytes=1 << 20)
    (tmp_path / "runs").mkdir()
    blocks = build_app(cfg).blocks.values()
    # and the Train form has a folded section per recipe section (a section missing from the tab's list, as
    # `rounds` was, stopped the app from starting: KeyError 'rounds.n')
    sections = {b.elem_id for b in blocks if isinstance(b, gr.Accordion) and (b.elem_id or "").startswith("section-")}
    assert sections == {f"section-{s}" for s in ("model", "data", "reward", "cache", "dpo", "eval", "rounds", "run")}
    assert any(getattr(b, "elem_id", None) == "f-rounds-n" for b in blocks)
    tabs = [b for b in blocks if isinstance(b, gr.Tabs)]
    assert len(tabs) == 1
    kids = tabs[0].children
    assert [type(c).__name__ for c in kids] == ["Tab"] * len(kids)
    assert [c.label for c in kids] == ["1 · Data", "2 · Train", "3 · Live", "4 · Reward playground",
                                       "5 · Compare runs", "6 · Policy"]


def test_the_live_tabs_timer_ticks_at_the_poll_period_asked_for(tmp_path, monkeypatch):
    """`app.py --poll-seconds` sets the Live tab's timer period (1.5 s by default); a period that is not a
    positive number of seconds is refused before the app starts."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import subprocess
    import sys

    import gradio as gr

    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.blocks import build_app

    (tmp_path / "runs").mkdir()
    for asked, period in ((None, 1.5), (0.5, 0.5)):
        kw = {} if asked is None else {"poll_seconds": asked}
        cfg = UIConfig(data_root=tmp_path, runs_root=tmp_path / "runs", recipes_root=tmp_path, upload_dir=tmp_path,
                       max_upload_bytes=1 << 20, **kw)
        timers = [b for b in build_app(cfg).blocks.values() if isinstance(b, gr.Timer)]
        assert [t.value for t in timers] == [period]
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(repo))
    import app

    assert app.parse_args([]).poll_seconds == 1.5 and app.parse_args(["--poll-seconds", "0.25"]).poll_seconds == 0.25
    r = subprocess.run([sys.executable, str(repo / "app.py"), "--poll-seconds", "0", "--runs-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 2 and "--poll-seconds must be a positive number of seconds, not 0.0" in r.stderr
    assert not (tmp_path / "r").exists()


def test_the_app_does_not_summarise_its_events_after_each_one(tmp_path, monkeypatch):
    """gradio's queue re-summarised every recorded event (a pandas group-by, ~25 ms of CPU) after each event,
    for a monitoring page the app never turns on: most of the server's work while a Live tab polls. The queue
    app.py makes, fed 300 events of a named handler, builds no summary."""
    import sys

    import gradio as gr
    from gradio.queueing import Queue

    for key in ("GRADIO_ANALYTICS_CACHE_FREQUENCY", "GRADIO_TEMP_DIR", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.append(self))
    from mmrlhf_lite.ui import serving
    monkeypatch.setattr(serving, "stop_services_at_exit", lambda: None)
    summaries = []
    real = Queue._get_df
    monkeypatch.setattr(Queue, "_get_df", staticmethod(lambda records: summaries.append(len(records)) or real(records)))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    import app

    assert app.main(["--port", "9", "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"),
                     "--upload-dir", str(tmp_path / "up")]) == 0
    queue = launched[0]._queue
    records = []
    for i in range(300):  # what the queue does per event: record it, then summarise (gradio/queueing.py)
        records.append({"time": float(i), "status": "success", "process_time": 0.01, "function": "view",
                        "session_hash": "s"})
        queue.events_recorded += 1
        queue.compute_analytics_summary(records)
    assert summaries == [], f"{len(summaries)} summaries over 300 events"


def test_the_page_edit_events_compute_once_per_distinct_form():
    """A text box's `change` fires again with the same value (the run name's, after the page's first pre-flight):
    the YAML preview's and the pre-flight's page events then compute nothing and leave their outputs alone."""
    import gradio as gr

    from mmrlhf_lite.ui.tabs.train import when_inputs_change

    calls = []

    def estimate(run_name, values):
        calls.append((run_name, dict(values)))
        return f"plan for {run_name}", gr.update(interactive=True), gr.update(visible=False)

    event = when_inputs_change(estimate, 3)
    *out, seen = event(None, "a", {"dpo.beta": 0.1})
    assert out[0] == "plan for a" and len(calls) == 1
    *again, seen2 = event(seen, "a", {"dpo.beta": 0.1})   # the same form again: nothing computed or redrawn
    assert len(calls) == 1 and seen2 == seen and all(isinstance(o, type(gr.skip())) for o in again), again
    *out, seen3 = event(seen, "a", {"dpo.beta": 0.2})      # an edit: computed
    assert len(calls) == 2 and out[0] == "plan for a" and seen3 != seen
    *out, _ = event(seen3, "a", {"dpo.beta": 0.1})         # back to the first form: computed again
    assert len(calls) == 3


def test_no_trigger_of_the_app_has_two_always_last_handlers(tmp_path, monkeypatch):
    """Gradio's page runs an `always_last` handler again after it finishes when its trigger fired meanwhile, by
    dispatching the trigger itself again: two such handlers of one trigger whose runs overlap re-fire each other
    without end. CI saw it: the Train tab's YAML preview and pre-flight, both on every field's edit, about 5 events
    a second for 120 s. Walked here from the app's own handler list (a second formulation of the check the app
    makes when it is built), and the check refuses such a pair."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.blocks import build_app

    (tmp_path / "runs").mkdir()
    cfg = UIConfig(data_root=tmp_path, runs_root=tmp_path / "runs", recipes_root=tmp_path, upload_dir=tmp_path,
                   max_upload_bytes=1 << 20)
    app = build_app(cfg)
    config = app.get_config_file()
    count: dict = {}
    for dep in config["dependencies"]:
        for target in dep["targets"]:
            if target[0] is not None and dep["trigger_mode"] == "always_last":
                count[tuple(target)] = count.get(tuple(target), 0) + 1
    shared = {t: n for t, n in count.items() if n > 1}
    assert not shared, f"triggers with several always_last handlers: {shared}"
    # the Train form's edits still reach both the preview and the pre-flight (the pre-flight chained after it)
    ids = {getattr(b, "elem_id", None): i for i, b in app.blocks.items()}
    deps = config["dependencies"]
    preview = [d for d in deps if [ids["run-name"], "change"] in [list(t) for t in d["targets"]]
               and ids["train-yaml"] in d["outputs"]]
    assert len(preview) == 1 and [ids["f-dpo-beta"], "input"] in [list(t) for t in preview[0]["targets"]]
    assert any(d["trigger_after"] == preview[0]["id"] and ids["train-estimate"] in d["outputs"]
               and not d["trigger_only_on_success"] for d in deps), "the pre-flight does not follow the preview"
    from mmrlhf_lite.ui.blocks import check_one_always_last
    with gr.Blocks() as toy:
        box, a, b = gr.Textbox(elem_id="box"), gr.Textbox(), gr.Textbox()
        box.change(lambda x: x, box, a)
        box.change(lambda x: x, box, b)
    with pytest.raises(RuntimeError, match=r"box\.change"):
        check_one_always_last(toy)
    with gr.Blocks() as chained:
        box, a, b = gr.Textbox(elem_id="box"), gr.Textbox(), gr.Textbox()
        box.change(lambda x: x, box, a).then(lambda x: x, box, b, trigger_mode="always_last")
    check_one_always_last(chained)


def test_a_view_read_before_a_newer_one_reached_the_page_changes_nothing(tmp_path):
    """Seen in CI: a curve's point count went 24 -> 23 on the page. A pick's view (slower: it draws the margins
    histogram) read the run, a timer tick read it later with one more point and finished first, then the pick's
    view replaced it. Each view is numbered when it starts reading; one that finishes after a newer one reached
    the same page changes nothing there (another page, or the API, is not held back)."""
    import inspect
    import threading

    import gradio as gr

    from mmrlhf_lite.ui.base import UIConfig
    from mmrlhf_lite.ui.tabs.live import OUTPUTS, LiveHandlers

    runs = tmp_path / "runs"
    run = runs / "r"
    points = [{"time": T + i, "type": "metrics", "stage": "reward", "step": i, "loss": 1 / i} for i in range(1, 24)]
    write_events(run, [{"time": T, "type": "run_start", "stages": ["reward"], "skip": []}, *points])
    h = LiveHandlers(UIConfig(data_root=tmp_path, runs_root=runs, recipes_root=tmp_path, upload_dir=tmp_path,
                              max_upload_bytes=1 << 20))
    page, other = gr.Request(session_hash="page"), gr.Request(session_hash="other")
    at = OUTPUTS.index("points")
    draw, read, go = h.beta_histogram, threading.Event(), threading.Event()

    def slow_histogram(name):  # the pick's view has read the run; it finishes when told
        read.set()
        assert go.wait(30)
        return draw(name)

    def on(page_, fn, *args):  # (a handler without the page's request, as before the fix: called without it)
        return fn(*args, request=page_) if "request" in inspect.signature(fn).parameters else fn(*args)

    h.beta_histogram = slow_histogram
    late: list = []
    pick = threading.Thread(target=lambda: late.append(on(page, h.view, "r")))
    pick.start()
    assert read.wait(30)
    h.beta_histogram = draw
    with (run / "events.jsonl").open("a") as f:
        f.write(json.dumps({"time": T + 30, "type": "metrics", "stage": "reward", "step": 24, "loss": 0.01}) + "\n")
    shown = on(page, h.tick, "r", None)
    assert "reward 24" in shown[at], shown[at]
    go.set()
    pick.join(30)
    assert late and all(isinstance(o, type(gr.skip())) for o in late[0]), \
        f"a view read before the tick replaced it: {late[0][at]!r}"
    # later reads show again; the same late view on another page (or without one) is shown there
    assert "reward 24" in h.view("r", request=page)[at]
    h.beta_histogram = slow_histogram
    read.clear(), go.clear()
    other_view: list = []
    t = threading.Thread(target=lambda: other_view.append(h.view("r", request=other)))
    t.start()
    assert read.wait(30)
    h.beta_histogram = draw
    h.tick("r", None, request=page)
    go.set()
    t.join(30)
    assert "reward 24" in other_view[0][at]
    assert "reward 24" in h.view("r")[at]
