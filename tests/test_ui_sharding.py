"""The Train tab's Sharding choice (mmrlhf_lite/ui/jobs.py, tabs/train.py, essentials.py): with Processes > 1,
"FSDP2" launches the torchrun command with ACCELERATE_USE_FSDP=true and FSDP_VERSION=2 (what
`accelerate launch --config_file recipes/accelerate/fsdp2.yaml` sets), the run's ui_job.json keeps it so Resume
(also from a restarted app) launches the same way, the Live tab says it, and the pre-flight beside Start shows
the per-GPU FSDP2 lines of `--dry-run --processes N --fsdp`.

    python -m pytest -q tests/test_ui_sharding.py
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import gradio as gr
import pytest

from mmrlhf_lite.ui import essentials, form, jobs
from mmrlhf_lite.ui.base import UIConfig
from mmrlhf_lite.ui.tabs.live import LiveHandlers
from mmrlhf_lite.ui.tabs.train import TrainHandlers
from mmrlhf_lite.ui.safety import Refused

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.yaml"
FSDP_KEYS = ("ACCELERATE_USE_FSDP", "FSDP_VERSION")
# the child prints the two variables as it sees them: the launch's real environment, not the app's
PRINT_ENV = ("import json, os; print('ENV ' + json.dumps({k: os.environ.get(k) for k in "
             f"{list(FSDP_KEYS)!r}}}), flush=True)")


def test_launch_env_carries_the_fsdp2_variables_only_for_an_fsdp2_launch():
    base = {"PATH": "/bin", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}  # an app started with them set
    env = jobs.launch_env(2, jobs.FSDP2, base)
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["PATH"]) == ("true", "2", "/bin")
    for processes, sharding in ((2, jobs.NO_SHARDING), (1, jobs.NO_SHARDING)):
        env = jobs.launch_env(processes, sharding, base)
        assert not set(FSDP_KEYS) & set(env) and env["PATH"] == "/bin"
    assert base["FSDP_VERSION"] == "1"  # the app's own environment is left alone
    # the command is the torchrun one either way (FSDP2 is the same command with the variables)
    assert jobs.launch_command(Path("r"), 2)[2:5] == ["torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert jobs.launch_label(1, jobs.NO_SHARDING) == "1 process"
    assert jobs.launch_label(2, jobs.NO_SHARDING) == "2 processes, DDP"
    assert jobs.launch_label(4, jobs.FSDP2) == "4 processes, FSDP2"


def test_check_launch_refuses_fsdp2_on_one_process_and_unknown_shardings():
    assert jobs.check_launch(2, jobs.FSDP2) == (2, "fsdp2")
    assert jobs.check_launch(3, None) == (3, "none")
    with pytest.raises(Refused, match="FSDP2 shards the base over the processes: it needs Processes of 2 or more"):
        jobs.check_launch(1, jobs.FSDP2)
    with pytest.raises(Refused, match="sharding must be one of none, fsdp2, got 'zero3'"):
        jobs.check_launch(2, "zero3")
    with pytest.raises(Refused, match="processes must be a whole number"):
        jobs.check_launch("2", jobs.NO_SHARDING)


def test_launch_record_round_trips_and_a_damaged_one_falls_back_to_one_process(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    assert jobs.launch_of(run) == (1, "none")  # never launched
    (run / jobs.JOB_FILE).write_text(json.dumps({"pid": 1, "processes": 2, "sharding": "fsdp2"}))
    assert jobs.launch_of(run) == (2, "fsdp2")
    (run / jobs.JOB_FILE).write_text(json.dumps({"pid": 1, "processes": 2}))  # written before sharding existed
    assert jobs.launch_of(run) == (2, "none")
    for bad in ({"pid": 1, "processes": 1, "sharding": "fsdp2"}, {"pid": 1, "processes": 2, "sharding": 7},
                {"pid": 1, "processes": "x"}):
        (run / jobs.JOB_FILE).write_text(json.dumps(bad))
        assert jobs.launch_of(run) == (1, "none"), bad


def _config(tmp_path: Path) -> UIConfig:
    (tmp_path / "runs").mkdir(exist_ok=True)
    return UIConfig(data_root=tmp_path, runs_root=tmp_path / "runs", recipes_root=tmp_path, upload_dir=tmp_path / "up",
                    max_upload_bytes=1 << 20)


def _values(tmp_path: Path) -> form.FormValues:
    """The demo recipe's form on a small demo set (Start's pre-flight plans it)."""
    return form.form_values(form.recipe_tree(DEMO), tmp_path).replace({"data.demo.groups": 12})


def _wait_env_lines(run: Path, n: int, timeout: float = 180) -> list[dict]:
    end = time.time() + timeout
    while time.time() < end:
        lines = [json.loads(ln[4:]) for ln in (run / jobs.CONSOLE_LOG).read_text().splitlines()
                 if ln.startswith("ENV ")]
        if len(lines) >= n and not jobs.job_state(run).active:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"the launched child printed no environment within {timeout} s:\n"
                         + (run / jobs.CONSOLE_LOG).read_text())


def test_start_and_resume_launch_with_the_fsdp2_variables_and_the_live_tab_says_so(tmp_path, monkeypatch):
    """Start (processes 2, FSDP2) and Resume, also from a new app (a restart): the child process gets the two
    variables each time; a DDP run does not, even when the app itself has them set. The launch's real code runs
    (environment, Popen, ui_job.json); only the command is a one-line Python that prints its environment."""
    monkeypatch.setattr(jobs, "launch_command", lambda run, processes=1: [sys.executable, "-c", PRINT_ENV])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # set in the app's shell: must not leak into a DDP run
    monkeypatch.setenv("FSDP_VERSION", "2")
    h, live = TrainHandlers(_config(tmp_path)), LiveHandlers(_config(tmp_path))
    values = _values(tmp_path)
    msg, _, _ = h.start("sharded", values, 2, "fsdp2")
    assert "(2 processes, FSDP2)" in msg
    run = tmp_path / "runs" / "sharded"
    assert _wait_env_lines(run, 1) == [{"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}]
    job = json.loads((run / jobs.JOB_FILE).read_text())
    assert (job["processes"], job["sharding"], job["env"]) == (2, "fsdp2", dict(zip(FSDP_KEYS, ("true", "2"))))
    assert "launched: ACCELERATE_USE_FSDP=true FSDP_VERSION=2 " in (run / jobs.CONSOLE_LOG).read_text()
    # the Live tab and its run list say how it was launched
    assert "2 processes, FSDP2" in live.view("sharded")[0]
    assert live.jobs_frame().set_index("run").loc["sharded", "launch"] == "2 processes, FSDP2"
    # Resume from a restarted app (new handlers, nothing in memory): the same variables again
    jobs._children.clear()
    assert "(2 processes, FSDP2)" in LiveHandlers(_config(tmp_path)).resume("sharded")
    assert _wait_env_lines(run, 2)[1] == {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert jobs.launch_of(run) == (2, "fsdp2")

    msg, _, _ = h.start("ddp", values, 2, "none")
    assert "(2 processes, DDP)" in msg
    ddp = tmp_path / "runs" / "ddp"
    assert _wait_env_lines(ddp, 1) == [{"ACCELERATE_USE_FSDP": None, "FSDP_VERSION": None}]
    live.resume("ddp")
    assert _wait_env_lines(ddp, 2)[1] == {"ACCELERATE_USE_FSDP": None, "FSDP_VERSION": None}
    assert live.jobs_frame().set_index("run").loc["ddp", "launch"] == "2 processes, DDP"
    # a Start without the sharding input (an API call of before) is a DDP launch
    h.start("old-api", values, 2)
    assert _wait_env_lines(tmp_path / "runs" / "old-api", 1) == [{"ACCELERATE_USE_FSDP": None, "FSDP_VERSION": None}]
    # FSDP2 on one process is refused before any folder is made
    with pytest.raises(gr.Error, match="FSDP2 shards the base over the processes"):
        h.start("one", values, 1, "fsdp2")
    assert not (tmp_path / "runs" / "one").exists()


def test_estimate_shows_the_dry_runs_fsdp2_lines_when_fsdp2_is_chosen(tmp_path, monkeypatch, capsys):
    """The pre-flight beside Start holds, for Processes 2 + FSDP2, each per-GPU line that
    `python -m mmrlhf_lite.train recipe.yaml --dry-run --processes 2 --fsdp` prints; with DDP none of them."""
    h = TrainHandlers(_config(tmp_path))
    values, _ = essentials.apply_preset(essentials.SMOKE, _values(tmp_path))
    fsdp = h.estimate("", values, 2, "fsdp2")[0]
    ddp = h.estimate("", values, 2, "none")[0]
    one = h.estimate("", values)[0]
    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(form.run_recipe(values, data_root=tmp_path, runs_root=tmp_path, run_dir=tmp_path / "dry"))
    from mmrlhf_lite.train import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    # the command's own code in-process (its output is the same; a subprocess only imported the stack again)
    main([str(recipe), "--dry-run", "--processes", "2", "--fsdp"])   # exit 1: the plan names an FSDP error
    out = capsys.readouterr().out
    block = out.split("memory per GPU with FSDP2 over 2 GPUs", 1)[1].split("\n\n", 1)[0].splitlines()
    stage_lines = [ln.strip() for ln in block[1:] if ln.strip()]
    assert [ln.split()[0] for ln in stage_lines[:2]] == ["reward", "dpo"], out
    assert "memory per GPU with FSDP2 over 2 GPUs" in fsdp
    for line in stage_lines:
        assert line in fsdp, (line, fsdp)
        assert line not in ddp
    launch = next(ln for ln in out.splitlines() if ln.startswith("launch: "))[len("launch: "):]
    assert f"- launch: {launch}" in fsdp and "FSDP2: reward, dpo, score and reference shard the base" in fsdp
    assert "memory per GPU with FSDP2" not in ddp and "2 processes (data-parallel" in ddp
    assert "launch:" not in one and fsdp.rstrip().endswith("plan OK")
    assert "FSDP2 needs Processes of 2 or more" in h.estimate("", values, 1, "fsdp2")[0]


def test_a_run_started_with_fsdp2_really_shards_over_two_processes(tmp_path, monkeypatch):
    """The real launch (torchrun --standalone, 2 processes, gloo on CPU) of a 2-step reward stage on the
    smallest tiny model: the CLI's ranks read the variables the UI set and say so in the run's events."""
    import os
    import signal

    from mmrlhf_lite.recipe import load_recipe

    sys.path.insert(0, str(REPO / "tests"))
    from test_distributed import COMMON  # the 2-rank CPU recipe the distributed tests use

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MMRLHF_LITE_DIST_TIMEOUT", "60")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    path = tmp_path / "r.yaml"
    load_recipe(None, COMMON + ["run.stages=[reward]", "reward.train.groups_per_step=1"]).save(path)
    run = jobs.start_run(tmp_path / "runs", "fsdp-ui", path.read_text(), processes=2, sharding=jobs.FSDP2)
    pid = json.loads((run / jobs.JOB_FILE).read_text())["pid"]
    try:
        end = time.time() + 480
        while time.time() < end and jobs.job_state(run).active:
            time.sleep(0.1)
        state = jobs.job_state(run)
        log = (run / jobs.CONSOLE_LOG).read_text()
        assert state.status == "done", (state, log[-3000:])
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)  # the launcher and its ranks (their own session), if still there
        except ProcessLookupError:
            pass
        jobs.kill_children()
    infos = [e.get("message", "") for e in json.loads("[" + ",".join(
        (run / "events.jsonl").read_text().splitlines()) + "]") if e.get("type") == "log"]
    assert any(m.startswith("2 processes (FSDP2: reward, dpo, score and reference shard the base") for m in infos), infos
