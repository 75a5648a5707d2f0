"""The reward-model services the UI starts (mmrlhf_lite/ui/serving.py): a real `python -m mmrlhf_lite.serve`
on the tiny reward run answers the curl and Python examples the page shows, is found again from its run
folder (a reloaded page, a restarted app), and Stop ends it and frees its port; a port in use (or taken by
another run's service) and bad ports are refused before anything is launched; a service that dies shows
its error with the last lines of its log; the app's exit (SIGTERM) stops what it started.

    python -m pytest -q tests/test_ui_serving.py
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmrlhf_lite.ui import serving
from mmrlhf_lite.ui.safety import Refused
from test_ui_support import REPO, free_port, wait_for


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    except OSError:
        return True


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", markdown, re.S)


def fake_run(root: Path, name: str) -> Path:
    """A run folder that lists as one and has a reward model's adapter config (nothing loadable)."""
    run = root / name
    (run / "reward" / "final").mkdir(parents=True)
    (run / "reward" / "final" / "adapter_config.json").write_text("{}")
    return run


def test_a_served_reward_model_answers_the_shown_examples_and_stop_frees_its_port(tiny_reward_run, tmp_path):
    run = tiny_reward_run.resolve()
    port = free_port()
    state = serving.start_service(run.parent, run.name, port)
    proc = serving._started[str(run)]
    try:
        assert state.status == "starting" and state.port == port
        assert state.command == [sys.executable, "-m", "mmrlhf_lite.serve", str(run), "--host", "127.0.0.1",
                                 "--port", str(port)]
        state = wait_for(lambda: (s := serving.service_state(run)).status == "serving" and s, 120,
                         interval=0.3, what="serving")
        assert state.critique == "generate" and state.url == f"http://127.0.0.1:{port}"  # the run's critique mode
        assert serving.state_markdown(state, run.name).startswith(f"State: **serving** at http://127.0.0.1:{port}")
        with pytest.raises(Refused, match=f"already serving on port {port} .one service per run"):
            serving.start_service(run.parent, run.name, free_port())

        # what the page shows: the exact command, and examples that work as they are pasted
        blocks = code_blocks(serving.usage_markdown(state, state.command))
        assert [lang for lang, _ in blocks] == ["bash", "bash", "python"]
        assert shlex.split(blocks[0][1]) == state.command
        if shutil.which("curl"):
            out = subprocess.run(["bash", "-c", blocks[1][1]], capture_output=True, text=True, timeout=120)
            scores = json.loads(out.stdout)["scores"]
            assert len(scores) == 2 and all(math.isfinite(s) for s in scores), out
        from PIL import Image
        Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "image.png")
        out = subprocess.run([sys.executable, "-c", blocks[2][1]], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
        scores = json.loads(out.stdout)
        assert len(scores) == 2 and all(math.isfinite(s) for s in scores), out

        # a restarted app (no memory of what it launched) finds the service from the run folder, and stops it
        serving._started.clear()
        found = serving.service_state(run)
        assert (found.status, found.pid, found.port) == ("serving", proc.pid, port)
        assert serving.serving_port(run) == port
        assert serving.stop_service(run) == f"stopped the service of run '{run.name}' on port {port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert gone(proc.pid) and not serving.port_in_use(port)
    assert serving.service_state(run).status == "stopped" and serving.serving_port(run) is None
    with pytest.raises(Refused, match="is not being served .stopped"):
        serving.stop_service(run)


def test_ports_in_use_and_bad_ports_are_refused_before_launching(tmp_path):
    run = fake_run(tmp_path, "run")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        assert serving.port_in_use(busy)
        with pytest.raises(Refused, match=f"port {busy} is in use on 127.0.0.1 .another program listens on it"):
            serving.start_service(tmp_path, "run", busy)
        # the page says it in the state line, beside the command it would have run
        from mmrlhf_lite.ui.base import UIConfig
        from mmrlhf_lite.ui.tabs.playground import PlaygroundHandlers

        line, usage, _ = next(PlaygroundHandlers(UIConfig(tmp_path, tmp_path, tmp_path, tmp_path, 1)).serve_start(
            "run", busy))
        assert line == (f"**Refused**: port {busy} is in use on 127.0.0.1 (another program listens on it): choose "
                        "another port\n\nState: **not serving** run run"), line
        assert f"mmrlhf_lite.serve {run} --host 127.0.0.1 --port {busy}\n```" in usage
    for port, words in ((80, "from 1024 to 65535"), (70000, "from 1024 to 65535"), (8008.5, "whole number"),
                        ("eighty", "whole number"), (None, "give a port"), (True, "give a port")):
        with pytest.raises(Refused, match=words):
            serving.start_service(tmp_path, "run", port)
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "recipe.yaml").write_text("{}\n")
    with pytest.raises(Refused, match="run 'untrained' has no trained reward model"):
        serving.start_service(tmp_path, "untrained", free_port())
    # another run's service holds the port while it loads (it listens only once its model is loaded)
    other = fake_run(tmp_path, "other")
    port = free_port()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "mmrlhf_lite.serve", str(other)])
    try:
        wait_for(lambda: b"mmrlhf_lite.serve" in Path(f"/proc/{sleeper.pid}/cmdline").read_bytes(), 10, 0.01)
        (other / "recipe.yaml").write_text("{}\n")  # listed as a run
        (other / serving.SERVE_FILE).write_text(json.dumps({"pid": sleeper.pid, "port": port, "command": []}))
        assert serving.service_state(other).status == "starting"
        with pytest.raises(Refused, match=f"port {port} is taken by the service of run 'other'"):
            serving.start_service(tmp_path, "run", port)
        # and a served run's folder is neither renamed nor deleted (its service reads it and writes its log there)
        import gradio as gr

        from mmrlhf_lite.ui.tabs.live import LiveHandlers

        live = LiveHandlers(UIConfig(tmp_path, tmp_path, tmp_path, tmp_path, 1))
        for action in (lambda: live.rename("other", "renamed"), lambda: live.ask_delete("other"),
                       lambda: live.delete("other")):
            with pytest.raises(gr.Error, match=f"other&#x27; is being served on port {port}: Stop serving it"):
                action()
        assert other.is_dir() and not (tmp_path / "renamed").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not (run / serving.SERVE_FILE).exists() and not (run / serving.SERVE_LOG).exists()  # nothing launched


def test_a_service_that_dies_shows_its_error_with_its_log(tmp_path):
    run = fake_run(tmp_path, "broken")  # no recipe.yaml: the service's command line refuses the folder
    state = serving.start_service(tmp_path, "broken", free_port())
    state = wait_for(lambda: (s := serving.service_state(run)).status == "error" and s, 60, interval=0.2,
                     what="the service's error")
    head, _, log = state.message.partition("\n")
    assert head == "the service exited with code 2; the last lines of serve.log:"
    assert log.startswith(f"error: {run} is neither a run folder (no recipe.yaml)"), state.message
    shown = serving.state_markdown(state, "broken")
    assert shown.startswith("State: **error**: the service exited with code 2") and "```text\nerror: " in shown
    assert serving.serving_port(run) is None  # the folder may be renamed or deleted


def test_the_apps_exit_stops_the_services_it_started(tiny_reward_run):
    """The app calls stop_services_at_exit(); a SIGTERM then stops the service it launched (here still
    loading its model) before the app dies of it."""
    run = tiny_reward_run.resolve()
    script = ("import sys, time\nfrom mmrlhf_lite.ui import serving\nserving.stop_services_at_exit()\n"
              "s = serving.start_service(sys.argv[1], sys.argv[2], int(sys.argv[3]))\n"
              "print(s.pid, flush=True)\nwhile True:\n    time.sleep(0.1)\n")
    app = subprocess.Popen([sys.executable, "-c", script, str(run.parent), run.name, str(free_port())],
                           stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    pid = None
    try:
        pid = int(app.stdout.readline())
        assert not gone(pid)
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=30) == -signal.SIGTERM
        assert gone(pid)
        assert serving.service_state(run).status == "stopped"
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
        if pid and not gone(pid):
            os.kill(pid, signal.SIGKILL)
