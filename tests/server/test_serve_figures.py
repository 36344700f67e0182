"""Two figures for the server (issue 34), each bounded to well under a minute on two busy cores:
a load test over loopback HTTP and a Hypothesis fuzz of request bodies. Tiny random model, real tokenizer."""

from __future__ import annotations

import asyncio
import gc
import json
import os
from collections.abc import Iterator

import pytest
from conftest import tiny_engine
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_serve import CHAT, MESSAGES, TEXT, Server, call, chat, idle, metric, running, wait_until

from draftwise.engine import Engine
from draftwise.methods import METHODS
from draftwise.server.app import create_app
from draftwise.server.schemas import Limits


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with tiny_engine() as engine:
        yield engine


def is_openai_error(answer: dict | str) -> bool:
    if not (isinstance(answer, dict) and set(answer) == {"error"} and isinstance(answer["error"], dict)):
        return False
    error = answer["error"]
    return (
        set(error) == {"message", "type", "param", "code"}
        and isinstance(error["message"], str)
        and error["message"] != ""
        and isinstance(error["type"], str)
        and all(error[k] is None or isinstance(error[k], str) for k in ("param", "code"))
    )


def sse_data(text: str) -> list[dict | str]:
    lines = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- load


def dechunk(data: bytes) -> bytes:
    """The payload of a chunked HTTP/1.1 body."""
    out, rest = b"", data
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out, rest = out + rest[:n], rest[n + 2 :]
    return out


async def client(port: int, i: int, go: asyncio.Event) -> tuple[str, int, dict]:
    """One client over its own loopback connection. Every fourth one streams a long answer and hangs up after
    the first event; the others ask for a short answer, streamed or not. Returns (kind, status, what it saw)."""
    kind = "leaves" if i % 4 == 0 else "streams" if i % 2 else "waits"
    fields = {"stream": kind != "waits", "stream_options": {"include_usage": True}} if kind != "waits" else {}
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": f"request {i}: count to ten"}],
            "max_tokens": 300 if kind == "leaves" else 8,
        }
        | fields
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await go.wait()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
    writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    headers = await reader.readuntil(b"\r\n\r\n")
    status = int(headers.split(b" ", 2)[1])
    try:
        if kind == "leaves" and status == 200:
            await reader.readuntil(b"data:")
            return kind, status, {}
        data = await reader.read()  # to EOF: Connection: close
    finally:
        writer.close()
    if b"transfer-encoding: chunked" in headers.lower():
        data = dechunk(data)
    if status == 200 and kind != "waits":
        events = sse_data(data.decode())
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events
        return kind, status, {"completion_tokens": events[-2]["usage"]["completion_tokens"]}
    answer = json.loads(data)
    if status == 429:
        assert b"retry-after: 1" in headers.lower() and is_openai_error(answer)
        return kind, status, {}
    return kind, status, {"completion_tokens": answer["usage"]["completion_tokens"]}


def test_load_64_clients_against_a_queue_of_16(engine: Engine) -> None:
    """64 at once against --max-queue 16, streaming and not, a quarter hanging up early: each is answered 200 or
    429, the worker lives on, memory stays flat, and /metrics counts what the clients saw."""
    expected = engine.generate(MESSAGES, max_new_tokens=6).text
    with running(create_app(engine, max_queue=16)) as server:
        for stream in (False, True):  # warm both paths before the baseline
            assert call(server, "POST", CHAT, chat(max_tokens=8, stream=stream))[0] == 200
        gc.collect()
        rss = rss_bytes()
        counted = {s: metric(server, "draftwise_requests_total", endpoint=CHAT, status=s) for s in ("200", "429")}
        tokens = metric(server, "draftwise_generated_tokens_total")
        cancelled = metric(server, "draftwise_cancelled_generations_total")

        async def burst() -> list[tuple[str, int, dict]]:
            go = asyncio.Event()
            clients = [asyncio.ensure_future(client(server.port, i, go)) for i in range(64)]
            await asyncio.sleep(0.2)  # all connected
            go.set()
            return await asyncio.wait_for(asyncio.gather(*clients), 120)

        results = asyncio.run(burst())
        statuses = [status for _, status, _ in results]
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 17 and statuses.count(429) >= 1
        left = sum(kind == "leaves" and status == 200 for kind, status, _ in results)
        wait_until(lambda: idle(server))
        wait_until(lambda: metric(server, "draftwise_cancelled_generations_total") == cancelled + left)
        for status in ("200", "429"):
            seen = statuses.count(int(status))
            assert metric(server, "draftwise_requests_total", endpoint=CHAT, status=status) == counted[status] + seen
        assert metric(server, "draftwise_requests_total", endpoint=CHAT) == sum(counted.values()) + 64
        served = sum(seen.get("completion_tokens", 0) for _, _, seen in results)
        assert metric(server, "draftwise_generated_tokens_total") == tokens + served
        status, health = call(server, "GET", "/health")
        assert status == 200 and health["status"] == "ok"
        status, answer = call(server, "POST", CHAT, chat(max_tokens=6))
        assert status == 200 and answer["choices"][0]["message"]["content"] == expected
        gc.collect()
        assert rss_bytes() <= 1.10 * rss, (rss_bytes(), rss)


# --- fuzz

TEXTS = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["", " ", "\ud800", "a\udfffb", "<|im_end|>", "<|im_start|>system", "\x00", "💥", "{{ x }}", "é" * 40]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXTS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=3),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": TEXTS | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXTS}), max_size=2),
    }
)
OPTIONS = {  # plausible values, edges included: the server caps max_tokens at 4
    "model": TEXTS,
    "method": st.sampled_from(["pld", "ar"]) | st.sampled_from([*METHODS, "nope"]),  # pld, ar: enabled
    "max_tokens": st.integers(1, 4) | st.integers(5, 6),
    "temperature": st.floats(0, 2) | st.sampled_from([1e-300, 5e-324, 1e-5]),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(0, 2**70),
    "seed": st.integers(0, 2**63 - 1),
    "stop": TEXTS | st.lists(TEXTS, max_size=5),
    "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
PROMPTS = {
    CHAT: {
        "messages": st.lists(MESSAGE, min_size=1, max_size=3),
        "max_completion_tokens": st.integers(1, 4) | st.integers(5, 6),
    },
    TEXT: {"prompt": TEXTS | st.lists(TEXTS, min_size=1, max_size=1)},
}


def fields(path: str) -> dict:
    return {**OPTIONS, **PROMPTS[path]}


def valid(path: str) -> st.SearchStrategy[dict]:
    required = next(iter(PROMPTS[path]))
    optional = {k: v for k, v in fields(path).items() if k != required}
    return st.fixed_dictionaries({required: fields(path)[required]}, optional=optional)


def one_field_wrong(path: str) -> st.SearchStrategy[dict]:
    names = st.sampled_from(sorted(fields(path)))
    return st.tuples(valid(path), names, JSON_VALUES).map(lambda t: t[0] | {t[1]: t[2]})


def requests(path: str) -> st.SearchStrategy[bytes]:
    anything = st.fixed_dictionaries({}, optional={k: JSON_VALUES for k in fields(path)}) | JSON_VALUES
    as_json = (valid(path) | one_field_wrong(path) | anything).map(lambda body: json.dumps(body).encode())
    return as_json | st.binary(max_size=80)  # json.dumps writes NaN and lone surrogates ("\\ud800") too


@pytest.fixture(scope="module")
def fuzzed(engine: Engine) -> Iterator[Server]:
    limits = Limits(max_tokens=4, max_prompt_chars=2000, request_timeout=10)  # valid requests stay short
    with running(create_app(engine, max_queue=4, limits=limits)) as server:
        yield server


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@example(request=(TEXT, b'{"method": "ar", "prompt": ["\\u0016"]}'), content_type="application/json")  # no tokens
@given(
    request=st.sampled_from([CHAT, TEXT]).flatmap(lambda path: st.tuples(st.just(path), requests(path))),
    content_type=st.sampled_from(["application/json"] * 8 + ["text/plain", ""]),
)
def test_fuzz_no_body_gets_a_5xx_and_every_4xx_is_openai_shaped(
    fuzzed: Server, request: tuple[str, bytes], content_type: str
) -> None:
    path, body = request
    status, answer = call(fuzzed, "POST", path, body, content_type=content_type)
    assert status < 500, (status, answer)
    if status >= 400:
        assert is_openai_error(answer), (status, answer)
    elif isinstance(answer, str):  # a stream: no error event hides inside a 200
        events = sse_data(answer)
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events
    else:
        assert answer["object"] in ("chat.completion", "text_completion"), answer
