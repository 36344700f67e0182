"""The server against hostile or unlucky clients (issue 34, items 8-10): API keys, limits on what one request may
ask, and faults that must end one request cleanly and leave the server serving. Loopback only, tiny random model."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import openai
import pytest
from conftest import tiny_engine
from test_serve import CHAT, MESSAGES, TEXT, Server, call, chat, idle, metric, running, wait_until

from draftwise.cli import main
from draftwise.cli import serve as serve_command
from draftwise.core.errors import DraftwiseError
from draftwise.engine import Engine
from draftwise.server import app as server_app
from draftwise.server.app import create_app
from draftwise.server.schemas import DEFAULT_MAX_TOKENS, APIError, Limits

KEY = "sk-draftwise-test-key"
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with tiny_engine() as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[Server]:
    limits = Limits(max_body_bytes=4000, max_prompt_chars=300, max_tokens=16)
    with running(create_app(engine, max_queue=2, limits=limits)) as server:
        yield server


def assert_openai_error(answer: dict | str, status: int, param: str | None = None, code: str | None = None) -> str:
    """`answer` is an error in OpenAI's shape; returns its message."""
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], answer
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error"), answer
    assert (error["param"], error["code"]) == (param, code), answer
    return error["message"]


def sse_data(text: str) -> list[dict | str]:
    """The `data:` payloads of an event stream, JSON parsed ("[DONE]" stays a string)."""
    lines = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


# --- item 8: authentication


def test_an_api_key_guards_every_endpoint_but_health(engine: Engine) -> None:
    with running(create_app(engine, max_queue=2, api_key=KEY)) as server:
        assert call(server, "GET", "/health")[0] == 200
        wrong = [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": f"Basic {KEY}"},
            {"Authorization": f"Bearer {KEY}x"},
            {"Authorization": f"Bearer {KEY[:-1]}"},
        ]
        requests = [
            ("POST", CHAT, chat()),
            ("POST", TEXT, {"prompt": "hi", "max_tokens": 2}),
            ("GET", "/v1/models", None),
            ("GET", "/metrics", None),
            ("GET", "/docs", None),
            ("GET", "/v1/nothing", None),
        ]
        for method, path, body in requests:
            for headers in wrong:
                status, answer = call(server, method, path, body, headers=headers)
                assert status == 401, (path, headers)
                assert_openai_error(answer, 401, code="invalid_api_key")
                assert KEY not in json.dumps(answer)
        assert call(server, "GET", "/metrics", headers=BEARER)[0] == 200
        assert call(server, "GET", "/v1/models", headers={"Authorization": f"bearer {KEY}"})[0] == 200
        assert call(server, "POST", CHAT, chat(), headers=BEARER)[0] == 200

        client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
        assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices
        stranger = openai.OpenAI(base_url=server.url, api_key="guess", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()


def test_serve_takes_the_key_from_the_flag_or_the_environment_and_warns_when_exposed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked up to the model load (`create_app`), which is replaced by a stub that records what it got."""
    got: list[dict] = []

    def stub(loader, **kwargs):
        got.append(kwargs)
        raise DraftwiseError("stub: no model loaded")

    monkeypatch.setattr(server_app, "create_app", stub)
    monkeypatch.delenv("DRAFTWISE_API_KEY", raising=False)
    assert main(["serve", "--port", "0", "--api-key", "flag-key"]) == 2
    monkeypatch.setenv("DRAFTWISE_API_KEY", "env-key")
    assert main(["serve", "--port", "0"]) == 2
    assert main(["serve", "--port", "0", "--api-key", "flag-key"]) == 2
    assert [g["api_key"] for g in got] == ["flag-key", "env-key", "flag-key"]
    assert "warning" not in capsys.readouterr().err  # loopback, or a key

    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2  # a key from the environment: no warning
    assert "warning" not in capsys.readouterr().err
    monkeypatch.delenv("DRAFTWISE_API_KEY")
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0 without an API key" in err and "DRAFTWISE_API_KEY" in err
    assert got[-1]["api_key"] is None
    assert main(["serve", "--port", "0", "--api-key", " "]) == 2
    assert "API key must not be empty" in capsys.readouterr().err


# --- item 9: limits


def test_a_body_over_the_limit_is_413_declared_or_chunked(server: Server) -> None:
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 5000}])).encode()
    status, answer = call(server, "POST", CHAT, big)
    assert status == 413 and "4000 bytes" in assert_openai_error(answer, 413)
    # chunked: no Content-Length to refuse it on, so it is cut off once 4000 bytes have arrived
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(big[i : i + 1000]), big[i : i + 1000]) for i in range(0, len(big), 1000)
        )
        sock.sendall(head.encode() + chunks + b"0\r\n\r\n")
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            raw += sock.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert "4000 bytes" in assert_openai_error(json.loads(body[body.index(b"{") : body.rindex(b"}") + 1]), 413)
    assert call(server, "POST", CHAT, chat())[0] == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, chat(messages=[{"role": "user", "content": "y" * 301}]), "messages"),
        (
            CHAT,
            chat(messages=[{"role": "system", "content": "y" * 200}, {"role": "user", "content": "y" * 101}]),
            "messages",
        ),
        (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "y" * 301}]}]), "messages"),
        (TEXT, {"prompt": "z" * 301, "max_tokens": 2}, "prompt"),
    ],
)
def test_a_prompt_over_the_character_limit_is_refused_before_tokenising(
    server: Server, engine: Engine, monkeypatch: pytest.MonkeyPatch, path: str, body: dict, param: str
) -> None:
    monkeypatch.setattr(engine, "encode", lambda *a, **k: pytest.fail("tokenised"))
    status, answer = call(server, "POST", path, body)
    assert status == 400
    assert "301 characters" in assert_openai_error(answer, 400, param, "context_length_exceeded")


@pytest.mark.parametrize(
    ("stop", "fragment"),
    [(["a", "b", "c", "d", "e"], "at most 4"), ("s" * 257, "at most 256"), (["ok", "s" * 257], "at most 256")],
)
def test_stop_lists_are_bounded_like_openai(server: Server, stop, fragment: str) -> None:
    status, answer = call(server, "POST", CHAT, chat(stop=stop))
    assert status == 422 and fragment in assert_openai_error(answer, 422, "stop")
    assert call(server, "POST", CHAT, chat(stop=["a", "b", "c", "d"]))[0] == 200


def test_the_server_caps_max_tokens_with_a_400(server: Server) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        status, answer = call(server, "POST", CHAT, {"messages": MESSAGES, name: 17})
        assert status == 400 and "at most 16" in assert_openai_error(answer, 400, name)
    status, answer = call(server, "POST", CHAT, {"messages": MESSAGES})  # none asked: min(256, the cap)
    assert status == 200 and answer["usage"]["completion_tokens"] == 16
    assert call(server, "POST", TEXT, {"prompt": "hi", "max_tokens": 16})[0] == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_past_the_request_timeout_ends_with_length(engine: Engine, stream: bool) -> None:
    full = engine.generate(MESSAGES, max_new_tokens=300).text
    with running(create_app(engine, limits=Limits(request_timeout=0.05))) as server:
        status, answer = call(server, "POST", CHAT, chat(max_tokens=300, stream=stream))
        assert status == 200
        if stream:
            events = sse_data(answer)
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
            new_tokens = events[-2]["draftwise"]["new_tokens"]
        else:
            assert answer["choices"][0]["finish_reason"] == "length"
            text, new_tokens = answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]
        assert 0 < new_tokens < 300 and full.startswith(text) and len(text) < len(full)
        assert metric(server, "draftwise_timed_out_generations_total") == 1
        wait_until(lambda: idle(server))


def test_a_request_that_waits_past_the_queue_timeout_gets_503_and_retry_after(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, stream = threading.Event(), engine.stream

    def gated(*args, **kwargs):  # holds the worker on the first request, before the engine has started it
        assert gate.wait(30)
        return stream(*args, **kwargs)

    monkeypatch.setattr(engine, "stream", gated)
    with running(create_app(engine, limits=Limits(queue_timeout=0.3))) as server:
        first: list = []
        thread = threading.Thread(target=lambda: first.append(call(server, "POST", CHAT, chat())))
        thread.start()
        wait_until(lambda: call(server, "GET", "/health")[1]["busy"])
        conn_start = time.monotonic()
        status, answer = call(server, "POST", CHAT, chat())
        waited = time.monotonic() - conn_start
        assert status == 503 and 0.3 <= waited < 5
        assert "waited 0.3 s" in assert_openai_error(answer, 503, code="queue_timeout")
        gate.set()
        thread.join(30)
        assert first[0][0] == 200  # the running request is not timed out by the queue deadline
        assert metric(server, "draftwise_requests_total", endpoint=CHAT, status="503") == 1
        assert call(server, "GET", "/health")[1]["queue_length"] == 0


def test_a_503_carries_retry_after() -> None:
    response = APIError(503, "busy", "server_error", code="queue_timeout").response()
    assert response.headers["Retry-After"] == "1"


def test_methods_are_limited_to_the_allow_list(engine: Engine, server: Server) -> None:
    """Default: the server's method (pld) and ar. draft-model would load a second full model."""
    assert call(server, "POST", CHAT, chat(method="ar"))[0] == 200
    for method in ("draft-model", "eagle", "rest"):
        status, answer = call(server, "POST", CHAT, chat(method=method))
        assert status == 400 and "not enabled" in assert_openai_error(answer, 400, "method")
    with running(create_app(engine, limits=Limits(allowed_methods=frozenset({"rest"})))) as narrow:
        assert call(narrow, "POST", CHAT, chat(method="pld"))[0] == 200  # the server's own: always
        status, answer = call(narrow, "POST", CHAT, chat(method="ar"))
        assert status == 400 and "enabled: pld, rest" in assert_openai_error(answer, 400, "method")
    with pytest.raises(DraftwiseError, match="unknown method"):
        create_app(engine, limits=Limits(allowed_methods=frozenset({"nope"})))


def test_serve_flags_become_limits(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    got: list[dict] = []

    def stub(loader, **kwargs):
        got.append(kwargs)
        raise DraftwiseError("stub: no model loaded")

    monkeypatch.setattr(server_app, "create_app", stub)
    flags = "--max-body-bytes 1000 --max-prompt-chars 50 --max-tokens 8 --request-timeout 0 --queue-timeout 2.5"
    assert main(["serve", "--port", "0", *flags.split(), "--allowed-methods", "ar,rest"]) == 2
    assert got[0]["limits"] == Limits(1000, 50, 8, None, 2.5, frozenset({"ar", "rest"}))
    assert main(["serve", "--port", "0"]) == 2
    assert got[1]["limits"] == Limits()  # cli/serve.py repeats Limits' defaults: they must agree
    assert serve_command.DEFAULT_MAX_TOKENS == DEFAULT_MAX_TOKENS
    for bad, message in [
        ("--allowed-methods ar,nope", "unknown method(s) nope"),
        ("--max-tokens 0", "--max-tokens must be >= 1"),
        ("--request-timeout -1", "--request-timeout must be >= 0"),
        ("--max-body-bytes 0", "--max-body-bytes must be >= 1"),
    ]:
        assert main(["serve", "--port", "0", *bad.split()]) == 2
        assert message in capsys.readouterr().err
    assert len(got) == 2  # refused before the model load


# --- item 10: faults


@pytest.mark.parametrize("stream", [True, False])
def test_the_engine_failing_mid_generation_ends_that_request_and_the_next_works(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    expected = engine.generate(MESSAGES, max_new_tokens=6).text
    calls, forward_tree = [], engine.target.forward_tree

    def failing(tree):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("secret internal detail at /opt/draftwise/x.py")
        return forward_tree(tree)

    with running(create_app(engine)) as server:
        monkeypatch.setattr(engine.target, "forward_tree", failing)
        status, answer = call(server, "POST", CHAT, chat(max_tokens=40, stream=stream))
        monkeypatch.undo()
        if stream:
            events = sse_data(answer)
            assert status == 200 and events[-1] == "[DONE]"
            assert any(e["choices"][0]["delta"].get("content") for e in events[1:-2])  # text came first
            message = assert_openai_error(events[-2], 500)
        else:
            assert status == 500
            message = assert_openai_error(answer, 500)
        assert "secret" not in message and "internal error" in message
        wait_until(lambda: idle(server))
        status, answer = call(server, "POST", CHAT, chat(max_tokens=6))
        assert status == 200 and answer["choices"][0]["message"]["content"] == expected


class WorkerKiller(BaseException):
    """Not an Exception: nothing on the way catches it, as with a SystemExit raised in the engine."""


def test_a_dead_worker_fails_its_requests_and_health_says_503(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def killer(*args, **kwargs):
        raise WorkerKiller

    with running(create_app(engine)) as server:
        assert call(server, "GET", "/health")[0] == 200
        monkeypatch.setattr(engine, "stream", killer)
        status, answer = call(server, "POST", CHAT, chat(), timeout=10)
        assert status == 503 and "worker has stopped" in assert_openai_error(answer, 503)
        status, health = call(server, "GET", "/health")
        assert status == 503 and health["status"] == "worker stopped"
        status, answer = call(server, "POST", CHAT, chat(), timeout=10)  # refused at once, not queued forever
        assert status == 503 and "worker has stopped" in assert_openai_error(answer, 503)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, chat(messages=[{"role": "user", "content": "hi \ud800"}]), "messages"),
        (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), "messages"),
        (TEXT, {"prompt": "a\udc00b", "max_tokens": 2}, "prompt"),
        (CHAT, chat(stop=["\ud83d"]), "stop"),
    ],
)
def test_lone_surrogates_are_400_not_500(server: Server, path: str, body: dict, param: str) -> None:
    status, answer = call(server, "POST", path, body)  # json.dumps escapes them: "\\ud800"
    assert status == 400 and "lone UTF-16 surrogate" in assert_openai_error(answer, 400, param)


def test_a_prompt_the_tokenizer_drops_entirely_is_400(server: Server) -> None:
    """Found by the fuzz test: SmolLM2's byte-level vocabulary has no token for "\\x16", so this prompt has no
    tokens, and generation indexed an empty tensor (500)."""
    for body in ({"prompt": "\x16", "max_tokens": 2}, {"prompt": ["\x04\x16"], "max_tokens": 2, "stream": True}):
        status, answer = call(server, "POST", TEXT, body)
        assert status == 400 and "no tokens" in assert_openai_error(answer, 400)


def test_error_messages_quoting_a_surrogate_still_render(server: Server) -> None:
    status, answer = call(server, "POST", CHAT, chat(method="\ud800"))
    assert status == 400 and "unknown method '\ud800'" in assert_openai_error(answer, 400, "method")


def test_chat_template_errors_are_400_with_the_templates_message(
    server: Server, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        engine.tokenizer, "chat_template", "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    )
    status, answer = call(server, "POST", CHAT, chat())
    assert status == 400
    assert assert_openai_error(answer, 400) == (
        "the model's chat template rejected the messages: Conversation roles must alternate user/assistant"
    )
    monkeypatch.setattr(engine.tokenizer, "chat_template", "{% if %}")  # the server's fault: 500, no details
    status, answer = call(server, "POST", CHAT, chat())
    assert status == 500 and assert_openai_error(answer, 500) == "the model's chat template is broken"
    monkeypatch.undo()
    assert call(server, "POST", CHAT, chat())[0] == 200
