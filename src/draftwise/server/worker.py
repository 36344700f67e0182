"""The one thread that owns the engine (model, tokenizer, KV cache): generations run one at a time, in arrival
order, so they never interleave and the event loop never waits on torch."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError  # torch requires jinja2; chat templates are jinja

from draftwise.core.errors import DraftwiseError
from draftwise.engine import Engine, Prompt
from draftwise.server.metrics import Metrics
from draftwise.server.schemas import APIError

log = logging.getLogger(__name__)


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
