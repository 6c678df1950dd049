"""The HTTP side: an ASGI app (FastAPI) with OpenAI's routes, limits, errors and SSE streaming.

Everything that can be refused is refused before any model work: the API key (401), the body (400), the
method spec (400), the model name (404), the prompt's length (413) and a full server (429). Model work runs in
a worker thread (``Engine.run``) so the event loop keeps answering ``/health`` and new requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import LongreachError
from . import protocol as p
from .engine import Engine, Event, Job

log = logging.getLogger("longreach.serve")
POLL_S = 0.2  # how often a waiting request checks that its client is still there


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int | None = None  # longer prompts: 413
    max_concurrency: int = 1  # requests admitted at once (they take the model in turn)
    max_queue: int = 16  # requests waiting for admission; past that: 429
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.max_queue < 0:
            raise ValueError(f"need max_concurrency >= 1 and max_queue >= 0, got {self.max_concurrency}, "
                             f"{self.max_queue}")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise ValueError(f"max_input_tokens must be >= 1, got {self.max_input_tokens}")


class Gate:
    """Admission: at most ``max_concurrency`` requests running and ``max_queue`` waiting; more get a 429."""

    def __init__(self, limits: Limits) -> None:
        self.capacity = limits.max_concurrency + limits.max_queue
        self.slots = asyncio.Semaphore(limits.max_concurrency)
        self.inflight = 0
        self.counts = {"served": 0, "failed": 0, "cancelled": 0, "rejected": 0}

    def enter(self) -> None:
        if self.inflight >= self.capacity:
            self.counts["rejected"] += 1
            raise p.APIError(429, f"the server is full ({self.inflight} requests running or queued); retry later",
                             kind="rate_limit_error", code="server_busy")
        self.inflight += 1


def error_response(err: p.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def event_error(ev: Event) -> p.APIError:
    """An error raised inside a request: a longreach error (a method this model refuses, ...) is the request's
    fault (400); anything else is the server's (500)."""
    err = ev.error
    if isinstance(err, LongreachError):
        return p.APIError(400, str(err), param="method", code="invalid_method")
    log.error("request failed", exc_info=err)
    return p.APIError(500, f"the server failed on this request ({type(err).__name__}: {err}); the next request "
                           "is served normally", kind="server_error", code="internal_error")


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    """The ASGI app serving ``engine`` under ``limits``."""
    limits = limits or Limits()
    workers = ThreadPoolExecutor(max_workers=limits.max_concurrency, thread_name_prefix="longreach-model")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="longreach", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.limits = engine, limits
    gate: Gate | None = None
    replica = f"{socket.gethostname()}:{os.getpid()}"

    def get_gate() -> Gate:  # created inside the running loop
        nonlocal gate
        if gate is None:
            gate = Gate(limits)
        return gate

    @app.exception_handler(p.APIError)
    async def _api_error(_: Request, err: p.APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(Exception)
    async def _crash(_: Request, err: Exception) -> JSONResponse:
        log.error("request failed", exc_info=err)
        return error_response(p.APIError(500, f"the server failed on this request ({type(err).__name__}); the "
                                              "next request is served normally", kind="server_error",
                                         code="internal_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if limits.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {limits.api_key}".encode()):
                return error_response(p.APIError(401, "missing or wrong API key: send 'Authorization: Bearer "
                                                      "<key>' with the server's --api-key",
                                                 kind="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    async def body_of(request: Request, model: type) -> object:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise p.APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
        req = p.parse(model, body)
        if req.model != engine.name:  # type: ignore[attr-defined]
            raise p.APIError(404, f"model '{req.model}' is not served here; this server serves '{engine.name}' "  # type: ignore[attr-defined]
                                  "(chosen at start-up)", kind="not_found_error", param="model",
                             code="model_not_found")
        return req

    def job_for(req: p.Common, tokens: tuple[int, ...]) -> Job:
        try:
            spec = engine.spec_for(req.method)
        except LongreachError as err:
            raise p.APIError(400, str(err), param="method", code="invalid_method") from None
        if not tokens:
            raise p.APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        if limits.max_input_tokens is not None and len(tokens) > limits.max_input_tokens:
            raise p.APIError(413, f"the prompt has {len(tokens)} tokens, over this server's limit of "
                                  f"{limits.max_input_tokens} (--max-input-tokens); shorten it",
                             param="messages" if isinstance(req, p.ChatRequest) else "prompt",
                             code="context_length_exceeded")
        return Job(tokens, spec, req.sampling())

    async def next_event(queue: asyncio.Queue, request: Request, job: Job) -> Event | None:
        """The worker's next event; None once the client has gone (the job is cancelled then)."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    return None

    async def start(job: Job) -> asyncio.Queue:
        """Admit ``job`` (or 429) and run it in a worker thread; its events arrive on the returned queue."""
        g = get_gate()
        g.enter()
        try:
            await g.slots.acquire()
        except BaseException:
            g.inflight -= 1
            raise
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        def finished(fut: asyncio.Future) -> None:
            g.slots.release()
            g.inflight -= 1

        fut = loop.run_in_executor(workers, engine.run, job, emit)
        fut.add_done_callback(finished)
        return queue

    def count(ev: Event | None) -> None:
        kind = {"done": "served", "error": "failed"}.get(ev.kind if ev else "", "cancelled")
        get_gate().counts[kind] += 1

    async def complete(request: Request, req: p.Common, tokens: tuple[int, ...], chat: bool):
        job = job_for(req, tokens)
        queue = await start(job)
        rid = p.new_id("chatcmpl" if chat else "cmpl")
        if not req.stream:
            text: list[str] = []
            while (ev := await next_event(queue, request, job)) is not None and ev.kind == "text":
                text.append(ev.text)
            count(ev)
            if ev is None or ev.kind == "cancelled":
                return JSONResponse(p.APIError(499, "the client closed the request").body(), status_code=499)
            if ev.kind == "error":
                return error_response(event_error(ev))
            shape = p.chat_response if chat else p.completion_response
            return JSONResponse(shape(rid, engine.name, "".join(text), ev.finish_reason, ev.usage,
                                      {**ev.info, "replica": replica}))
        first = await next_event(queue, request, job)
        if first is None or first.kind in ("error", "cancelled"):
            count(first)
            if first is not None and first.kind == "error":
                return error_response(event_error(first))
            return JSONResponse(p.APIError(499, "the client closed the request").body(), status_code=499)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(stream(rid, first, queue, job, chat, include_usage), media_type="text/event-stream")

    async def stream(rid: str, ev: Event, queue: asyncio.Queue, job: Job, chat: bool, include_usage: bool
                     ) -> AsyncIterator[bytes]:
        """SSE chunks until the answer ends with ``data: [DONE]``; a disconnect cancels the job (finally)."""
        name, last = engine.name, None
        try:
            if chat:
                yield sse(p.chat_chunk(rid, name, {"role": "assistant", "content": ""}))
            while True:
                if ev.kind == "text":
                    yield sse(p.chat_chunk(rid, name, {"content": ev.text}) if chat
                              else p.completion_chunk(rid, name, ev.text))
                elif ev.kind == "done":
                    last = ev
                    yield sse(p.chat_chunk(rid, name, {}, ev.finish_reason) if chat
                              else p.completion_chunk(rid, name, "", ev.finish_reason))
                    if include_usage:
                        obj = "chat.completion.chunk" if chat else "text_completion"
                        yield sse(p.usage_chunk(rid, name, obj, ev.usage, {**ev.info, "replica": replica}))
                    yield sse("[DONE]")
                    return
                else:  # an error after the first token: the status is sent already, so the error is an event
                    last = ev
                    err = event_error(ev) if ev.kind == "error" else p.APIError(499, "cancelled")
                    yield sse(err.body())
                    yield sse("[DONE]")
                    return
                ev = await queue.get()
        finally:
            job.cancel.set()  # a no-op once the job has finished; stops it when the client went away
            count(last)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await body_of(request, p.ChatRequest)
        try:
            tokens = await run_in_threadpool(engine.encode_chat, [m.plain() for m in req.messages])
        except LongreachError as err:
            raise p.APIError(400, str(err), param="messages") from None
        except Exception as err:  # the template itself refused the conversation (e.g. roles out of order)
            raise p.APIError(400, f"the model's chat template refused these messages: {err}",
                             param="messages") from None
        return await complete(request, req, tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await body_of(request, p.CompletionRequest)
        tokens = await run_in_threadpool(engine.encode_text, req.text)
        return await complete(request, req, tokens, chat=False)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "longreach"}]}

    @app.get("/health")
    async def health() -> dict:
        g = get_gate()
        return {"status": "ok", "replica": replica, "inflight": g.inflight, "requests": dict(g.counts),
                **engine.stats()}

    return app
