"""The OpenAI-compatible HTTP server: one model, one generation at a time, requests served in arrival order.

Handlers on the event loop only validate, queue and format. A single worker thread owns the engine (model,
tokenizer, KV cache), so generations never interleave and the event loop never waits on torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from draftwise.cli.entry import add_model_args, load_engine
from draftwise.core.decode import GenerationStats
from draftwise.core.errors import DraftwiseError
from draftwise.drafters import METHODS
from draftwise.engine import Engine, Generation, Prompt

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30.0  # how long Ctrl-C waits for in-flight requests before cancelling them
DEFAULT_MAX_TOKENS = 256
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}  # draftwise's -> OpenAI's
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
T = TypeVar("T")


# --- requests


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def for_template(self) -> dict[str, str]:
        """Chat templates know `system`, not OpenAI's newer `developer`, and want plain-text content."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields both endpoints share. `method` is draftwise's extension; `model` is accepted, but one model is
    served. Nulls mean "default", as in OpenAI's API; temperature defaults to 0 (greedy), as in the engine.
    """

    model: str | None = None
    method: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=1, description="only one choice per request")
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    def stream_kwargs(self, max_tokens: int | None) -> dict[str, Any]:
        """Keyword arguments for Engine.stream."""
        if self.method is not None and self.method not in METHODS:
            raise APIError(400, f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}", param="method")
        return dict(
            method=self.method,
            max_new_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=0.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
        )


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)  # newer clients' name for max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


# --- errors


class APIError(Exception):
    """An error answered in OpenAI's shape, so OpenAI clients raise their usual exception types."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def validation_error(exc: RequestValidationError, content_type: str) -> APIError:
    """Malformed JSON is a 400. Well-formed JSON with wrong fields is a 422 whose `param` is the first bad
    top-level field, as in OpenAI's errors, and whose message gives the full path of every problem."""
    if content_type and "json" not in content_type:  # FastAPI left the body unparsed; `curl -d` without -H
        return APIError(400, "send the request body as JSON, with the header Content-Type: application/json")
    errors = exc.errors()
    bad_json = [e for e in errors if e["type"] == "json_invalid"]
    if bad_json:
        return APIError(400, f"the request body is not valid JSON: {bad_json[0].get('ctx', {}).get('error')}")
    paths = [[str(p) for p in e["loc"][1:]] for e in errors]  # loc starts with "body"
    problems = zip(paths, errors, strict=True)
    message = "; ".join(f"{'.'.join(path) or 'request body'}: {e['msg']}" for path, e in problems)
    return APIError(422, message, param=paths[0][0] if paths[0] else None)


# --- the worker


@dataclass(eq=False)
class Job:
    """One generation, handed from a handler to the worker. The worker answers through `events`:
    ("start", None), then ("piece", str)..., then ("done", Generation) or ("error", APIError)."""

    prompt: Prompt
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any = None) -> None:
        with suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Metrics:
    """The /metrics series. Each app has its own registry, so several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("draftwise_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.generated_tokens = Counter(
            "draftwise_generated_tokens", "tokens generated by finished requests", registry=r
        )
        self.cancelled = Counter(
            "draftwise_cancelled_generations", "generations stopped early: client gone or server stopping", registry=r
        )
        self.tokens_per_s = Gauge(
            "draftwise_tokens_per_second", "decode speed of the latest finished generation", registry=r
        )
        self.mean_accepted = Gauge(
            "draftwise_mean_accepted_length",
            "tokens committed per verify round (tau, bonus token included) over all finished generations",
            registry=r,
        )
        self.draft_calls_per_round = Gauge(
            "draftwise_draft_calls_per_round",
            "drafter calls per verify round over all finished generations",
            registry=r,
        )
        self.queue_length = Gauge("draftwise_queue_length", "requests waiting for the model", registry=r)
        self.busy = Gauge("draftwise_busy", "1 while a generation is running", registry=r)
        self._rounds = self._accepted = self._draft_calls = 0

    def observe(self, stats: GenerationStats) -> None:
        """Called by the worker thread only, so the running totals need no lock."""
        self._rounds += stats.rounds
        self._accepted += sum(stats.accepted)
        self._draft_calls += stats.draft_calls
        self.generated_tokens.inc(stats.new_tokens)
        self.tokens_per_s.set(stats.tokens_per_s)
        if self._rounds:
            self.mean_accepted.set(self._accepted / self._rounds)
            self.draft_calls_per_round.set(self._draft_calls / self._rounds)


class Worker:
    """Owns the engine: runs one generation at a time on its own thread, first come first served."""

    def __init__(self, engine: Engine | Callable[[], Engine], max_queue: int, metrics: Metrics):
        """`engine` may be a loader, called on the worker's own thread (what `draftwise serve` does), so that all
        torch work stays on one thread (why: Engine._check_thread)."""
        self.max_queue, self.metrics = max_queue, metrics
        self.engine = engine if isinstance(engine, Engine) else None
        self._loader = None if isinstance(engine, Engine) else engine
        self._load_error: BaseException | None = None
        self.closed = False
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="draftwise-worker", daemon=True)
        self._loaded = threading.Event()
        metrics.queue_length.set_function(lambda: len(self._waiting))
        metrics.busy.set_function(lambda: self._running is not None)
        if self.engine is None:
            self.start()
            self._loaded.wait()
            if self._load_error is not None:
                raise self._load_error

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or refuse it at once (429) when `max_queue` requests are already waiting."""
        with self._changed:
            if self.closed:
                raise APIError(503, "the server is shutting down", "server_error")
            if len(self._waiting) >= self.max_queue:
                raise APIError(
                    429,
                    f"the server is busy: {len(self._waiting)} requests are already waiting; retry later",
                    "rate_limit_error",
                    code="queue_full",
                )
            self._waiting.append(job)
            self._changed.notify()

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or stop a running one after its current round. Harmless on a finished job."""
        job.cancelled.set()
        with self._changed, suppress(ValueError):
            self._waiting.remove(job)

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new work, cancel what is left, and wait for the current round to end."""
        with self._changed:
            self.closed = True
            left = [*self._waiting, *([self._running] if self._running else [])]
            self._waiting.clear()
            self._changed.notify()
        for job in left:
            job.cancelled.set()
            job.emit("error", APIError(503, "the server is shutting down", "server_error"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        if self._loader is not None:
            try:
                self.engine = self._loader()
            except BaseException as exc:  # handed to the thread that waits for the load
                self._load_error = exc
                return
            finally:
                self._loaded.set()
        while True:
            with self._changed:
                while not self._waiting and not self.closed:
                    self._changed.wait()
                if self.closed:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._generate(job)
            finally:
                self._running = None

    def _generate(self, job: Job) -> None:
        if job.cancelled.is_set():  # cancelled between leaving the queue and getting here
            return
        try:
            stream = self.engine.stream(job.prompt, **job.options)
        except DraftwiseError as exc:  # prompt too long or empty, bad sampling values, drafter failed to load
            job.emit("error", APIError(400, str(exc)))
            return
        except Exception as exc:
            log.exception("could not start a generation")
            job.emit("error", APIError(500, f"internal error: {exc}", "server_error"))
            return
        job.emit("start")
        pieces = iter(stream)
        try:
            for piece in pieces:
                job.emit("piece", piece)
                if job.cancelled.is_set():
                    self.metrics.cancelled.inc()
                    return
            assert stream.generation is not None
            self.metrics.observe(stream.generation.stats)
            job.emit("done", stream.generation)
        except Exception as exc:
            log.exception("generation failed")
            job.emit("error", APIError(500, f"internal error: {exc}", "server_error"))
        finally:
            stream.close()  # the decode loop is never resumed, so a cancelled generation does no more work


# --- responses


@dataclass
class Reply:
    """Formats one request's answer as an OpenAI chat.completion or text_completion, whole or in chunks."""

    chat: bool
    model: str
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, generation: Generation) -> dict:
        stats = generation.stats
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": FINISH_REASONS[stats.finish_reason]}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": generation.text}
        else:
            choice["text"] = generation.text
        return {**self._envelope([choice], chunk=False), "usage": usage(stats), "draftwise": stats.summary()}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            choice["delta"] = delta if text is None else delta | {"content": text}
        else:
            choice["text"] = text or ""
        return self._envelope([choice], chunk=True)

    def last_chunk(self, stats: GenerationStats) -> dict:
        return {**self.chunk(None, FINISH_REASONS[stats.finish_reason]), "draftwise": stats.summary()}

    def usage_chunk(self, stats: GenerationStats) -> dict:
        return {**self._envelope([], chunk=True), "usage": usage(stats)}


def usage(stats: GenerationStats) -> dict[str, int]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
    }


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def next_event(job: Job) -> tuple[str, Any]:
    kind, value = await job.events.get()
    if kind == "error":
        raise value
    return kind, value


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


class CountRequests:
    """ASGI middleware counting answers by endpoint and status (streams count when their headers go out)."""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


# --- the app


def create_app(engine: Engine | Callable[[], Engine], max_queue: int = 16) -> FastAPI:
    """The HTTP app around `engine` (or a loader of one, run on the worker thread). Up to `max_queue` requests
    wait behind the running one; more get 429."""
    metrics = Metrics()
    worker = Worker(engine, max_queue, metrics)
    engine = worker.engine
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.close)  # in-flight requests have finished or been cancelled by now

    app = FastAPI(title="draftwise", summary="OpenAI-compatible speculative decoding", lifespan=lifespan)
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
        job = Job(
            prompt, {**body.stream_kwargs(max_tokens), "chat_template": chat_template}, asyncio.get_running_loop()
        )
        worker.submit(job)
        streaming = False
        try:
            await unless_disconnected(request, next_event(job))  # "start": the engine accepted the prompt
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
            "data": [{"id": engine.model_name, "object": "model", "created": started, "owned_by": "draftwise"}],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "shutting down" if worker.closed else "ok"
        return JSONResponse(
            {
                "status": status,
                "model": engine.model_name,
                "method": engine.default_method,
                "queue_length": worker.queue_length,
                "busy": worker.busy,
            },
            status_code=503 if worker.closed else 200,
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# --- the command


def listen(host: str, port: int) -> socket.socket:
    """Bind before the slow model load, so a busy port or a bad host is reported at once."""
    if not 0 <= port <= 65535:
        raise DraftwiseError(f"--port must be in [0, 65535], got {port}")
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise DraftwiseError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    if args.max_queue < 1:
        raise DraftwiseError(f"--max-queue must be >= 1, got {args.max_queue}")
    sock = listen(args.host, args.port)
    app = create_app(lambda: load_engine(args), max_queue=args.max_queue)  # loads on the worker thread
    host, port = sock.getsockname()[:2]
    print(
        f"[draftwise] serving {args.model} (method {args.method}) at http://{args.host}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `draftwise serve` to the CLI."""
    parser = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait behind the running one; more get HTTP 429 (default: 16)",
    )
    parser.set_defaults(func=cmd_serve)
