"""The OpenAI-compatible HTTP app: one model, one generation at a time, requests served in arrival order.

Handlers on the event loop only validate, queue and format; the worker thread (worker.py) runs the engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from draftwise.core.errors import DraftwiseError
from draftwise.engine import Engine, Generation, Prompt
from draftwise.server.metrics import CountRequests, Metrics
from draftwise.server.schemas import (
    DEFAULT_MAX_TOKENS,
    APIError,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    Limits,
    Reply,
    check_request,
    validation_error,
)
from draftwise.server.worker import Job, Worker

GRACEFUL_SHUTDOWN_S = 30.0  # how long Ctrl-C waits for in-flight requests before cancelling them
OPEN_ENDPOINTS = frozenset({"/health"})  # answered without the API key: load balancers probe it
T = TypeVar("T")


# --- streaming


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def next_event(job: Job) -> tuple[str, Any]:
    kind, value = await job.events.get()
    if kind == "error":
        raise value
    return kind, value


async def started(job: Job, worker: Worker, queue_timeout: float | None) -> None:
    """Wait until the engine has accepted the prompt. A job still queued after `queue_timeout` seconds leaves
    the queue with a 503; once the worker has picked it up, it is waited for however long that takes."""
    start = asyncio.ensure_future(next_event(job))
    try:
        await asyncio.wait({start}, timeout=queue_timeout)
        if not start.done() and worker.withdraw(job):
            raise APIError(
                503,
                f"the request waited {queue_timeout:g} s for the model without starting; retry later",
                "server_error",
                code="queue_timeout",
            )
        await start
    finally:
        start.cancel()


async def finished(job: Job) -> Generation:
    while True:
        kind, value = await next_event(job)
        if kind == "done":
            return value


async def sse_events(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """The stream body; a worker error after the headers went out becomes an OpenAI-style error event."""
    try:
        if reply.chat:
            yield sse(reply.chunk("", role=True))
        while True:
            kind, value = await next_event(job)
            if kind == "piece":
                yield sse(reply.chunk(value))
            elif kind == "done":
                yield sse(reply.last_chunk(value.stats))
                if include_usage:
                    yield sse(reply.usage_chunk(value.stats))
                break
    except APIError as exc:
        yield sse(exc.body())
    yield sse("[DONE]")


class JobStream(StreamingResponse):
    """A streamed answer that cancels its job however the response ends: done, failed or the client left."""

    def __init__(self, body: AsyncIterator[str], job: Job, worker: Worker):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job, self.worker = job, worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.worker.cancel(self.job)


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, but raise ClientGone if the client disconnects first (while queued, say)."""

    async def hangup() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(awaitable), asyncio.ensure_future(hangup())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()
        watch.cancel()
    if work in done:
        return work.result()
    raise ClientGone


# --- access and size


class RequireAPIKey:
    """ASGI middleware: every path but OPEN_ENDPOINTS needs `Authorization: Bearer <key>`, or gets a 401 before
    its body is read. Keys are compared as SHA-256 digests in constant time, so neither their bytes nor their
    length leak through timing."""

    def __init__(self, app, api_key: str):
        self.app, self.digest = app, hashlib.sha256(api_key.encode()).digest()

    def authorized(self, scope: Scope) -> bool:
        scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
        given = hashlib.sha256(key.strip().encode("latin-1")).digest()  # headers are latin-1; keys UTF-8 bytes
        return secrets.compare_digest(given, self.digest) and scheme.lower() == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_ENDPOINTS or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        sent = Headers(scope=scope).get("authorization")
        message = "incorrect API key" if sent else "no API key: send the header Authorization: Bearer <key>"
        await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)


class LimitBody:
    """ASGI middleware: a request body over `max_bytes` gets a 413 in OpenAI's shape, refused on its
    Content-Length before any of it is read, or (chunked) as soon as the bytes received pass the limit.
    (Starlette's RequestBodyLimitMiddleware answers plain text, which OpenAI clients cannot parse.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def error(self) -> APIError:
        return APIError(413, f"the request body is over this server's limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.error().response()(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI passes an HTTPException raised while reading through
                    raise HTTPException(413, self.error().message)
            return message

        await self.app(scope, limited, send)


# --- the app


def create_app(
    engine: Engine | Callable[[], Engine],
    max_queue: int = 16,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The HTTP app around `engine` (or a loader of one, run on the worker thread). Up to `max_queue` requests
    wait behind the running one; more get 429. With `api_key`, every endpoint but /health needs it."""
    limits = Limits() if limits is None else limits
    metrics = Metrics()
    worker = Worker(engine, max_queue, metrics)
    engine = worker.engine
    methods = limits.methods_for(engine.default_method)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.close)  # in-flight requests have finished or been cancelled by now

    app = FastAPI(title="draftwise", summary="OpenAI-compatible speculative decoding", lifespan=lifespan)
    app.add_middleware(LimitBody, max_bytes=limits.max_body_bytes)  # the last added runs first
    if api_key is not None:
        app.add_middleware(RequireAPIKey, api_key=api_key)
    app.add_middleware(CountRequests, counter=metrics.requests)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc, request.headers.get("content-type", "")).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:  # unknown path, wrong HTTP method
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:  # uvicorn logs the traceback
        return APIError(500, "internal server error", "server_error").response()

    async def answer(
        request: Request,
        body: GenerationRequest,
        prompt: Prompt,
        reply: Reply,
        max_tokens: int | None,
        chat_template: bool,
    ) -> Response:
        check_request(body, limits, methods)
        options = body.stream_kwargs(max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_tokens))
        job = Job(
            prompt,
            {**options, "chat_template": chat_template},
            asyncio.get_running_loop(),
            time_limit=limits.request_timeout,
        )
        worker.submit(job)
        streaming = False
        try:
            await unless_disconnected(request, started(job, worker, limits.queue_timeout))
            if body.stream:
                streaming = True
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return JobStream(sse_events(job, reply, include_usage), job, worker)
            return JSONResponse(reply.whole(await unless_disconnected(request, finished(job))))
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            if not streaming:
                worker.cancel(job)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        messages = [m.for_template() for m in body.messages]
        return await answer(
            request,
            body,
            messages,
            Reply(chat=True, model=engine.model_name),
            body.max_completion_tokens or body.max_tokens,
            chat_template=True,
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        return await answer(
            request, body, prompt, Reply(chat=False, model=engine.model_name), body.max_tokens, chat_template=False
        )

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": engine.model_name, "object": "model", "created": created, "owned_by": "draftwise"}],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while requests can be served; 503 while shutting down or once the worker has died."""
        status = "worker stopped" if worker.dead else "shutting down" if worker.closed else "ok"
        return JSONResponse(
            {
                "status": status,
                "model": engine.model_name,
                "method": engine.default_method,
                "queue_length": worker.queue_length,
                "busy": worker.busy,
            },
            status_code=200 if status == "ok" else 503,
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# --- listening


def listen(host: str, port: int) -> socket.socket:
    """Bind before the slow model load, so a busy port or a bad host is reported at once."""
    if not 0 <= port <= 65535:
        raise DraftwiseError(f"--port must be in [0, 65535], got {port}")
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise DraftwiseError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def run_server(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on the bound `sock` until Ctrl-C, letting in-flight requests finish for a while."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    uvicorn.Server(config).run(sockets=[sock])
