"""What the web UI may touch: paths resolved inside a root, safe names, and who may connect.

The browser can name paths (a data file, a run, a recipe, an upload's file name). Every such name is
resolved here with symlinks followed and refused unless it stays under its root, so `../`, absolute
paths and a symlink pointing out of the root all fail the same way, with a message that says why.
Nothing here imports gradio: app.py checks the bind address before gradio is even imported.

    python -m pytest -q tests/test_ui_security.py
"""
from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

AUTH_ENV = "MMRLHF_UI_AUTH"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class Refused(ValueError):
    """A request the UI will not carry out; the message is shown to the user as is."""


def inside(root: str | os.PathLike, name: str | os.PathLike | None, *, what: str = "path",
           allow_absolute: bool = False) -> Path:
    """`name` (relative to `root`) resolved with symlinks followed; refused unless it stays under `root`.

    `allow_absolute` accepts an absolute path that already lies under the root (paths read back from a
    recipe); names typed or picked in the browser are always relative.
    """
    text = "" if name is None else str(name).strip()
    if not text:
        raise Refused(f"no {what} given")
    if "\x00" in text:
        raise Refused(f"{what} contains a NUL byte")
    root_path = Path(root).resolve()
    p = Path(os.path.expanduser(text)) if allow_absolute else Path(text)
    if p.is_absolute() and not allow_absolute:
        raise Refused(f"{what} '{text}' is absolute; give a path relative to {root_path}")
    resolved = (p if p.is_absolute() else root_path / p).resolve()
    if resolved != root_path and root_path not in resolved.parents:
        raise Refused(f"{what} '{text}' is outside {root_path} (after following links); refused")
    return resolved


def is_inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True when `path` (absolute, or relative to the working directory) resolves under `root`."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):
        return False
    root_path = Path(root).resolve()
    return resolved == root_path or root_path in resolved.parents


def safe_name(name: str | None, *, what: str = "name") -> str:
    """A single path component the UI creates (run folder, recipe file): letters, digits, `._-`."""
    text = (name or "").strip()
    if not _NAME.match(text) or ".." in text:
        raise Refused(f"{what} '{text}' is not allowed: use 1-80 letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit (no '/' or '..')")
    return text


def clean_filename(name: str, fallback: str = "upload") -> str:
    """An uploaded file's name reduced to a safe basename (the browser controls it; never trust it)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip("._-")
    return base[:100] or fallback


# --------------------------------------------------------------------------------------------------
# who may connect

def is_local_host(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`user:pass` -> (user, pass); None when not given. The password may contain ':'."""
    if text is None or text == "":
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise Refused("--auth must look like user:password (both non-empty)")
    return user, password


def check_bind(host: str, auth: tuple[str, str] | None) -> str:
    """Refuse a non-local bind without a login; returns the line app.py prints about who can connect."""
    if is_local_host(host):
        note = " (login required)" if auth else ""
        return f"listening on {host} only: reachable from this machine only{note}"
    if auth is None:
        raise Refused(f"refusing to listen on {host} without a login: anyone who can reach this machine could "
                      f"read your data and start jobs. Pass --auth user:password (or set {AUTH_ENV}=user:password), "
                      "or keep the default --host 127.0.0.1")
    return (f"listening on {host}: reachable from the network, login required for user '{auth[0]}'. "
            "Traffic is plain HTTP: use it on a trusted network or behind an HTTPS proxy")
