"""The HTTP side: an ASGI app (FastAPI) with OpenAI's routes, limits, errors and SSE streaming.

Everything that can be refused is refused before any model work, cheapest first: the Host header (400), the
API key (401) and the content type (415) from the headers alone; then a full server (429) before the body is
read; a body past its byte cap (413) by its declared length, or once the bytes read pass it; the body's JSON and
fields (400), the model name (404), ``max_tokens`` (400) and the method spec (400) before the prompt is tokenized; and
the prompt's length (413) before the model is touched. Model work runs in a worker thread (``Engine.run``) so
the event loop keeps answering ``/health`` and new requests meanwhile, and watches each client: one that goes
away cancels its generation within ``POLL_S``, streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import LongreachError
from . import protocol as p
from .engine import DEFAULT_MAX_TOKENS, Engine, Event, Job

log = logging.getLogger("longreach.serve")
POLL_S = 0.2  # how often a request checks that its client is still there (wall time, whatever the model emits)
DEFAULT_MAX_OUTPUT_TOKENS = 4096
BODY_BYTES_PER_TOKEN = 16  # a prompt token is ~4 characters of text, up to 12 bytes JSON-escaped: room for both
BODY_OVERHEAD_BYTES = 64 << 10  # the JSON around the prompt: roles, stop strings, the method spec, ...
MAX_BODY_BYTES = 32 << 20  # the body cap without --max-input-tokens (~8M tokens of text)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int | None = None  # longer prompts: 413
    max_concurrency: int = 1  # requests admitted at once (they take the model in turn)
    max_queue: int = 16  # requests waiting for admission; past that: 429
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS  # a larger max_tokens: 400
    allowed_hosts: tuple[str, ...] | None = None  # Host names served, any port (None: any); see loopback_hosts

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.max_queue < 0:
            raise ValueError(f"need max_concurrency >= 1 and max_queue >= 0, got {self.max_concurrency}, "
                             f"{self.max_queue}")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise ValueError(f"max_input_tokens must be >= 1, got {self.max_input_tokens}")
        if self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be >= 1, got {self.max_output_tokens}")

    @property
    def capacity(self) -> int:
        """Requests running or waiting at once; one more gets a 429."""
        return self.max_concurrency + self.max_queue

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read: tokenizing is work too, so a body that cannot fit
        ``max_input_tokens`` is refused before it is read whole."""
        if self.max_input_tokens is None:
            return MAX_BODY_BYTES
        return BODY_BYTES_PER_TOKEN * self.max_input_tokens + BODY_OVERHEAD_BYTES

    @property
    def default_max_tokens(self) -> int:
        return min(DEFAULT_MAX_TOKENS, self.max_output_tokens)


def loopback_hosts(host: str) -> tuple[str, ...] | None:
    """The Host names a server bound to ``host`` serves: when it is bound to a loopback address, only loopback
    names, so a web page whose own domain an attacker points at 127.0.0.1 (DNS rebinding) cannot reach it; None
    (any Host) when it is bound elsewhere. Any port goes: a page cannot choose the name, and a tunnel
    (``ssh -L 9000:localhost:8000``) keeps the name but not the port."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return None
    if not loopback:
        return None
    bound = f"[{host}]" if ":" in host else host
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, bound.lower())))


def host_name(header: str) -> str:
    """The name in a Host header, without its port (an IPv6 address keeps its brackets), lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Gate:
    """Admission: at most ``max_concurrency`` requests running and ``max_queue`` waiting; more get a 429."""

    def __init__(self, limits: Limits) -> None:
        self.capacity = limits.capacity
        self.slots = asyncio.Semaphore(limits.max_concurrency)
        self.inflight = 0
        self.counts = {"served": 0, "failed": 0, "cancelled": 0, "rejected": 0}

    def enter(self) -> None:
        """Reserve a place (or 429); the caller gives it back with ``leave`` once the request is over."""
        if self.inflight >= self.capacity:
            self.counts["rejected"] += 1
            raise p.APIError(429, f"the server is full ({self.inflight} requests running or queued); retry later",
                             kind="rate_limit_error", code="server_busy")
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1


def error_response(err: p.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def server_error(err: BaseException) -> p.APIError:
    """The 500 for a failure of the server's own: the traceback goes to the server's log, and the body names only
    the exception's type (its text may hold paths or data of the server's that a client should not read)."""
    log.error("request failed", exc_info=err)
    return p.APIError(500, f"the server failed on this request ({type(err).__name__}; the details are in the "
                           "server's log); the next request is served normally", kind="server_error",
                      code="internal_error")


def event_error(ev: Event) -> p.APIError:
    """An error raised inside a request: a longreach error (a method this model refuses, ...) is the request's
    fault (400, with its message, which is written for the user); anything else is the server's (500)."""
    err = ev.error
    if isinstance(err, LongreachError):
        return p.APIError(400, str(err), param="method", code="invalid_method")
    assert err is not None
    return server_error(err)


def cancelled_response() -> JSONResponse:
    return JSONResponse(p.APIError(499, "the client closed the request").body(), status_code=499)


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class Guard:
    """Refusals that need only the request's headers, before any route runs.

    * ``Host`` outside ``limits.allowed_hosts``: 400 (DNS rebinding: a page on an attacker's domain that
      resolves to 127.0.0.1 would otherwise be same-origin with a loopback server);
    * ``/v1/*`` without the API key, when there is one: 401;
    * a POST whose body is not declared ``application/json``: 415. A browser sends a cross-site POST without
      asking first only with a form or plain-text content type; requiring JSON makes it ask (CORS), and this
      server grants no cross-site access.
    """

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            err = self.refusal(Headers(scope=scope), scope["method"], scope["path"])
            if err is not None:
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers, method: str, path: str) -> p.APIError | None:
        limits = self.limits
        host = headers.get("host", "")
        if limits.allowed_hosts is not None and host_name(host) not in limits.allowed_hosts:
            return p.APIError(400, f"Host '{host}' is not served here: this server is bound to a loopback address "
                                   f"and answers only the names {', '.join(limits.allowed_hosts)}; connect "
                                   "through one of those (or bind another --host)", param="host", code="invalid_host")
        if limits.api_key and path.startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {limits.api_key}".encode()):
                return p.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the "
                                       "server's --api-key", kind="authentication_error", code="invalid_api_key")
        if method == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return p.APIError(415, f"the request body must be JSON sent as 'Content-Type: application/json', "
                                       f"not '{kind or 'none'}'", param="content-type",
                                  code="unsupported_media_type")
        return None


class ClosingStream(StreamingResponse):
    """A StreamingResponse that calls ``on_close`` however it ends: finished, failed, or stopped because its
    client left, even before its body's generator started (a generator that never started runs no ``finally``,
    so a generation could otherwise outlive its client)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def body_too_large(size: int, limits: Limits, exact: bool) -> p.APIError:
    why = (f"{BODY_BYTES_PER_TOKEN} bytes per --max-input-tokens token ({limits.max_input_tokens}) plus "
           f"{BODY_OVERHEAD_BYTES} bytes" if limits.max_input_tokens else "this server's fixed cap")
    return p.APIError(413, f"the request body has {'' if exact else 'more than '}{size} bytes, over this server's "
                           f"cap of {limits.max_body_bytes} ({why}); shorten the prompt",
                      code="request_too_large")


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, read only up to ``limits.max_body_bytes``: a larger declared length is refused unread, and a
    body without one (chunked) is refused once it passes the cap."""
    cap = limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise body_too_large(int(declared), limits, exact=True)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > cap:
            raise body_too_large(cap, limits, exact=False)
    return bytes(body)


async def watch_client(request: Request, job: Job) -> None:
    """Cancel ``job`` once its client has gone, checked every ``POLL_S`` of wall time whatever the worker emits
    (a fast generation emits all the time; it must still stop when nobody waits for it)."""
    while not await request.is_disconnected():
        await asyncio.sleep(POLL_S)
    job.cancel.set()


async def stop_task(task: asyncio.Task) -> None:
    """Cancel ``task`` and wait for it, without swallowing a cancellation of the caller's own."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        log.warning("watching a client failed", exc_info=task.exception())


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    """The ASGI app serving ``engine`` under ``limits``."""
    limits = limits or Limits()
    workers = ThreadPoolExecutor(max_workers=limits.max_concurrency, thread_name_prefix="longreach-model")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="longreach", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, limits=limits)
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
        return error_response(server_error(err))

    async def request_of(request: Request, chat: bool) -> p.Common:
        """The validated request: JSON, fields, model name and answer length; no tokenizing yet."""
        try:
            body = json.loads(await read_body(request, limits))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise p.APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
        except ClientDisconnect:
            raise p.APIError(499, "the client closed the request before sending its body") from None
        req = p.parse(p.ChatRequest if chat else p.CompletionRequest, body)
        assert isinstance(req, p.Common)
        if req.model != engine.name:
            raise p.APIError(404, f"model '{req.model}' is not served here; this server serves '{engine.name}' "
                                  "(chosen at start-up)", kind="not_found_error", param="model",
                             code="model_not_found")
        asked, field = req.asked_max_tokens()
        if asked is not None and asked > limits.max_output_tokens:
            raise p.APIError(400, f"{field}={asked} is over this server's limit of {limits.max_output_tokens} "
                                  "tokens per answer (--max-output-tokens); ask for fewer", param=field,
                             code="invalid_value")
        return req

    async def tokens_of(req: p.Common, chat: bool) -> tuple[int, ...]:
        if not chat:
            assert isinstance(req, p.CompletionRequest)
            return await run_in_threadpool(engine.encode_text, req.text)
        assert isinstance(req, p.ChatRequest)
        try:
            return await run_in_threadpool(engine.encode_chat, [m.plain() for m in req.messages])
        except LongreachError as err:
            raise p.APIError(400, str(err), param="messages") from None
        except Exception as err:  # the template itself refused the conversation (e.g. roles out of order)
            raise p.APIError(400, f"the model's chat template refused these messages: {err}",
                             param="messages") from None

    async def job_of(req: p.Common, chat: bool) -> Job:
        """The request's job: its method (400), its prompt's tokens (400 when empty, 413 when too long)."""
        try:
            spec = engine.spec_for(req.method)
        except LongreachError as err:
            raise p.APIError(400, str(err), param="method", code="invalid_method") from None
        tokens = await tokens_of(req, chat)
        if not tokens:
            raise p.APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        if limits.max_input_tokens is not None and len(tokens) > limits.max_input_tokens:
            raise p.APIError(413, f"the prompt has {len(tokens)} tokens, over this server's limit of "
                                  f"{limits.max_input_tokens} (--max-input-tokens); shorten it",
                             param="messages" if chat else "prompt", code="context_length_exceeded")
        return Job(tokens, spec, req.sampling(limits.default_max_tokens))

    async def launch(g: Gate, job: Job) -> asyncio.Queue:
        """Wait for a model slot, then run ``job`` in a worker thread; its events arrive on the returned queue.
        From here the worker's end gives the slot and the gate's place back."""
        await g.slots.acquire()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        def finished(_: asyncio.Future) -> None:
            g.slots.release()
            g.leave()

        try:
            fut = loop.run_in_executor(workers, engine.run, job, emit)
        except BaseException:
            g.slots.release()
            raise
        fut.add_done_callback(finished)
        return queue

    def count(ev: Event | None) -> None:
        kind = {"done": "served", "error": "failed"}.get(ev.kind if ev else "", "cancelled")
        get_gate().counts[kind] += 1

    async def handle(request: Request, chat: bool) -> Response:
        g = get_gate()
        g.enter()  # a full server answers 429 before reading the body
        launched = False
        try:
            req = await request_of(request, chat)
            job = await job_of(req, chat)
            watcher = asyncio.create_task(watch_client(request, job))
            try:
                queue = await launch(g, job)
                launched = True
                rid = p.new_id("chatcmpl" if chat else "cmpl")
                if not req.stream:
                    return await answer(rid, queue, chat)
                first = await queue.get()
            finally:  # the stream watches its own client (StreamingResponse listens for the disconnect)
                await stop_task(watcher)
        finally:
            if not launched:
                g.leave()
        if first.kind in ("error", "cancelled"):
            count(first)
            return error_response(event_error(first)) if first.kind == "error" else cancelled_response()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        ended: list[Event] = []  # the closing event the client was sent, if it got that far

        def close() -> None:
            job.cancel.set()  # a no-op once the job has finished; stops it when the client went away
            count(ended[0] if ended else None)

        return ClosingStream(stream(rid, first, queue, chat, include_usage, ended), close)

    async def answer(rid: str, queue: asyncio.Queue, chat: bool) -> Response:
        """A non-streaming answer: the worker's text until its one closing event."""
        text: list[str] = []
        while (ev := await queue.get()).kind == "text":
            text.append(ev.text)
        count(ev)
        if ev.kind == "cancelled":
            return cancelled_response()
        if ev.kind == "error":
            return error_response(event_error(ev))
        shape = p.chat_response if chat else p.completion_response
        return JSONResponse(shape(rid, engine.name, "".join(text), ev.finish_reason, ev.usage,
                                  {**ev.info, "replica": replica}))

    async def stream(rid: str, ev: Event, queue: asyncio.Queue, chat: bool, include_usage: bool, ended: list[Event]
                     ) -> AsyncIterator[bytes]:
        """SSE chunks until the answer ends with ``data: [DONE]``; the closing event goes into ``ended``. A
        disconnect stops the generator; ``ClosingStream`` then cancels the job."""
        name = engine.name
        if chat:
            yield sse(p.chat_chunk(rid, name, {"role": "assistant", "content": ""}))
        while ev.kind == "text":
            yield sse(p.chat_chunk(rid, name, {"content": ev.text}) if chat else p.completion_chunk(rid, name, ev.text))
            ev = await queue.get()
        ended.append(ev)
        if ev.kind == "done":
            yield sse(p.chat_chunk(rid, name, {}, ev.finish_reason) if chat
                      else p.completion_chunk(rid, name, "", ev.finish_reason))
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield sse(p.usage_chunk(rid, name, obj, ev.usage, {**ev.info, "replica": replica}))
        else:  # an error after the first token: the status is sent already, so the error is an event
            yield sse((event_error(ev) if ev.kind == "error" else p.APIError(499, "cancelled")).body())
        yield sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

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
