"""The OpenAI-compatible HTTP server: one model, one generation at a time, requests served in arrival order.

Handlers on the event loop only validate, queue and format. A single worker thread owns the engine (model,
tokenizer, KV cache), so generations never interleave and the event loop never waits on torch.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import secrets
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
from jinja2 import TemplateError, TemplateSyntaxError  # torch requires jinja2; chat templates are jinja
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from draftwise.cli import add_model_args, load_engine
from draftwise.decode import GenerationStats
from draftwise.drafters import METHODS
from draftwise.engine import Engine, Generation, Prompt
from draftwise.errors import DraftwiseError

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30.0  # how long Ctrl-C waits for in-flight requests before cancelling them
DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_STOP_CHARS = 256  # the held-back stop prefix is searched every round: bound the work a request can ask for
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}  # draftwise's -> OpenAI's
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
OPEN_ENDPOINTS = frozenset({"/health"})  # answered without the API key: load balancers probe it
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
    stop: (
        Annotated[str, Field(max_length=MAX_STOP_CHARS)]
        | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_SEQUENCES)]
        | None
    ) = None
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
            stop=self.stops(),
        )

    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def prompt_texts(self) -> list[tuple[str, str]]:
        """(field path, text) of every string that reaches the tokenizer; each endpoint names its own."""
        raise NotImplementedError


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)  # newer clients' name for max_tokens

    def prompt_texts(self) -> list[tuple[str, str]]:
        return [(f"messages.{i}.content", m.for_template()["content"]) for i, m in enumerate(self.messages)]


class CompletionRequest(GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def prompt_texts(self) -> list[tuple[str, str]]:
        return [("prompt", self.prompt if isinstance(self.prompt, str) else self.prompt[0])]


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; `draftwise serve` sets each with the flag of the same name."""

    max_body_bytes: int = 4 * 2**20
    max_prompt_chars: int = 200_000  # counted before tokenising, which runs on the one worker thread
    max_tokens: int = 4096  # a request asking for more gets 400; one asking for none gets min(256, this)
    request_timeout: float | None = 300.0  # seconds a generation may run; then it ends with finish_reason "length"
    queue_timeout: float | None = 120.0  # seconds a request may wait for the model; then 503 with Retry-After
    allowed_methods: frozenset[str] | None = None  # None: the engine's own method and ar; the engine's is always in

    def methods_for(self, engine_method: str) -> frozenset[str]:
        """The methods requests may name. `draft-model` loads a second full model, so it is in only when named."""
        methods = {engine_method, *(self.allowed_methods or {"ar"})}
        unknown = sorted(methods - set(METHODS))
        if unknown:
            raise DraftwiseError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        return frozenset(methods)


def check_request(body: GenerationRequest, limits: Limits, methods: frozenset[str]) -> None:
    """The limits checked on the event loop, before a request is queued: cheap, and no tokenising."""
    if body.method is not None and body.method in METHODS and body.method not in methods:
        enabled = ", ".join(sorted(methods))
        raise APIError(
            400,
            f"method '{body.method}' is not enabled on this server; enabled: {enabled} (see serve --allowed-methods)",
            param="method",
        )
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(body, name, None)
        if value is not None and value > limits.max_tokens:
            raise APIError(400, f"{name} is {value}; this server generates at most {limits.max_tokens}", param=name)
    texts = body.prompt_texts()
    chars = sum(len(text) for _, text in texts)
    if chars > limits.max_prompt_chars:
        raise APIError(
            400,
            f"the prompt is {chars} characters; this server accepts at most {limits.max_prompt_chars}",
            param=texts[0][0].split(".")[0],
            code="context_length_exceeded",
        )
    for path, text in [*texts, *(("stop", s) for s in body.stops() or [])]:
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError as exc:  # JSON allows "\ud800"; the tokenizer (and UTF-8) does not
                raise APIError(
                    400,
                    f"{path} holds a lone UTF-16 surrogate ({text[exc.start]!r} at character {exc.start}), "
                    "which is not a Unicode character",
                    param=path.split(".")[0],
                ) from None


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
        headers = {"Retry-After": "1"} if self.status in (429, 503) else {}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return ASCIIJSONResponse(self.body(), status_code=self.status, headers=headers)


class ASCIIJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message may quote a request's lone surrogate,
    which has no UTF-8 encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def validation_error(exc: RequestValidationError, content_type: str) -> APIError:
    """Malformed JSON is a 400. Well-formed JSON with wrong fields is a 422 whose `param` is the first bad
    top-level field, as in OpenAI's errors, and whose message gives the full path of every problem."""
    if "json" not in content_type:  # FastAPI left the body unparsed; `curl -d` without -H, or no Content-Type
        return APIError(400, "send the request body as JSON, with the header Content-Type: application/json")
    errors = exc.errors()
    bad_json = [e for e in errors if e["type"] == "json_invalid"]
    if bad_json:
        return APIError(400, f"the request body is not valid JSON: {bad_json[0].get('ctx', {}).get('error')}")
    paths = [[str(p) for p in e["loc"][1:]] for e in errors]  # loc starts with "body"
    surrogates = [path for path, e in zip(paths, errors, strict=True) if e["type"] == "string_unicode"]
    if surrogates:  # pydantic refuses them in length-checked strings; check_request in the others
        return APIError(
            400,
            f"{surrogates[0][0]} holds a lone UTF-16 surrogate, which is not a Unicode character",
            param=surrogates[0][0],
        )
    problems = zip(paths, errors, strict=True)
    message = "; ".join(f"{'.'.join(path) or 'request body'}: {e['msg']}" for path, e in problems)
    return APIError(422, message, param=paths[0][0] if paths[0] else None)


# --- the worker


@dataclass(eq=False)
class Job:
    """One generation, handed from a handler to the worker. The worker answers through `events`:
    ("start", None), then ("piece", str)..., then ("done", Generation) or ("error", APIError).
    A generation running longer than `time_limit` seconds ends there, as if it had reached max_tokens."""

    prompt: Prompt
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    time_limit: float | None = None

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
        self.timed_out = Counter(
            "draftwise_timed_out_generations", "generations ended early by the server's request timeout", registry=r
        )
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


def worker_stopped() -> APIError:
    return APIError(503, "the model worker has stopped; the server needs a restart", "server_error")


class Worker:
    """Owns the engine: runs one generation at a time on its own thread, first come first served."""

    def __init__(self, engine: Engine | Callable[[], Engine], max_queue: int, metrics: Metrics):
        """`engine` may be a loader, called on the worker's own thread (what `draftwise serve` does), so that all
        torch work stays on one thread (why: Engine._check_thread)."""
        self.max_queue, self.metrics = max_queue, metrics
        self.engine = engine if isinstance(engine, Engine) else None
        self._loader = None if isinstance(engine, Engine) else engine
        self._load_error: BaseException | None = None
        self.failure: BaseException | None = None  # what killed the worker thread, if anything did
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

    @property
    def dead(self) -> bool:
        """The worker thread stopped without being asked to: nothing queued will ever run."""
        started = self._thread.ident is not None
        return self.failure is not None or (started and not self._thread.is_alive() and not self.closed)

    def start(self) -> None:
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or refuse it at once (429) when `max_queue` requests are already waiting."""
        with self._changed:
            if self.dead:
                raise worker_stopped()
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

    def withdraw(self, job: Job) -> bool:
        """Take `job` out of the queue if it is still waiting there (True); a running job is left alone."""
        with self._changed:
            if job not in self._waiting:
                return False
            self._waiting.remove(job)
            job.cancelled.set()
            return True

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
        try:
            self._serve()
        except BaseException as exc:  # a bug in this loop, or a BaseException out of the engine: fail every waiter
            log.critical("the model worker stopped; /health now answers 503", exc_info=True)
            with self._changed:
                self.failure = exc
                left = [*self._waiting, *([self._running] if self._running else [])]
                self._waiting.clear()
            for job in left:
                job.emit("error", worker_stopped())

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self.closed:
                    self._changed.wait()
                if self.closed:
                    return
                job = self._running = self._waiting.popleft()
            self._generate(job)
            self._running = None

    def _generate(self, job: Job) -> None:
        """Run `job`. Messages of unexpected exceptions stay in the log: clients get a generic one."""
        if job.cancelled.is_set():  # cancelled between leaving the queue and getting here
            return
        try:
            stream = self.engine.stream(job.prompt, **job.options)
        except DraftwiseError as exc:  # prompt too long or empty, bad sampling values, drafter failed to load
            job.emit("error", APIError(400, str(exc)))
            return
        except TemplateError as exc:  # the template's raise_exception: roles out of order, say
            if isinstance(exc, TemplateSyntaxError):
                log.exception("the model's chat template does not compile")
                job.emit("error", APIError(500, "the model's chat template is broken", "server_error"))
            else:
                job.emit("error", APIError(400, f"the model's chat template rejected the messages: {exc}"))
            return
        except Exception:
            log.exception("could not start a generation")
            job.emit("error", APIError(500, "internal error: the generation could not start", "server_error"))
            return
        job.emit("start")
        deadline = None if job.time_limit is None else time.monotonic() + job.time_limit
        pieces = iter(stream)
        try:
            for piece in pieces:
                job.emit("piece", piece)
                if job.cancelled.is_set():
                    self.metrics.cancelled.inc()
                    return
                if deadline is not None and time.monotonic() > deadline:
                    stream.close()  # no more rounds; what is left of `pieces` is the text of the tokens so far
                    for rest in pieces:
                        job.emit("piece", rest)
                    self.metrics.timed_out.inc()
                    break
            assert stream.generation is not None
            self.metrics.observe(stream.generation.stats)
            job.emit("done", stream.generation)
        except Exception:
            log.exception("generation failed")
            job.emit("error", APIError(500, "internal error: the generation failed", "server_error"))
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
    limits: Limits = Limits(),
) -> FastAPI:
    """The HTTP app around `engine` (or a loader of one, run on the worker thread). Up to `max_queue` requests
    wait behind the running one; more get 429. With `api_key`, every endpoint but /health needs it."""
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


# --- the command


def listen(host: str, port: int) -> socket.socket:
    """Bind before the slow model load, so a busy port or a bad host is reported at once."""
    if not 0 <= port <= 65535:
        raise DraftwiseError(f"--port must be in [0, 65535], got {port}")
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise DraftwiseError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def is_loopback(host: str) -> bool:
    with suppress(ValueError):
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    return False


def limits_from(args: argparse.Namespace) -> Limits:
    """The serve flags as Limits, refused with a DraftwiseError (exit 2) before the model loads."""
    for flag, value, low in [
        ("--max-queue", args.max_queue, 1),
        ("--max-body-bytes", args.max_body_bytes, 1),
        ("--max-prompt-chars", args.max_prompt_chars, 1),
        ("--max-tokens", args.max_tokens, 1),
        ("--request-timeout", args.request_timeout, 0),
        ("--queue-timeout", args.queue_timeout, 0),
    ]:
        if not value >= low:  # NaN too
            raise DraftwiseError(f"{flag} must be >= {low}, got {value}")
    if args.max_tokens > 1_000_000:
        raise DraftwiseError(f"--max-tokens must be <= 1000000, got {args.max_tokens}")
    allowed = None if args.allowed_methods is None else frozenset(filter(None, args.allowed_methods.split(",")))
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        max_tokens=args.max_tokens,
        request_timeout=args.request_timeout or None,
        queue_timeout=args.queue_timeout or None,
        allowed_methods=allowed,
    )
    limits.methods_for(args.method)  # unknown names fail now, not after the model has loaded
    return limits


def api_key_from(args: argparse.Namespace) -> str | None:
    key = args.api_key if args.api_key is not None else os.environ.get("DRAFTWISE_API_KEY") or None
    if key is not None and (not key.strip() or key != key.strip()):
        raise DraftwiseError("the API key must not be empty nor start or end with whitespace")
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    limits, api_key = limits_from(args), api_key_from(args)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if api_key is None and not is_loopback(host):
        print(
            f"[draftwise] warning: listening on {host} without an API key: anyone who can reach port {port} can "
            "use the model; set DRAFTWISE_API_KEY (or --api-key)",
            file=sys.stderr,
            flush=True,
        )
    try:  # the engine loads on the worker thread
        app = create_app(lambda: load_engine(args), max_queue=args.max_queue, api_key=api_key, limits=limits)
    except BaseException:
        sock.close()
        raise
    print(
        f"[draftwise] serving {args.model} (method {args.method}) at http://{args.host}:{port}/v1"
        + (" (API key required)" if api_key else ""),
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
    limits = Limits()
    group = parser.add_argument_group("access and limits")
    group.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on every endpoint but /health (default: $DRAFTWISE_API_KEY; "
        "unset: no key). Prefer the environment variable: other users can read command lines",
    )
    group.add_argument(
        "--allowed-methods",
        default=None,
        metavar="M1,M2",
        help="methods a request may choose with `method` (default: --method and ar); --method is always allowed. "
        "draft-model loads a second full model, so only list it if you mean to",
    )
    group.add_argument(
        "--max-tokens",
        type=int,
        default=limits.max_tokens,
        help="most tokens one request may generate: a request asking for more gets HTTP 400, not a silently "
        f"shorter answer; one asking for none gets min({DEFAULT_MAX_TOKENS}, this) (default: {limits.max_tokens})",
    )
    group.add_argument(
        "--max-prompt-chars",
        type=int,
        default=limits.max_prompt_chars,
        help="most characters of prompt or message content per request, checked before tokenising; more gets "
        f"HTTP 400 (default: {limits.max_prompt_chars})",
    )
    group.add_argument(
        "--max-body-bytes",
        type=int,
        default=limits.max_body_bytes,
        help=f"largest request body; larger gets HTTP 413 (default: {limits.max_body_bytes}, 4 MiB)",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=limits.request_timeout,
        help="seconds a generation may run: then it stops and answers the text so far with finish_reason "
        f"'length', as if max_tokens had been reached; 0 = no limit (default: {limits.request_timeout:g})",
    )
    group.add_argument(
        "--queue-timeout",
        type=float,
        default=limits.queue_timeout,
        help="seconds a request may wait for the model before it starts: then HTTP 503 with Retry-After; "
        f"0 = no limit (default: {limits.queue_timeout:g})",
    )
    parser.set_defaults(func=cmd_serve)
