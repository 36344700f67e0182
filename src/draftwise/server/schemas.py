"""What the server reads and writes, in OpenAI's shapes: requests, responses (whole or in chunks) and errors, so
OpenAI clients work unchanged and raise their usual exceptions."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from draftwise.core.decode import GenerationStats
from draftwise.core.errors import DraftwiseError
from draftwise.engine import Generation
from draftwise.methods import METHODS

DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_STOP_CHARS = 256  # the held-back stop prefix is searched every round: bound the work a request can ask for
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}  # draftwise's -> OpenAI's


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


# --- limits


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
