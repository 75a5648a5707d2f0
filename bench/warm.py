"""Commands forked from one warm interpreter, for `bash bench/gpu.sh --dry` (CI): each item of the GPU bench is its
own `python -m ...` process, and on the tiny model a fresh interpreter's imports (torch, transformers, peft ->
bitsandbytes, trl: about 7 CPU s) cost more than the item's work. The server imports them once; each command is a
fork of it that runs the module as `__main__` with the client's arguments, working directory, environment and
stdin / stdout / stderr, in a process group of its own, and the client exits with its exit code. SIGTERM and SIGINT
sent to the client (gpu.sh's `timeout`) go to the command's process group; a client that dies takes its command
with it. The GPU run does not use this: each of its items starts a fresh interpreter.

    python -m bench.warm serve SOCKET [MODULE ...]       # import (default PRELOAD), then serve until stopped
    python -m bench.warm run SOCKET -m MODULE [ARGS ...]  # one command; exits with its code
    python -m bench.warm run SOCKET SCRIPT.py [ARGS ...]  # the same for a script
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time

PRELOAD = ("torch", "transformers", "peft", "trl", "transformers.models.qwen2_vl.modeling_qwen2_vl")
CONNECT_S = 120     # how long a client waits for the server's socket (the server imports first)


def serve(path: str, preload: tuple[str, ...] = PRELOAD) -> int:
    import importlib

    for name in preload:
        importlib.import_module(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path + ".tmp")
    os.replace(path + ".tmp", path)   # clients connect only once the imports are done
    server.listen(4)
    while True:
        conn, _ = server.accept()
        with conn:
            body, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(body)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    server.close()
                    conn.close()
                    code = _command(request, fds)
                finally:   # the fork never returns into the server's loop
                    os._exit(code)
            try:
                os.setpgid(pid, pid)   # here too, so that a signal passed on at once finds the group
            except OSError:
                pass
            for fd in fds:
                os.close(fd)
            try:
                conn.send(str(pid).encode())
            except OSError:   # the client is gone: _wait kills the command
                pass
            code = _wait(pid, conn)
            try:
                conn.send(str(code).encode())
            except OSError:
                pass


def _wait(pid: int, conn: socket.socket) -> int:
    """The command's exit code (128 + N when a signal N ended it); a client gone first kills its process group."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done and select.select([conn], [], [], 0.2)[0] and not _recv(conn):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            done, status = os.waitpid(pid, 0)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(16)
    except OSError:
        return b""


def _command(request: dict, fds: list[int]) -> int:
    import io
    import runpy
    import traceback

    os.setpgid(0, 0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=True, write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True, write_through=True)
    code = 0
    try:
        if request.get("module"):
            sys.argv = [request["module"], *request["args"]]
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:   # as `python SCRIPT`: its folder first on sys.path
            sys.argv = [request["script"], *request["args"]]
            sys.path.insert(0, os.path.dirname(os.path.abspath(request["script"])))
            runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as an interpreter would: the traceback, exit 1
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # closed by the command (json.tool closes stdout)
            pass
    return code


def run(path: str, argv: list[str]) -> int:
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        print("usage: python -m bench.warm run SOCKET (-m MODULE | SCRIPT) [ARGS ...]", file=sys.stderr)
        return 2
    command = {"module": argv[1], "args": argv[2:]} if argv[0] == "-m" else {"script": argv[0], "args": argv[1:]}
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    deadline = time.time() + CONNECT_S
    while True:
        try:
            client.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.time() > deadline:
                print(f"bench.warm: no server at {path} after {CONNECT_S} s", file=sys.stderr)
                return 1
            time.sleep(0.1)
    body = json.dumps({**command, "cwd": os.getcwd(), "env": dict(os.environ)})
    socket.send_fds(client, [body.encode()], [0, 1, 2])
    pid = int(client.recv(32))

    def forward(signum, frame):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    reply = client.recv(32)
    return int(reply) if reply else 1


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        sys.exit(serve(sys.argv[2], tuple(sys.argv[3:]) or PRELOAD))
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        sys.exit(run(sys.argv[2], sys.argv[3:]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
