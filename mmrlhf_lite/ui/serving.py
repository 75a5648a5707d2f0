"""Reward-model services started from the UI: `python -m mmrlhf_lite.serve <run> --host 127.0.0.1 --port P`
(docs/serve.md) for a run's trained critique reward model, one service per run, bound to this machine only
like the app; the critique mode is the run's, as the service's command line picks it.

Like a training job (jobs.py) a service is a subprocess in its own session whose record lives in its run
folder, never in the browser or the app's memory: `<run>/ui_serve.json` (pid, port, command, launch time,
whether a stop was asked, when /health first answered) and its output appended to `<run>/serve.log`. So a
reloaded page, a second tab or a restarted app finds a running service again. Its state: `starting` (the
process runs, GET /health has not answered yet), `serving` (/health answered for this run), `stopped`
(after a Stop), `error` (it exited by itself: the last lines of its log say why), `none` (never started).
A port is refused before launching when something listens on it, or another run's service is starting on
it. Stop sends SIGTERM to the service's process group, then SIGKILL after `STOP_GRACE_S`. The app stops
every service it started when it exits (`stop_services_at_exit`, called by app.py: at a normal exit, Ctrl-C
and SIGTERM).

    python app.py            # Reward playground tab -> Serve this reward model / Stop serving
    python -m pytest -q tests/test_ui_serving.py
"""
from __future__ import annotations

import atexit
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..runs import write_atomic
from ..serve import DEFAULT_PORT
from .jobs import LAUNCH_MARK, PROJECT_ROOT, command_line, list_runs, run_path, tail_text
from .safety import Refused

SERVE_FILE = "ui_serve.json"
SERVE_LOG = "serve.log"
HOST = "127.0.0.1"
STOP_GRACE_S = 10.0      # SIGTERM, then SIGKILL after this long
HEALTH_TIMEOUT_S = 1.0
LOG_LINES = 12           # lines of serve.log shown with an error
MIN_PORT, MAX_PORT = 1024, 65535
_started: dict[str, subprocess.Popen] = {}   # run folder -> the service this app launched
_lock = threading.RLock()                    # one launch or stop at a time (the port checks, the records)
_at_exit = False


@dataclass
class ServiceState:
    status: str                          # none | starting | serving | stopped | error
    port: int | None = None
    pid: int | None = None
    command: list[str] = field(default_factory=list)
    critique: str | None = None          # the service's default critique mode (from /health), once serving
    message: str = ""                    # error: why it exited, with the last lines of its log

    @property
    def active(self) -> bool:
        return self.status in ("starting", "serving")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def has_reward_model(run: Path) -> bool:
    return (run / "reward" / "final" / "adapter_config.json").exists()


def serve_command(run: Path, port: int) -> list[str]:
    """The command a service of `run` runs (without --critique: the service takes the run's mode)."""
    return [sys.executable, "-m", "mmrlhf_lite.serve", str(run), "--host", HOST, "--port", str(port)]


def shown_command(command: list[str]) -> str:
    """The command as one shell line, quoted so that it can be pasted into a terminal."""
    return shlex.join(command)


def check_port(port) -> int:
    """A port as typed in the page (a number, maybe a float from the field), or Refused saying which ports go."""
    if isinstance(port, bool) or port is None or port == "":
        raise Refused(f"give a port ({MIN_PORT}-{MAX_PORT})")
    try:
        value = float(port)
    except (TypeError, ValueError):
        raise Refused(f"port must be a whole number from {MIN_PORT} to {MAX_PORT}, got {port!r}") from None
    if not value.is_integer() or not MIN_PORT <= value <= MAX_PORT:
        raise Refused(f"port must be a whole number from {MIN_PORT} to {MAX_PORT} (lower ones need root), "
                      f"got {port!r}")
    return int(value)


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when a socket listens on host:port (a bind there fails; SO_REUSEADDR as uvicorn sets it, so a
    connection of a closed service still in TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------------------------------
# state, from the record and the process

def _record(run: Path) -> dict:
    """ui_serve.json, or {} when it is missing or damaged."""
    try:
        rec = json.loads((run / SERVE_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(rec, dict) or type(rec.get("pid")) is not int or type(rec.get("port")) is not int:
        return {}
    if not isinstance(rec.get("command"), list) or not all(isinstance(c, str) for c in rec["command"]):
        return {}
    return rec


def _alive(pid: int, run: Path) -> bool:
    """Alive and really this run's service (a reused pid of another program does not count)."""
    if not 0 < pid < 1 << 31:
        return False
    proc = _started.get(str(run))
    ours = proc is not None and proc.pid == pid
    if ours and proc.poll() is not None:  # reaped: a zombie would look alive to kill(0)
        return False
    cmdline = command_line(pid, ours=ours)
    if not isinstance(cmdline, bytes):
        return cmdline
    args = cmdline.split(b"\0")
    return b"mmrlhf_lite.serve" in args and str(run).encode() in args


def health(port: int, timeout: float = HEALTH_TIMEOUT_S) -> dict | None:
    """GET /health of a service on this machine, or None while it does not answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(f"http://{HOST}:{port}/health", timeout=timeout) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("status") == "ok" else None


def _log_tail(run: Path, lines: int = LOG_LINES) -> str:
    """The last lines of the latest launch's output in serve.log."""
    text = tail_text(run / SERVE_LOG, 16_000).rsplit(LAUNCH_MARK, 1)[-1]
    kept = [ln for ln in text.splitlines()[1:] if ln.strip()]  # [0]: the rest of the launch line
    return "\n".join(kept[-lines:])


def service_state(run: str | os.PathLike) -> ServiceState:
    """How the run's service stands (one short GET /health while it is starting)."""
    run = Path(run)
    rec = _record(run)
    if not rec:
        return ServiceState("none")
    base = dict(port=rec["port"], command=rec["command"], critique=rec.get("critique"))
    pid = rec["pid"]
    if _alive(pid, run):
        if rec.get("ready"):
            return ServiceState("serving", pid=pid, **base)
        answer = health(rec["port"])
        if answer is not None and answer.get("model") == str(run):
            rec.update(ready=time.time(), critique=answer.get("critique"))
            write_atomic(run / SERVE_FILE, json.dumps(rec))
            base["critique"] = rec["critique"]
            return ServiceState("serving", pid=pid, **base)
        return ServiceState("starting", pid=pid, **base)
    if rec.get("stop_requested"):
        return ServiceState("stopped", **base)
    proc = _started.get(str(run))
    code = proc.returncode if proc is not None and proc.pid == pid else None
    how = f"exited with code {code}" if code is not None else "is no longer running"
    tail = _log_tail(run)
    message = f"the service {how}" + (f"; the last lines of {SERVE_LOG}:\n{tail}" if tail else
                                      f" and wrote nothing to {run / SERVE_LOG}")
    return ServiceState("error", message=message, **base)


# --------------------------------------------------------------------------------------------------
# start / stop

def _port_taken_by(runs_root: Path, port: int, run: Path) -> str | None:
    """Another run whose service (started from this UI, maybe still loading) has this port."""
    for name in list_runs(runs_root):
        other = runs_root / name
        if other == run:
            continue
        rec = _record(other)
        if rec.get("port") == port and _alive(rec["pid"], other):
            return name
    return None


def start_service(runs_root: str | os.PathLike, name: str, port) -> ServiceState:
    """Launch the service of run `name` on 127.0.0.1:`port`. Refused when the run has no trained reward
    model, is served already (one service per run), or the port is taken."""
    runs_root = Path(runs_root).resolve()
    run = run_path(runs_root, name)
    if not has_reward_model(run):
        raise Refused(f"run '{name}' has no trained reward model (its `reward` stage has not finished)")
    port = check_port(port)
    with _lock:
        state = service_state(run)
        if state.active:
            raise Refused(f"run '{name}' is already {state.status} on port {state.port} (one service per run): "
                          "Stop serving it first")
        other = _port_taken_by(runs_root, port, run)
        if other:
            raise Refused(f"port {port} is taken by the service of run '{other}': choose another port")
        if port_in_use(port):
            raise Refused(f"port {port} is in use on {HOST} (another program listens on it): choose another port")
        command = serve_command(run, port)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        for key in [k for k in env if k.startswith("GRADIO_")]:
            env.pop(key)
        with open(run / SERVE_LOG, "a", encoding="utf-8") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {LAUNCH_MARK}{shown_command(command)}\n")
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env, cwd=str(PROJECT_ROOT))
        _started[str(run)] = proc
        write_atomic(run / SERVE_FILE, json.dumps({"pid": proc.pid, "port": port, "command": command,
                                                   "started": time.time()}))
    return service_state(run)


def _terminate(pid: int, run: Path, grace: float) -> None:
    """SIGTERM to the service's process group (its own session), SIGKILL after `grace` seconds."""
    proc = _started.get(str(run))
    proc = proc if proc is not None and proc.pid == pid else None

    def signal_group(sig):
        try:
            os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def wait(seconds: float) -> bool:
        if proc is not None:
            try:
                proc.wait(timeout=seconds)
                return True
            except subprocess.TimeoutExpired:
                return False
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not _alive(pid, run):
                return True
            time.sleep(0.1)
        return not _alive(pid, run)

    signal_group(signal.SIGTERM)
    if not wait(grace):
        signal_group(signal.SIGKILL)
        wait(5.0)


def stop_service(run: str | os.PathLike, grace: float = STOP_GRACE_S) -> str:
    """Stop the run's service (SIGTERM, then SIGKILL after `grace` s); returns what was done."""
    run = Path(run)
    with _lock:
        state = service_state(run)
        if not state.active:
            raise Refused(f"run '{run.name}' is not being served ({state.status})")
        rec = _record(run)
        rec["stop_requested"] = time.time()
        write_atomic(run / SERVE_FILE, json.dumps(rec))
        _terminate(state.pid, run, grace)
        _started.pop(str(run), None)
    return f"stopped the service of run '{run.name}' on port {state.port}"


def serving_port(run: str | os.PathLike) -> int | None:
    """The port of the run's service while it is starting or serving (one that must stop before the run
    folder is renamed or deleted), else None. Reads the record and the process only, no request."""
    run = Path(run)
    rec = _record(run)
    return rec["port"] if rec and _alive(rec["pid"], run) else None


def stop_all(grace: float = STOP_GRACE_S) -> None:
    """Stop every service this app launched that still runs (at exit)."""
    for key, proc in list(_started.items()):
        if proc.poll() is None:
            try:
                stop_service(key, grace)
            except (Refused, OSError):
                _terminate(proc.pid, Path(key), grace)


def stop_services_at_exit() -> None:
    """Stop the services this app started when it exits: at a normal exit or Ctrl-C (an exit handler), and
    on SIGTERM (from the main thread, when SIGTERM has no handler yet: the services are stopped, then the
    app ends by SIGTERM as it did before, without waiting for its web server to wind down)."""
    global _at_exit
    if _at_exit:
        return
    _at_exit = True
    atexit.register(stop_all)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_then_die)


def _stop_then_die(signum, _frame) -> None:
    stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


# --------------------------------------------------------------------------------------------------
# what the page shows

EXAMPLE_QUESTION = "What colour is the circle?"
EXAMPLE_ANSWERS = ["The circle is red.", "The circle is blue."]


def state_markdown(state: ServiceState, run_name: str) -> str:
    """The one-line state of the run's service (and its error)."""
    if state.status == "serving":
        mode = f", critique mode {state.critique}" if state.critique else ""
        return f"State: **serving** at {state.url} (pid {state.pid}{mode})"
    if state.status == "starting":
        return (f"State: **starting** on port {state.port} (pid {state.pid}): loading the reward model; "
                "this updates when the service answers GET /health")
    if state.status == "stopped":
        return f"State: **stopped** (it served on port {state.port})"
    if state.status == "error":
        head, _, tail = state.message.partition("\n")
        return f"State: **error**: {head}" + (f"\n\n```text\n{tail}\n```" if tail else "")
    return f"State: **not serving** run {run_name}"


def usage_markdown(state: ServiceState, command: list[str]) -> str:
    """The exact command (copyable), the URL and a scoring request with curl and with Python."""
    port = state.port if state.active else int(command[command.index("--port") + 1])
    url = f"http://{HOST}:{port}"
    body = json.dumps({"question": EXAMPLE_QUESTION, "answers": EXAMPLE_ANSWERS})
    lead = ("Launched command (paste it into a terminal to serve without the app):" if state.active else
            f"**Serve this reward model** runs (on {HOST}: this machine only; the run's critique mode):")
    text = f"{lead}\n\n```bash\n{shown_command(command)}\n```\n\n"
    if not state.active:
        return text
    return text + (
        f"URL: **{url}** — `POST /score` scores answers, `GET /health` says what is served "
        "(the request and response fields: docs/serve.md).\n\n"
        "Score two answers from a shell (`images` is optional: `[{\"base64\": \"...\"}]`, the image file's "
        "bytes):\n\n"
        f"```bash\ncurl -s {url}/score -H 'content-type: application/json' -d '{body}'\n```\n\n"
        "From Python, with an image:\n\n"
        "```python\n"
        "import base64, httpx\n\n"
        'image = base64.b64encode(open("image.png", "rb").read()).decode()\n'
        f'r = httpx.post("{url}/score", timeout=300, json={{\n'
        f'    "question": {json.dumps(EXAMPLE_QUESTION)}, "images": [{{"base64": image}}],\n'
        f'    "answers": {json.dumps(EXAMPLE_ANSWERS)}}})\n'
        'print(r.json()["scores"])   # one score per answer, higher = better\n'
        "```\n")
