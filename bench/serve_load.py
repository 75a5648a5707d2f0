"""Load test of the scoring service (`python -m mmrlhf_lite.serve`): concurrent clients for a fixed time,
with and without batching, on one machine.

    python -m bench.serve_load runs/demo --clients 8 --seconds 30 --max-batch 8 --out bench/results/serve.json

For each setting (`--max-batch 1`: every request its own forward; `--max-batch N`: requests that arrive
within `--batch-wait-ms` scored together) it starts the service in a subprocess on a free port, scores
each distinct request once alone (the single-request scores), then runs `--clients` concurrent clients
(asyncio + httpx, one process) that send the requests in turn for `--seconds`. It reports requests sent
and answered (nothing may be dropped), the largest relative difference of any answer's score from its
single-request score (must be <= 1e-4), p50/p95 latency and answers per second. The requests: demo groups
(one image, base64, 4 answers each), critique mode `none` unless `--critique generate`.
tests/test_serve.py runs a few seconds of it.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REL = 1e-4


def demo_requests(n: int, folder: Path, critique: str = "none", seed: int = 5) -> list[dict]:
    """`n` score requests from synthetic demo groups: one image (base64), the question, 4 answers."""
    from mmrlhf_lite.data.demo import generate

    groups = generate(folder, groups=n, seed=seed, image_size=56, safety_fraction=0.0)
    return [{"question": g.question_text(), "answers": [r.text for r in g.responses], "critique": critique,
             "images": [{"base64": base64.b64encode(Path(g.images[0]).read_bytes()).decode()}]} for g in groups]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode} before it answered /health")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health did not answer within {timeout} s")


def single_scores(url: str, requests: list[dict]) -> list[list[float]]:
    """Each request scored alone, one after the other."""
    import httpx

    with httpx.Client(timeout=300) as client:
        return [client.post(url + "/score", json=r).raise_for_status().json()["scores"] for r in requests]


async def _clients(url: str, requests: list[dict], clients: int, seconds: float) -> list[dict]:
    import httpx

    records: list[dict] = []
    end = time.monotonic() + seconds
    counter = iter(range(10 ** 9))

    async def client(c: int, http: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            i = next(counter) % len(requests)
            start = time.monotonic()
            try:
                r = await http.post(url + "/score", json=requests[i])
                body = r.json() if r.status_code == 200 else None
                records.append({"request": i, "status": r.status_code, "seconds": time.monotonic() - start,
                                "scores": body and body["scores"]})
            except httpx.HTTPError as exc:
                records.append({"request": i, "status": None, "error": repr(exc), "seconds": time.monotonic() - start})

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    return records


def run_load(url: str, requests: list[dict], clients: int, seconds: float, single: list[list[float]]) -> dict:
    """`clients` concurrent clients for `seconds`; the summary (see the module doc)."""
    start = time.monotonic()
    records = asyncio.run(_clients(url, requests, clients, seconds))
    wall = time.monotonic() - start
    ok = [r for r in records if r["status"] == 200]
    worst = 0.0
    for r in ok:
        for a, b in zip(r["scores"], single[r["request"]]):
            worst = max(worst, abs(a - b) / max(abs(b), 1e-6))
    lat = sorted(r["seconds"] for r in ok)
    answers = sum(len(requests[r["request"]]["answers"]) for r in ok)
    return {"clients": clients, "seconds": round(wall, 2), "sent": len(records), "answered": len(ok),
            "dropped": len(records) - len(ok), "errors": [r.get("error") or r["status"] for r in records
                                                          if r["status"] != 200][:5],
            "max_rel_diff_from_single": worst,
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p95_ms": round(1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1) if lat else None,
            "answers_per_s": round(answers / wall, 2), "requests_per_s": round(len(ok) / wall, 2)}


def serve_and_load(run: str, requests: list[dict], *, clients: int, seconds: float, max_batch: int,
                   batch_wait_ms: float = 10.0, startup_timeout: float = 300.0) -> dict:
    """Start the service with `max_batch` in a subprocess, measure, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.Popen([sys.executable, "-m", "mmrlhf_lite.serve", run, "--port", str(port), "--max-batch",
                             str(max_batch), "--batch-wait-ms", str(batch_wait_ms)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(url, startup_timeout, proc)
        single = single_scores(url, requests)
        before = wait_healthy(url, 30)
        result = run_load(url, requests, clients, seconds, single)
        after = wait_healthy(url, 30)
        result.update(max_batch=max_batch, batch_wait_ms=batch_wait_ms, forwards=after["batches"] - before["batches"])
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def table(results: list[dict]) -> str:
    lines = ["| batching | clients | seconds | requests answered / sent | p50 latency | p95 latency | answers/s | "
             "forwards | max rel. diff from single |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        label = "none (--max-batch 1)" if r["max_batch"] == 1 else f"--max-batch {r['max_batch']}"
        lines.append(f"| {label} | {r['clients']} | {r['seconds']} | {r['answered']} / {r['sent']} | {r['p50_ms']} ms "
                     f"| {r['p95_ms']} ms | {r['answers_per_s']} | {r['forwards']} | {r['max_rel_diff_from_single']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder with a trained reward model (or an exported one)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--max-batch", type=int, default=8, help="the batched setting (the other is 1)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--requests", type=int, default=16, help="distinct requests (demo groups)")
    p.add_argument("--critique", choices=("none", "generate"), default="none")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        requests = demo_requests(args.requests, Path(tmp), args.critique)
        results = [serve_and_load(args.run, requests, clients=args.clients, seconds=args.seconds, max_batch=b,
                                  batch_wait_ms=args.batch_wait_ms) for b in (1, args.max_batch)]
    print(table(results))
    if results[0]["answers_per_s"]:
        print(f"batching vs not: answers/s x{results[1]['answers_per_s'] / results[0]['answers_per_s']:.2f}, "
              f"p50 latency x{results[1]['p50_ms'] / results[0]['p50_ms']:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    bad = [r for r in results if r["dropped"] or r["max_rel_diff_from_single"] > REL]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
