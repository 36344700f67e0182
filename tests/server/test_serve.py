"""The HTTP server, driven by the official `openai` client and by raw HTTP, on 127.0.0.1 only.

A tiny random-init llama (with the real SmolLM2 tokenizer) keeps generation fast; the server must return
exactly what `Engine.generate` returns, stay up under bad input and load, and stop work nobody waits for.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import openai
import pytest
import torch
import uvicorn
from conftest import (
    tiny_engine,
)
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from draftwise.cli import build_parser, main
from draftwise.core.errors import DraftwiseError
from draftwise.engine import Engine
from draftwise.server.app import create_app, finished, listen
from draftwise.server.metrics import Metrics
from draftwise.server.schemas import APIError
from draftwise.server.worker import Job, Worker
from draftwise.targets.models import resolve_model

MAX_QUEUE = 3
MESSAGES = [{"role": "user", "content": "List the days of the week, then list them again."}]


@dataclass
class Server:
    port: int
    uvicorn: uvicorn.Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@contextmanager
def running(app) -> Iterator[Server]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port, in a thread, for the duration of the block."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Server(sock.getsockname()[1], server, thread)
    finally:
        server.should_exit = True
        thread.join(30)


def call(
    server: Server,
    method: str,
    path: str,
    body: dict | bytes | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, dict | str]:
    """One raw HTTP request; JSON answers come back parsed."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": content_type, **(headers or {})})
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, json.loads(raw) if is_json else raw


def metric(server: Server, name: str, **labels: str) -> float:
    _, text = call(server, "GET", "/metrics")
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def idle(server: Server) -> bool:
    status, health = call(server, "GET", "/health")
    return status == 200 and health["queue_length"] == 0 and not health["busy"]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with tiny_engine() as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[Server]:
    with running(create_app(engine, max_queue=MAX_QUEUE)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def test_chat_greedy_equals_engine_generate(client: openai.OpenAI, engine: Engine) -> None:
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    expected = engine.generate(MESSAGES, max_new_tokens=12)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length"
    assert response.model == "tiny" and response.object == "chat.completion"
    assert response.usage.prompt_tokens == expected.stats.prompt_tokens
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == expected.stats.prompt_tokens + 12
    stats = response.model_extra["draftwise"]
    assert stats["method"] == "pld" and stats["new_tokens"] == 12 and stats["mean_accepted"] >= 1


def test_chat_stream_equals_engine_generate(client: openai.OpenAI, engine: Engine) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    expected = engine.generate(MESSAGES, max_new_tokens=12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    last, usage = chunks[-2], chunks[-1]
    assert last.choices[0].finish_reason == "length" and last.model_extra["draftwise"]["new_tokens"] == 12
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_completions_use_the_raw_prompt(client: openai.OpenAI, engine: Engine, stream: bool) -> None:
    prompt = "one two three one two three one two"
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, stream=stream)
    text = "".join(c.choices[0].text for c in response) if stream else response.choices[0].text
    assert text == engine.generate(prompt, max_new_tokens=10, chat_template=False).text


def test_every_method_gives_the_same_greedy_text(client: openai.OpenAI) -> None:
    texts = {}
    for method in ("ar", "pld"):
        response = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=10, extra_body={"method": method}
        )
        assert response.model_extra["draftwise"]["method"] == method
        texts[method] = response.choices[0].message.content
    assert texts["ar"] == texts["pld"]


def test_sampling_is_reproducible_with_a_seed(client: openai.OpenAI, engine: Engine) -> None:
    options = dict(temperature=1.0, top_p=0.9, seed=1234)
    texts = [
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=8, extra_body={"top_k": 50}, **options
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    expected = engine.generate(MESSAGES, max_new_tokens=8, top_k=50, **options).text
    assert texts == [expected, expected]


def test_stop_as_string_and_list(client: openai.OpenAI, engine: Engine) -> None:
    prompt = "Once upon a time"
    stop = engine.generate(prompt, max_new_tokens=16, chat_template=False).text.split()[2]
    expected = engine.generate(prompt, max_new_tokens=16, chat_template=False, stop=[stop]).text
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, stop=stop).choices[0]
    assert whole.text == expected and whole.finish_reason == "stop" and stop not in whole.text
    chunks = list(
        client.completions.create(model="tiny", prompt=prompt, max_tokens=16, stop=[stop, "\x00"], stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_health_and_metrics(client: openai.OpenAI, server: Server) -> None:
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    assert [m.id for m in client.models.list()] == ["tiny"]
    status, health = call(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny"
    assert metric(server, "draftwise_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    assert metric(server, "draftwise_generated_tokens_total") > 0
    assert metric(server, "draftwise_tokens_per_second") > 0
    assert metric(server, "draftwise_mean_accepted_length") >= 1
    assert metric(server, "draftwise_draft_calls_per_round") >= 0
    assert metric(server, "draftwise_queue_length") == 0


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": 2} | fields


CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
BAD_REQUESTS = [
    pytest.param(CHAT, b'{"messages": [', 400, None, "not valid JSON", id="malformed-json"),
    pytest.param(CHAT, b"[1, 2]", 422, None, "request body", id="not-an-object"),
    pytest.param(CHAT, chat(method="nope"), 400, "method", "unknown method 'nope'", id="unknown-method"),
    pytest.param(CHAT, chat(temperature=2.5), 422, "temperature", "less than or equal", id="temperature"),
    pytest.param(CHAT, chat(temperature=-0.1), 422, "temperature", "greater than", id="negative-temperature"),
    pytest.param(CHAT, chat(top_p=0), 422, "top_p", "greater than 0", id="top-p"),
    pytest.param(CHAT, chat(top_k=-1), 422, "top_k", "greater than", id="top-k"),
    pytest.param(CHAT, chat(max_tokens=0), 422, "max_tokens", "greater than", id="max-tokens"),
    pytest.param(CHAT, chat(max_tokens="many"), 422, "max_tokens", "integer", id="max-tokens-type"),
    pytest.param(CHAT, chat(seed=-1), 422, "seed", "greater than", id="seed"),
    pytest.param(CHAT, chat(n=2), 422, "n", "less than or equal to 1", id="n"),
    pytest.param(CHAT, chat(stop=7), 422, "stop", "stop", id="stop-type"),
    pytest.param(CHAT, {"model": "tiny"}, 422, "messages", "Field required", id="no-messages"),
    pytest.param(CHAT, chat(messages=[]), 422, "messages", "at least 1", id="empty-message-list"),
    pytest.param(
        CHAT, chat(messages=[{"role": "user", "content": "  "}]), 400, None, "messages are empty", id="blank-messages"
    ),
    pytest.param(
        CHAT, chat(messages=[{"role": "robot", "content": "hi"}]), 422, "messages", "messages.0.role", id="bad-role"
    ),
    pytest.param(
        CHAT,
        chat(messages=[{"role": "user", "content": "word " * 600}]),
        400,
        None,
        "context window",
        id="chat-too-long",
    ),
    pytest.param(TEXT, {"prompt": "x " * 600}, 400, None, "context window", id="prompt-too-long"),
    pytest.param(TEXT, {"prompt": ""}, 400, None, "prompt is empty", id="empty-prompt"),
    pytest.param(TEXT, {"prompt": ["a", "b"]}, 422, "prompt", "prompt", id="several-prompts"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "fragment"), BAD_REQUESTS)
def test_bad_requests_get_openai_style_errors(
    server: Server, path: str, body, status: int, param: str | None, fragment: str
) -> None:
    got, answer = call(server, "POST", path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"]
    assert call(server, "GET", "/health")[0] == 200


def test_unknown_paths_and_http_methods_get_openai_style_errors(server: Server) -> None:
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", CHAT, 405)]:
        got, answer = call(server, method, path)
        assert got == status and answer["error"]["message"]


def test_a_body_not_sent_as_json_is_explained(server: Server) -> None:
    got, answer = call(server, "POST", CHAT, chat(), content_type="application/x-www-form-urlencoded")
    assert got == 400 and "Content-Type: application/json" in answer["error"]["message"]


def test_openai_client_raises_its_usual_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"method": "nope"})
    assert bad.value.param == "method"
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.chat.completions.create(model="tiny", messages=MESSAGES, top_p=1.5, stream=True)
    assert invalid.value.param == "top_p"


def test_client_disconnect_cancels_the_generation(server: Server, client: openai.OpenAI, engine: Engine) -> None:
    cancelled = metric(server, "draftwise_cancelled_generations_total")
    body = json.dumps(chat(max_tokens=500, stream=True)).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data:") < 3:  # the role chunk and two pieces of text
            received += sock.recv(65536)
    wait_until(lambda: metric(server, "draftwise_cancelled_generations_total") == cancelled + 1)
    wait_until(lambda: idle(server))
    # the next generation starts from a clean slate
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
    assert response.choices[0].message.content == engine.generate(MESSAGES, max_new_tokens=6).text


def test_worker_is_first_come_first_served(engine: Engine) -> None:
    async def run() -> list[int]:
        worker = Worker(engine, max_queue=3, metrics=Metrics())
        loop = asyncio.get_running_loop()
        jobs = [Job(f"request {i}", {"max_new_tokens": 3}, loop) for i in range(3)]
        for job in jobs:
            worker.submit(job)
        with pytest.raises(APIError) as full:
            worker.submit(Job("one too many", {}, loop))
        assert full.value.status == 429 and worker.queue_length == 3
        worker.cancel(jobs[1])  # a client that leaves while queued gives its place up
        assert worker.queue_length == 2
        order: list[int] = []

        async def wait_for(i: int) -> None:
            await finished(jobs[i])
            order.append(i)

        worker.start()
        await asyncio.gather(wait_for(2), wait_for(0))
        await asyncio.to_thread(worker.close)
        assert jobs[1].events.empty()
        return order

    assert asyncio.run(run()) == [0, 2]


def test_load_every_request_is_answered_200_or_429(server: Server) -> None:
    """50 at once against a queue of 3: the overflow is refused at once, the rest is served, none is lost."""
    refused = metric(server, "draftwise_requests_total", endpoint=CHAT, status="429")

    async def one(client: openai.AsyncOpenAI, i: int) -> int:
        try:
            await client.chat.completions.create(
                model="tiny", max_tokens=4, messages=[{"role": "user", "content": f"request {i}"}]
            )
            return 200
        except openai.RateLimitError as exc:
            assert exc.code == "queue_full" and exc.response.headers["Retry-After"] == "1"
            return 429

    async def burst() -> list[int]:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    statuses = asyncio.run(burst())
    assert len(statuses) == 50 and set(statuses) == {200, 429}
    assert statuses.count(200) >= MAX_QUEUE
    refused_now = metric(server, "draftwise_requests_total", endpoint=CHAT, status="429")
    assert refused_now == refused + statuses.count(429)
    wait_until(lambda: idle(server))


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_shutdown_finishes_the_stream_in_flight(engine: Engine) -> None:
    expected = engine.generate(MESSAGES, max_new_tokens=40).text
    workers = sum(t.name == "draftwise-worker" for t in threading.enumerate())
    with running(create_app(engine, max_queue=2)) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        chunks = iter(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40, stream=True))
        first = next(chunks)
        server.uvicorn.should_exit = True
        wait_until(lambda: refuses_connections(server.port))  # shutting down, with our stream still open
        rest = list(chunks)
    assert not server.thread.is_alive()
    assert sum(t.name == "draftwise-worker" for t in threading.enumerate()) == workers
    assert "".join(c.choices[0].delta.content or "" for c in [first, *rest]) == expected
    assert rest[-1].choices[0].finish_reason == "length"


def test_serve_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["serve", "--port", "0", "--max-queue", "2", "--method", "ar"])
    assert (args.host, args.port, args.max_queue, args.method) == ("127.0.0.1", 0, 2, "ar")
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a busy port fails at once, before the model loads
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    assert main(["serve", "--max-queue", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith("error: cannot listen on 127.0.0.1:") and errors[1].startswith("error: --max-queue")


@pytest.mark.real_model
def test_real_model_greedy_equals_engine_generate() -> None:
    engine = Engine.load(dtype="fp32", engine="hf")  # exact: its answers must match generate token for token
    with running(create_app(engine)) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        response = client.chat.completions.create(model=engine.model_name, messages=MESSAGES, max_tokens=24)
    assert response.choices[0].message.content == engine.generate(MESSAGES, max_new_tokens=24).text
    assert response.model_extra["draftwise"]["mean_accepted"] >= 1


def test_a_loader_runs_on_the_worker_thread_and_its_errors_reach_the_caller(engine: Engine) -> None:
    """`draftwise serve` loads the engine on the worker thread, so all torch work stays on one OpenMP team."""
    loaded_on: list[str] = []

    def load() -> Engine:
        loaded_on.append(threading.current_thread().name)
        return engine

    with running(create_app(load)) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
        assert response.choices[0].message.content == engine.generate(MESSAGES, max_new_tokens=6).text
    assert loaded_on == ["draftwise-worker"]

    def broken() -> Engine:
        raise DraftwiseError("no model here")

    with pytest.raises(DraftwiseError, match="no model here"):
        create_app(broken)


def test_generating_on_another_thread_than_the_load_warns_once(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slowdown `serve` avoids by loading on its worker thread is pointed out to API users who hit it."""
    monkeypatch.setattr(engine, "_thread", -1)  # as if loaded on another thread
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.warns(RuntimeWarning, match="loaded on another thread"):
        engine.generate("hi", max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.generate("hi", max_new_tokens=2)  # once only


@pytest.mark.parametrize("seed", range(3))
def test_text_stream_decodes_incrementally_to_the_full_text(seed):
    """Rounds of 1-5 tokens through TextStream's incremental decoding give, piece by piece, the full decode of the
    tokens, multi-byte characters split across rounds included; a stop string cuts the text where it starts."""
    from draftwise.core.decode import GenerationStats
    from draftwise.engine import TextStream

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    text = "Grüße, 東京! def f(x):\n    return x ** 2  # ✓ naïve café 🚀🚀 ünïcödé\n" * 3
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = torch.Generator().manual_seed(seed)
    cuts = torch.cumsum(torch.randint(1, 6, (len(ids),), generator=rng), 0).tolist()
    chunks = [ids[a:b] for a, b in zip([0, *cuts], cuts, strict=False) if a < len(ids)]
    engine = type("E", (), {"tokenizer": tokenizer})()
    stream = TextStream(engine, (c for c in chunks), GenerationStats("x"), [])
    assert "".join(stream) == tokenizer.decode(ids, skip_special_tokens=True) == stream.generation.text
    stopped = TextStream(engine, (c for c in chunks), GenerationStats("x"), ["café"])
    assert "".join(stopped) == stopped.generation.text == text[: text.index("café")]
