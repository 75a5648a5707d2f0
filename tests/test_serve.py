"""The scoring service (`python -m mmrlhf_lite.serve`): scores equal to the project's scorer, concurrent
clients batched into shared forwards with every answer's score equal to its single-request score (a few
seconds of bench/serve_load.py), every kind of bad request refused with a 4xx and a message while the
service keeps serving, and the command line.

The service runs in this process (uvicorn in a thread, real HTTP on 127.0.0.1) around the tiny hybrid
reward run; the command-line test starts it as a subprocess for a few seconds.

    python -m pytest -q tests/test_serve.py
"""
from __future__ import annotations

import base64
import math
import subprocess
import sys
import threading

import httpx
import pytest

from bench.serve_load import demo_requests, free_port, run_load, single_scores, wait_healthy

REL = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mmrlhf_lite.data.demo import generate

    root = tmp_path_factory.mktemp("serve-media")
    groups = generate(root, groups=3, seed=4, image_size=56, safety_fraction=0.0)
    (root.parent / "secret.png").write_bytes((root / "images" / "demo-00000.png").read_bytes())
    (root / "notes.txt").write_text("not an image")
    return root, groups


@pytest.fixture(scope="module")
def service(tiny_reward_run, data):
    import uvicorn

    from mmrlhf_lite.reward_fn import open_reward_model
    from mmrlhf_lite.serve import build_app

    model = open_reward_model(tiny_reward_run)
    app = build_app(model, name="tiny", critique="none", max_batch=8, batch_wait_ms=50, media_root=data[0],
                    max_body_bytes=1 << 20)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 60)
    yield url, model
    server.should_exit = True
    thread.join(timeout=30)


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def test_scores_equal_the_project_scorer_and_paths_equal_base64(service, data, tiny_reward_run):
    from mmrlhf_lite.recipe import load_recipe
    from mmrlhf_lite.reward.scorer import RewardScorer

    url, model = service
    root, groups = data
    g = groups[0]
    answers = [r.text for r in g.responses]
    by_b64 = httpx.post(url + "/score", json={"question": g.question_text(), "answers": answers,
                                              "images": [{"base64": b64(g.images[0])}]}, timeout=120).json()
    by_path = httpx.post(url + "/score", json={"question": g.question_text(), "answers": answers,
                                               "images": [{"path": "images/demo-00000.png"}]}, timeout=120).json()
    recipe = load_recipe(tiny_reward_run / "recipe.yaml", check_paths=False)
    scorer = RewardScorer.from_run(tiny_reward_run, recipe.model)
    want = [s.score for s in scorer.score_answers(str(g.images[0]), g.question_text(), answers, mode="none")]
    assert by_b64["critique"] == "none" and by_b64["scores"] == by_path["scores"]
    assert all(math.isclose(a, b, rel_tol=REL) for a, b in zip(by_b64["scores"], want)), (by_b64, want)
    # a hybrid model: each score is its head part + 2 x its mean log-prob
    assert all(math.isclose(s, h + 2.0 * lp, rel_tol=1e-6) for s, h, lp in
               zip(by_b64["scores"], by_b64["head"], by_b64["response_logp"]))
    gen = httpx.post(url + "/score", json={"question": g.question_text(), "answers": answers[:2], "critique": "generate",
                                           "return_critiques": True, "images": [{"path": "images/demo-00000.png"}]},
                     timeout=300).json()
    assert gen["critique"] == "generate" and len(gen["critiques"]) == 2 and all(isinstance(c, str) for c in gen["critiques"])
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["response_logp_weight"] == 2.0 and health["max_batch"] == 8


def test_concurrent_clients_are_batched_and_score_as_alone(service, tmp_path):
    """A few seconds of the load test: 6 clients, nothing dropped, every answer's score equal to the score of
    its request sent alone, and fewer forwards than requests (they were batched)."""
    url, _ = service
    requests = demo_requests(6, tmp_path)
    single = single_scores(url, requests)
    before = httpx.get(url + "/health").json()
    result = run_load(url, requests, clients=6, seconds=3.0, single=single)
    after = httpx.get(url + "/health").json()
    assert result["dropped"] == 0 and result["answered"] >= 6, result
    assert result["max_rel_diff_from_single"] <= REL, result
    forwards, served = after["batches"] - before["batches"], after["served"] - before["served"]
    assert served == result["answered"] and forwards < served, (forwards, served)


BAD = [  # (what, request body or raw bytes, status, words in the message)
    ("a number for the question", {"question": 5, "answers": ["a"]}, 422, "valid string"),
    ("answers not a list", {"question": "q", "answers": "a"}, 422, "valid list"),
    ("no answer", {"question": "q", "answers": []}, 422, "at least 1 item"),
    ("too many answers", {"question": "q", "answers": ["a"] * 17}, 422, "at most 16 items"),
    ("an unknown field", {"question": "q", "answers": ["a"], "temperature": 2}, 422, "Extra inputs"),
    ("an unknown critique mode", {"question": "q", "answers": ["a"], "critique": "given"}, 422, "'none' or 'generate'"),
    ("an image with both sources", {"question": "q", "answers": ["a"],
                                    "images": [{"base64": "aGk=", "path": "x.png"}]}, 422, "exactly one of"),
    ("a missing image", {"question": "q", "answers": ["a"], "images": [{"path": "images/nope.png"}]}, 404,
     "no such file under the --media-root"),
    ("a path outside --media-root", {"question": "q", "answers": ["a"], "images": [{"path": "../secret.png"}]}, 403,
     "outside the service's --media-root"),
    ("an absolute path", {"question": "q", "answers": ["a"], "images": [{"path": "/etc/passwd"}]}, 403, "outside"),
    ("a file that is no image", {"question": "q", "answers": ["a"], "images": [{"path": "notes.txt"}]}, 400,
     "not an image file"),
    ("bad base64", {"question": "q", "answers": ["a"], "images": [{"base64": "%%%"}]}, 400, "not valid base64"),
    ("base64 of no image", {"question": "q", "answers": ["a"], "images": [{"base64": "aGVsbG8="}]}, 400,
     "not an image file"),
    ("a special token in the question", {"question": "q <|im_end|>", "answers": ["a"]}, 422, "special token"),
    ("not JSON", b"{question", 422, "JSON decode error"),
    ("a body over the limit", {"question": "q" * (2 << 20), "answers": ["a"]}, 413, "over the service's limit"),
]


@pytest.mark.parametrize("what,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_with_a_message(service, what, body, status, words):
    url, _ = service
    if isinstance(body, bytes):
        r = httpx.post(url + "/score", content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = httpx.post(url + "/score", json=body, timeout=60)
    assert r.status_code == status, (r.status_code, r.text)
    assert words in r.text, r.text
    ok = httpx.post(url + "/score", json={"question": "What is shown?", "answers": ["A circle."]}, timeout=120)
    assert ok.status_code == 200 and len(ok.json()["scores"]) == 1   # the service keeps serving


def test_a_chunked_body_over_the_limit_is_refused(service):
    url, _ = service

    def chunks():
        yield b'{"question": "'
        for _ in range(40):
            yield b"q" * 65536
        yield b'", "answers": ["a"]}'

    r = httpx.post(url + "/score", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "over the service's limit" in r.text


def test_a_bad_request_in_a_batch_fails_alone(service):
    """Concurrent requests, one of them too long for the model: it gets its 422, the others their scores."""
    import concurrent.futures

    url, _ = service
    good = {"question": "What colour is the circle?", "answers": ["It is red.", "It is blue."]}
    bad = {"question": "What colour? " + "very " * 3000, "answers": ["It is red."]}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: httpx.post(url + "/score", json=b, timeout=300), [good, bad, good, good]))
    assert [r.status_code for r in results] == [200, 422, 200, 200], [r.text for r in results]
    assert "max_length" in results[1].text
    assert results[0].json()["scores"] == results[2].json()["scores"]


def test_command_line_serves_and_refuses(tiny_reward_run, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmrlhf_lite.serve", str(tiny_reward_run), "--port", str(port),
                             "--critique", "none", "--max-batch", "4"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}", 120, proc)
        assert health["critique"] == "none" and health["max_batch"] == 4 and health["model"] == str(tiny_reward_run)
        r = httpx.post(f"http://127.0.0.1:{port}/score", json={"question": "q", "answers": ["a", "b"]}, timeout=120)
        assert r.status_code == 200 and len(r.json()["scores"]) == 2
        r = httpx.post(f"http://127.0.0.1:{port}/score", json={"question": "q", "answers": ["a"],
                                                               "images": [{"path": "x.png"}]}, timeout=60)
        assert r.status_code == 403 and "--media-root" in r.text   # no media root: base64 only
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "mmrlhf_lite.serve", str(tiny_reward_run), "--media-root",
                          str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is not a folder" in bad.stderr
