"""Run folders: skip finished stages, refuse changed inputs (naming the keys), --redo, lock, stop file.

The pipeline tests swap the stage runners for small functions, so they check the run-folder logic of
`run_pipeline` itself in milliseconds.

    python -m pytest -q tests/test_runs.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmrlhf_lite import train
from mmrlhf_lite.events import StageStopped, read_events
from mmrlhf_lite.recipe import load_recipe
from mmrlhf_lite.runs import LOCK_FILE, STAGE_INPUTS, RunDir, RunFolderError, write_atomic


def make_recipe(run_dir, *overrides):
    return load_recipe(None, [f"run.dir={run_dir}", *overrides], check_paths=False)


@pytest.fixture
def calls(monkeypatch):
    """Fake stage runners that record which stages ran and write one output file each."""
    ran: list[str] = []

    def runner_for(stage):
        def run(ctx):
            ran.append(stage)
            out = ctx.run.stage_dir(stage)
            out.mkdir(parents=True, exist_ok=True)
            (out / "output.txt").write_text(stage)
            return {"items": len(ran)}
        return run

    monkeypatch.setattr(train, "_runner", runner_for)
    return ran


def test_mark_done_records_the_stage_inputs(tmp_path):
    recipe = make_recipe(tmp_path / "run", "dpo.beta=0.3")
    run = RunDir(recipe.run.dir)
    assert not run.is_done("dpo") and run.status("dpo") is None
    run.mark_done("dpo", recipe, pairs=12)
    st = run.status("dpo")
    assert st["status"] == "done" and st["pairs"] == 12 and run.is_done("dpo")
    assert list(st["inputs"]) == list(STAGE_INPUTS["dpo"])  # flat key paths, from the recipe fields' `stages`
    assert st["inputs"]["dpo.beta"] == 0.3 and st["inputs"]["run.seed"] == 0 and st["inputs"]["model.lora_r"] == 16
    assert "dpo.train.logging_steps" not in st["inputs"] and "reward.w_rank" not in st["inputs"]


def test_finished_stages_with_the_same_inputs_are_skipped(tmp_path, calls):
    recipe = make_recipe(tmp_path / "run", "run.stages=[reward, score]")
    train.run_pipeline(recipe, echo=False)
    assert calls == ["reward", "score"]
    # same recipe again, and a change that neither stage depends on (dpo.gamma)
    train.run_pipeline(make_recipe(tmp_path / "run", "run.stages=[reward, score]", "dpo.gamma=0.5"), echo=False)
    assert calls == ["reward", "score"]
    train.run_pipeline(make_recipe(tmp_path / "run"), ["reward", "score", "dpo"], echo=False)
    assert calls == ["reward", "score", "dpo"]
    events, _ = read_events(tmp_path / "run")
    skipped = [e["message"] for e in events if e["type"] == "log" and "skipped" in e["message"]]
    assert skipped.count("stage reward already done with these settings; skipped (--redo reward recomputes)") == 2
    assert [e["status"] for e in events if e["type"] == "run_end"] == ["done", "done", "done"]
    saved = load_recipe(tmp_path / "run" / "recipe.yaml", check_paths=False)
    assert saved.run.stages == ["reward", "score", "reference", "dpo", "eval", "rounds"]  # the latest invocation's


def test_changed_inputs_are_refused_naming_the_keys(tmp_path, calls):
    run_dir = tmp_path / "run"
    train.run_pipeline(make_recipe(run_dir), ["reward"], echo=False)
    changed = make_recipe(run_dir, "reward.train.learning_rate=1e-3", "model.lora_r=4")
    with pytest.raises(RunFolderError) as info:
        train.run_pipeline(changed, ["reward"], echo=False)
    assert str(info.value) == (
        f"run folder {run_dir} has finished stage 'reward' with different settings (changed: model.lora_r, "
        "reward.train.learning_rate); use a new run.dir, or pass --redo reward to recompute it "
        "(its outputs are deleted)")
    # also when the changed stage is not asked for: its outputs would feed the later stages
    with pytest.raises(RunFolderError, match="finished stage 'reward'"):
        train.run_pipeline(changed, ["dpo"], echo=False)
    assert calls == ["reward"]
    assert (run_dir / "reward" / "output.txt").read_text() == "reward"  # nothing overwritten
    events, _ = read_events(run_dir)
    assert events[-1]["type"] == "run_end" and events[-1]["status"] == "error"


def test_redo_clears_outputs_and_recomputes(tmp_path, calls):
    run_dir = tmp_path / "run"
    train.run_pipeline(make_recipe(run_dir), ["reward"], echo=False)
    (run_dir / "reward" / "stale.bin").write_text("old")
    train.run_pipeline(make_recipe(run_dir, "model.lora_r=4"), ["reward"], redo=("reward",), echo=False)
    assert calls == ["reward", "reward"]
    assert not (run_dir / "reward" / "stale.bin").exists()
    assert RunDir(run_dir).status("reward")["inputs"]["model.lora_r"] == 4


def test_clear_removes_status_and_folder(tmp_path):
    recipe = make_recipe(tmp_path / "run")
    run = RunDir(recipe.run.dir)
    run.mark_done("score", recipe)
    run.stage_dir("score").mkdir(parents=True)
    run.clear("score")
    assert run.status("score") is None and not run.stage_dir("score").exists()
    run.clear("score")  # clearing twice is fine


def test_stop_from_a_stage_ends_the_run_as_stopped(tmp_path, monkeypatch):
    def stopping(stage):
        def run(ctx):
            raise StageStopped("checkpoint saved at step 3")
        return run
    monkeypatch.setattr(train, "_runner", stopping)
    run_dir = tmp_path / "run"
    with pytest.raises(StageStopped):
        train.run_pipeline(make_recipe(run_dir), ["reward"], echo=False)
    events, _ = read_events(run_dir)
    assert [(e["type"], e.get("status")) for e in events[-2:]] == [("stage_end", "stopped"), ("run_end", "stopped")]
    assert not RunDir(run_dir).is_done("reward")
    assert not (run_dir / LOCK_FILE).exists()  # released for the resume


@pytest.fixture
def other_process():
    """A live process that is not us (its pid goes into a lock file)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_lock_refuses_a_second_live_process(tmp_path, other_process):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / LOCK_FILE).write_text(f"{other_process.pid} 0\n")
    with pytest.raises(RunFolderError) as info:
        run.acquire()
    assert str(info.value) == (f"run folder {run.path} is in use by process {other_process.pid}; wait for it, "
                               f"stop it (touch {run.path / 'STOP'}), or use another run.dir")
    assert run.running_pid() == other_process.pid
    run.release()  # not ours: left alone
    assert (run.path / LOCK_FILE).read_text().split()[0] == str(other_process.pid)


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / LOCK_FILE).write_text(f"{proc.pid} 0\n")
    assert run.running_pid() is None
    run.acquire()
    assert (run.path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    run.release()
    assert not (run.path / LOCK_FILE).exists()


def started_at(pid: int) -> int:
    """The kernel's start time of `pid` (clock ticks since boot), read here from /proc/<pid>/stat (field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def test_a_lock_whose_pid_was_given_to_a_later_process_is_not_held(tmp_path, other_process):
    """A trainer killed without releasing its lock leaves its pid there; once the kernel hands that pid to another
    process (pid_max is often 32768, threads use the pool too: minutes on a busy machine), the run is not
    running, and a new run takes the folder. The lock names the process by pid and start time."""
    start = started_at(other_process.pid)
    assert isinstance(start, int) and start > 0
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / LOCK_FILE).write_text(f"{other_process.pid} 0 {start}\n")   # the process that wrote it: held
    assert run.running_pid() == other_process.pid
    (run.path / LOCK_FILE).write_text(f"{other_process.pid} 0 {start - 1}\n")   # an earlier one with its pid
    assert run.running_pid() is None
    run.acquire()   # taken over, and the new lock names this process by pid and start time
    assert (run.path / LOCK_FILE).read_text().split()[::2] == [str(os.getpid()), str(started_at(os.getpid()))]
    assert run.running_pid() == os.getpid()
    run.release()


def test_pipeline_refuses_a_locked_folder_without_touching_the_lock(tmp_path, calls, other_process):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(f"{other_process.pid} 0\n")
    with pytest.raises(RunFolderError, match=f"in use by process {other_process.pid}"):
        train.run_pipeline(make_recipe(run_dir), ["reward"], echo=False)
    assert calls == []
    assert (run_dir / LOCK_FILE).read_text().split()[0] == str(other_process.pid)


def test_stop_file(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.stop_requested()
    run.request_stop()
    assert run.stop_requested() and run.stop_file == tmp_path / "run" / "STOP"
    run.acquire()  # a new invocation starts fresh: an old stop request does not stop it
    assert not run.stop_requested()
    run.release()


def test_write_atomic_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_atomic(target, json.dumps({"x": 1}))
    write_atomic(target, json.dumps({"x": 2}))
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["b.json"]


ALL = ["reward", "score", "reference", "dpo", "eval"]


def test_recomputing_an_input_stage_makes_its_readers_run_again(tmp_path, calls):
    from mmrlhf_lite.plan import stage_status

    run_dir = tmp_path / "run"
    train.run_pipeline(make_recipe(run_dir), ALL, echo=False)
    assert calls == ALL
    # a new reward model: the scores (and the policy trained on their margins, and its evaluation) are stale
    train.run_pipeline(make_recipe(run_dir), ["reward", "score"], redo=("reward",), echo=False)
    assert calls == ALL + ["reward", "score"]
    events, _ = read_events(run_dir)
    warned = [e["message"] for e in events if e["type"] == "warning"]
    assert warned == ["stage dpo is out of date ('score' is out of date); run it again with --stages dpo",
                      "stage eval is out of date ('reward' was deleted after it finished); run it again with --stages eval"]
    assert RunDir(run_dir).stale_stages() == {"dpo": "'score' was recomputed after it finished",
                                              "eval": "'reward' was recomputed after it finished"}
    rows, errors = stage_status(make_recipe(run_dir), ALL)
    assert [r["status"] for r in rows] == ["done", "done", "done", "stale", "stale"] and errors == []
    # the next full run recomputes exactly the stale ones, then nothing
    train.run_pipeline(make_recipe(run_dir), ALL, echo=False)
    assert calls == ALL + ["reward", "score", "dpo", "eval"]
    train.run_pipeline(make_recipe(run_dir), ALL, echo=False)
    assert calls == ALL + ["reward", "score", "dpo", "eval"]
    assert RunDir(run_dir).stale_stages() == {}


def test_staleness_propagates_through_a_stale_stage(tmp_path, calls):
    run_dir = tmp_path / "run"
    train.run_pipeline(make_recipe(run_dir), ALL, echo=False)
    train.run_pipeline(make_recipe(run_dir), ["score"], redo=("score",), echo=False)
    # eval reads reward (unchanged) and dpo, which read the recomputed score
    assert RunDir(run_dir).stale_stages() == {"dpo": "'score' was recomputed after it finished",
                                              "eval": "'dpo' is out of date"}
    train.run_pipeline(make_recipe(run_dir), ["eval"], echo=False)  # eval alone: dpo is still stale, so is eval
    assert calls == ALL + ["score", "eval"]
    assert RunDir(run_dir).stale_stages() == {"dpo": "'score' was recomputed after it finished",
                                              "eval": "'dpo' is out of date"}


def test_a_status_without_upstream_stamps_is_trusted(tmp_path, calls):
    run_dir = tmp_path / "run"
    train.run_pipeline(make_recipe(run_dir), ALL, echo=False)
    run = RunDir(run_dir)
    for stage in ALL:  # as a run folder written before stages recorded their inputs' ids
        st = run.status(stage)
        st.pop("upstream"), st.pop("id")
        write_atomic(run.status_file(stage), json.dumps(st))
    train.run_pipeline(make_recipe(run_dir), ALL, echo=False)
    assert calls == ALL and run.stale_stages() == {}


RACE = """
import sys, time
from mmrlhf_lite.runs import RunDir, RunFolderError
run = RunDir(sys.argv[1])
while time.time() < float(sys.argv[2]):
    time.sleep(0.0005)
try:
    run.acquire()
except RunFolderError as exc:
    print("refused", exc)
else:
    print("acquired")
    time.sleep(1.5)
    run.release()
"""


def test_processes_starting_together_get_the_folder_once(tmp_path):
    start = __import__("time").time() + 3  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "run"), str(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sum(o == "acquired" for o in outs) == 1, outs
    assert all(o.startswith("refused run folder") and "is in use by" in o for o in outs if o != "acquired"), outs
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_killed_holder_frees_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom mmrlhf_lite.runs import RunDir\n"
                               "RunDir(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    run = RunDir(tmp_path / "run")
    with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}"):
        run.acquire()
    holder.kill()
    holder.wait()
    run.acquire()  # the kernel dropped the dead holder's lock; its pid is dead too
    assert run.running_pid() == os.getpid()
    run.release()
