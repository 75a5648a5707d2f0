"""The UI's safety rules, tested through the running app: every input that takes a path or a name
refuses `../`, absolute paths and symlinks out of its root; uploads cannot escape; gradio serves no file
outside its own temp dir; a non-local bind without a login refuses to start.

    python -m pytest -q tests/test_ui_security.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile

import pytest

from test_ui_support import REPO, start_server, stop_server

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from mmrlhf_lite.ui.form import FIELDS  # noqa: E402

REFUSED = "(?i)outside|absolute|not allowed|refused|not a folder directly"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-security")
    secret = root / "secret"
    secret.mkdir()
    (secret / "private.jsonl").write_text('{"id": "x"}\n')
    (secret / "recipe.yaml").write_text("model: {}\n")
    srv = start_server(root)
    (srv.data / "ok.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    # symlinks inside each root that point outside it
    (srv.data / "escape.jsonl").symlink_to(secret / "private.jsonl")
    (srv.data / "escape-dir").symlink_to(secret)
    (srv.runs / "escape-run").symlink_to(secret)
    (srv.recipes / "escape.yaml").symlink_to(secret / "recipe.yaml")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False, download_files=False)


@pytest.fixture(scope="module")
def form_values(client):
    values = list(client.predict("tiny.yaml", api_name="/load_recipe"))
    return values[:-1]


def with_field(values: list, key: str, value) -> list:
    out = list(values)
    out[[f.key for f in FIELDS].index(key)] = value
    return out


BAD_PATHS = ["../secret/private.jsonl", "../../../../etc/passwd", "/etc/passwd", "escape.jsonl", "escape-dir/private.jsonl"]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_data_inputs_refuse_paths_out_of_the_data_root(client, bad):
    with pytest.raises(AppError, match=REFUSED):
        client.predict(bad, "auto", "", "", api_name="/inspect")
    with pytest.raises(AppError, match=REFUSED):
        client.predict(bad, "auto", "", 0, "", api_name="/group")
    with pytest.raises(AppError, match=REFUSED):
        client.predict(bad, "auto", "", True, api_name="/use_data")


@pytest.mark.parametrize("bad", ["../secret", "/etc", "escape-dir"])
def test_media_root_refuses_folders_out_of_the_data_root(client, server, bad):
    with pytest.raises(AppError, match=REFUSED):
        client.predict("ok.jsonl", "auto", bad, "", api_name="/inspect")


@pytest.mark.parametrize("bad", ["../secret", "../../etc", "/etc", "escape-run", "a/b", ".."])
def test_run_inputs_refuse_names_out_of_the_runs_root(client, server, form_values, bad):
    for api in ("/view", "/stop", "/resume", "/reward_cache"):
        with pytest.raises(AppError, match=REFUSED):
            client.predict(bad, api_name=api)
    with pytest.raises(AppError, match=REFUSED):
        client.predict([bad], "beta", api_name="/compare")
    with pytest.raises(AppError, match=REFUSED):
        client.predict(bad, None, "q", "a", "", "", "", "", "none", 4, api_name="/score")
    with pytest.raises(AppError, match=REFUSED):
        client.predict(bad, *form_values, api_name="/start")
    with pytest.raises(AppError, match=REFUSED):  # the "reward scores from run" input of the group browser
        client.predict("ok.jsonl", "auto", "", 0, bad, api_name="/group")
    assert sorted(p.name for p in server.root.iterdir()) == ["app.log", "data", "recipes", "runs", "secret", "uploads"]
    assert sorted(p.name for p in server.runs.iterdir()) == ["escape-run"]
    assert sorted(p.name for p in (server.root / "secret").iterdir()) == ["private.jsonl", "recipe.yaml"]


FORM_PATHS = [("data.path", "/etc/passwd"), ("data.path", "../secret/private.jsonl"), ("data.path", "escape.jsonl"),
              ("data.eval_path", "../secret/private.jsonl"), ("data.media_root", "/etc"), ("cache.dir", "/tmp"),
              ("cache.dir", "../secret"), ("reward.model_from", "../secret"), ("reward.model_from", "escape-run")]


@pytest.mark.parametrize("key,bad", [(k, b) for k, b in FORM_PATHS if k in {f.key for f in FIELDS}])
def test_form_paths_must_stay_under_their_roots(client, server, form_values, key, bad):
    with pytest.raises(AppError, match=REFUSED):
        client.predict("fine-name", *with_field(form_values, key, bad), api_name="/start")
    assert not (server.runs / "fine-name").exists()


@pytest.mark.parametrize("bad", ["../secret/recipe.yaml", "/etc/passwd", "escape.yaml"])
def test_recipe_inputs_refuse_paths_out_of_the_recipes_folder(client, server, form_values, bad):
    with pytest.raises(AppError, match=REFUSED):
        client.predict(bad, api_name="/load_recipe")
    with pytest.raises(AppError, match=REFUSED):
        client.predict(bad, *form_values, api_name="/save_recipe")
    assert sorted(p.name for p in (server.root / "secret").iterdir()) == ["private.jsonl", "recipe.yaml"]


def test_zip_uploads_cannot_write_outside_their_folder(client, server, tmp_path):
    for name, member in (("slip.zip", "../../../escaped.jsonl"), ("abs.zip", "/tmp/escaped.jsonl")):
        z = tmp_path / name
        with zipfile.ZipFile(z, "w") as zf:
            zf.writestr(member, "{}\n")
        with pytest.raises(AppError, match="outside its folder"):
            client.predict(handle_file(str(z)), api_name="/upload")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("data.jsonl")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(AppError, match="symbolic link"):
        client.predict(handle_file(str(link)), api_name="/upload")
    assert not list(server.root.rglob("escaped.jsonl")) and not (tmp_path.parent / "escaped.jsonl").exists()


def test_upload_takes_only_files_from_gradios_temp_dir(server):
    """A crafted request naming a server path instead of an uploaded file is refused."""
    body = json.dumps({"data": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}]}).encode()
    req = urllib.request.Request(server.url + "gradio_api/call/upload", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        event_id = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(server.url + f"gradio_api/call/upload/{event_id}", timeout=30) as r:
        stream = r.read().decode()
    assert "event: error" in stream
    assert not list(server.data.rglob("passwd"))


@pytest.mark.parametrize("path", ["/etc/passwd", "{data}/ok.jsonl", "{runs}", "{root}/secret/private.jsonl"])
def test_gradio_serves_no_file_outside_its_temp_dir(server, path):
    target = path.format(data=server.data, runs=server.runs, root=server.root)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "gradio_api/file=" + target, timeout=10)
    assert err.value.code in (403, 404)


def _app(*args: str, env_auth: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MMRLHF_UI_AUTH"}
    if env_auth is not None:
        env["MMRLHF_UI_AUTH"] = env_auth
    return subprocess.run([sys.executable, str(REPO / "app.py"), *args], capture_output=True, text=True, env=env,
                          timeout=60, cwd=str(REPO))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_non_local_bind_without_auth_refuses_to_start(host, tmp_path):
    r = _app("--host", host, "--port", "9", "--runs-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2
    assert f"refusing to listen on {host} without a login" in r.stderr and "--auth user:password" in r.stderr
    assert "MMRLHF_UI_AUTH" in r.stderr and not (tmp_path / "r").exists()


def test_bad_auth_is_refused(tmp_path):
    r = _app("--host", "0.0.0.0", "--auth", "nopassword", "--runs-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "--auth must look like user:password" in r.stderr
    r = _app("--host", "0.0.0.0", "--runs-dir", str(tmp_path / "r"), env_auth=":x")
    assert r.returncode == 2 and "user:password" in r.stderr
