"""A local scoring service for a trained critique reward model: HTTP + JSON, for RL trainers that call a
remote reward (and anything else that wants image-aware scores).

    python -m mmrlhf_lite.serve runs/demo [--port 8008] [--host 127.0.0.1] [--critique none|generate] \
        [--max-batch 8] [--media-root DIR]

`POST /score` takes a question, its images (base64, or paths under `--media-root`) and 1-16 answers and
returns one score per answer (and the critiques when asked); `GET /health` says what is served. Requests
from concurrent clients are collected for a few milliseconds (`--batch-wait-ms`), up to `--max-batch`
requests, and scored together: each request is one group (its image encoded once), the groups in one
packed forward of the run's own score function (`models/reward_score.py`; an exported folder works too,
through its plain forward). A bad request (wrong types, a missing or unreadable image, a path outside
`--media-root`, too many answers, a body over `--max-body-mb`) gets a 4xx with a message; a request that
fails inside a batch is retried alone, so it never fails the others, and the service keeps running.
The schema, a Python client and a TRL GRPO example: docs/serve.md.

    python -m pytest -q tests/test_serve.py
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_ANSWERS = 16
MAX_IMAGES = 8
MAX_TEXT = 20_000       # characters of a question or an answer
DEFAULT_PORT = 8008


class ImageIn(BaseModel):
    """One image: its file bytes in base64, or a path relative to (or inside) the service's --media-root."""
    model_config = ConfigDict(extra="forbid")
    base64: str | None = Field(None, description="the image file's bytes (PNG, JPEG, ...), base64-encoded")
    path: str | None = Field(None, description="a file under the service's --media-root")

    @model_validator(mode="after")
    def one_source(self):
        if (self.base64 is None) == (self.path is None):
            raise ValueError("give exactly one of `base64` or `path`")
        return self


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=MAX_TEXT, description="the prompt the answers reply to")
    images: list[ImageIn] = Field(default_factory=list, max_length=MAX_IMAGES,
                                  description="the prompt's images, in order (placed before the question)")
    answers: list[str] = Field(min_length=1, max_length=MAX_ANSWERS, description="the answers to score")
    critique: Literal["none", "generate"] | None = Field(
        None, description="none: no critique; generate: the model writes one per answer first (default: the "
                          "service's --critique)")
    return_critiques: bool = Field(False, description="also return the critique each answer was scored with")

    @model_validator(mode="after")
    def answer_lengths(self):
        for i, a in enumerate(self.answers):
            if len(a) > MAX_TEXT:
                raise ValueError(f"answer {i + 1} has {len(a)} characters, more than {MAX_TEXT}")
        return self


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="one per answer, in order (higher = better)")
    critique: Literal["none", "generate"] = Field(description="the critique mode the scores were made in")
    critiques: list[str | None] | None = Field(None, description="per answer, when return_critiques was true")
    head: list[float] = Field(description="the head's part of each score")
    response_logp: list[float] | None = Field(
        None, description="each answer's mean token log-prob (a hybrid model: score = head + w * response_logp)")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    critique: str
    response_logp_weight: float
    max_batch: int
    batch_wait_ms: float
    queued: int
    served: int
    batches: int


class BadRequest(ValueError):
    """A request the service refuses with a 4xx; `status` says which."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------------
# images

def image_bytes(image: ImageIn, index: int, media_root: Path | None) -> bytes:
    """The file bytes of a request's image, checked to be an image (decoded once, header and pixels)."""
    from .data.media import MediaError, load_image

    where = f"images[{index}]"
    if image.base64 is not None:
        where += ".base64"
        try:
            data = base64.b64decode(image.base64, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where} is not valid base64") from None
    else:
        where += f".path {image.path!r}"
        if media_root is None:
            raise BadRequest(f"{where}.path: this service takes no paths (start it with --media-root DIR), "
                             "send the image as base64", 403)
        target = (media_root / image.path).resolve()
        if not target.is_relative_to(media_root):
            raise BadRequest(f"{where} is outside the service's --media-root", 403)
        if not target.is_file():
            raise BadRequest(f"{where}: no such file under the --media-root", 404)
        data = target.read_bytes()
    try:
        load_image(data)
    except MediaError as exc:
        reason = "over the pixel limit" if "too large" in str(exc) else "not an image file PIL can read (PNG, JPEG, ...)"
        raise BadRequest(f"{where}: {reason}") from None
    return data


# --------------------------------------------------------------------------------------------------
# batching: requests from concurrent clients, one forward

@dataclass
class _Job:
    group: object                 # a PreferenceGroup (its responses are the request's answers)
    mode: str
    loop: asyncio.AbstractEventLoop | None = None   # the waiting request's loop (None: wait on `done`)
    future: asyncio.Future | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: list | None = None
    error: BaseException | None = None

    def finish(self) -> None:
        self.done.set()
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(lambda: self.future.done() or self.future.set_result(None))


class Batcher:
    """Collects jobs for up to `wait_s` after the first (or until `max_batch` are waiting) and scores them
    together on one worker thread (the model is used by one thread only). A batch that raises is scored
    again job by job, so a bad request fails alone."""

    def __init__(self, model, max_batch: int, wait_s: float):
        self.model, self.max_batch, self.wait_s = model, max(1, int(max_batch)), max(0.0, float(wait_s))
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches = self.served = 0
        self.thread = threading.Thread(target=self._work, name="reward-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> _Job:
        self.jobs.put(job)
        return job

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _collect(self, first: _Job) -> list[_Job]:
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            batch.append(job)
        return batch

    def _work(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = self._collect(first)
            for mode in sorted({j.mode for j in batch}):
                self._run([j for j in batch if j.mode == mode], mode)

    def _run(self, jobs: list[_Job], mode: str) -> None:
        try:
            results = self.model.score_groups([j.group for j in jobs], mode, batch_groups=len(jobs))
            self.batches += 1
            for j, r in zip(jobs, results):
                j.result = r
        except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others: retried alone
            if len(jobs) > 1:
                for j in jobs:
                    self._run([j], mode)
                return
            jobs[0].error = exc
        for j in jobs:
            self.served += j.result is not None
            j.finish()


# --------------------------------------------------------------------------------------------------
# the app

def build_app(model, *, name: str, critique: str, max_batch: int = 8, batch_wait_ms: float = 10.0,
              media_root: str | os.PathLike | None = None, max_body_bytes: int = 32 << 20):
    """The FastAPI app around a loaded reward model (`reward_fn.open_reward_model`)."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from .data.groups import PreferenceGroup, Response, text_to_turn

    root = Path(media_root).resolve() if media_root else None
    batcher = Batcher(model, max_batch, batch_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="mmrlhf-lite reward model", version="1", lifespan=lifespan,
                  description=f"Critique reward model of {name}: POST /score, GET /health (docs/serve.md).")
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(BadRequest)
    async def bad_request(_request, exc: BadRequest):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        return HealthResponse(status="ok", model=name, critique=critique,
                              response_logp_weight=model.response_logp_weight, max_batch=batcher.max_batch,
                              batch_wait_ms=batch_wait_ms, queued=batcher.jobs.qsize(), served=batcher.served,
                              batches=batcher.batches)

    @app.post("/score", response_model=ScoreResponse, response_model_exclude_none=True)
    async def score(req: ScoreRequest) -> ScoreResponse:
        images = await run_in_threadpool(lambda: [image_bytes(im, i, root) for i, im in enumerate(req.images)])
        group = PreferenceGroup(id="question", prompt=[text_to_turn(req.question, len(images))],
                                responses=[Response(a) for a in req.answers], images=images)
        mode = req.critique or critique
        loop = asyncio.get_running_loop()
        job = batcher.submit(_Job(group, mode, loop=loop, future=loop.create_future()))
        await job.future
        if job.error is not None:
            if isinstance(job.error, ValueError):  # the data's fault: too long, a special token, a bad image
                raise BadRequest(str(job.error), 422)
            return JSONResponse({"detail": f"scoring failed: {type(job.error).__name__}: {job.error}"},
                                status_code=500)
        res = job.result
        logps = [s.response_logp for s in res]
        return ScoreResponse(scores=[s.score for s in res], critique=mode, head=[s.head for s in res],
                             critiques=[s.critique for s in res] if req.return_critiques else None,
                             response_logp=None if None in logps else logps)

    return app


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 with a message, by its Content-Length or,
    without one, as soon as more arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def message(self) -> str:
        return f"request body over the service's limit of {self.limit} bytes (--max-body-mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            from fastapi.responses import JSONResponse
            return await JSONResponse({"detail": self.message()}, status_code=413)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            msg = await receive()
            received += len(msg.get("body", b"")) if msg["type"] == "http.request" else 0
            if received > self.limit:
                from fastapi import HTTPException
                raise HTTPException(status_code=413, detail=self.message())
            return msg

        return await self.app(scope, limited, send)


# --------------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmrlhf_lite.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Schema, client and TRL GRPO examples: docs/serve.md")
    p.add_argument("run", help="a run folder with a trained reward model, or an exported reward model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--critique", choices=("none", "generate"), default=None,
                   help="default critique mode (default: the run's; `given` becomes generate)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests scored in one forward (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others (default 10 ms)")
    p.add_argument("--media-root", default=None, help="folder image paths may point into (default: base64 only)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32 MB)")
    p.add_argument("--device", default=None, help="where the reward model runs (default: the run's model.device)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_batch < 1:
        print("error: --max-batch must be at least 1", file=sys.stderr)
        return 2
    if args.media_root and not Path(args.media_root).is_dir():
        print(f"error: --media-root {args.media_root} is not a folder", file=sys.stderr)
        return 2
    from .reward_fn import open_reward_model

    try:
        model = open_reward_model(args.run, args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    critique = args.critique or model.default_mode
    import uvicorn

    app = build_app(model, name=str(args.run), critique=critique, max_batch=args.max_batch,
                    batch_wait_ms=args.batch_wait_ms, media_root=args.media_root,
                    max_body_bytes=int(args.max_body_mb * (1 << 20)))
    print(f"serving the reward model of {args.run} on http://{args.host}:{args.port} (critique {critique}, "
          f"max batch {args.max_batch}); POST /score, GET /health", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
