"""What the server reads and writes, in OpenAI's shapes: requests, responses (whole or in chunks) and errors, so
OpenAI clients work unchanged and raise their usual exceptions."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from draftwise.core.decode import GenerationStats
from draftwise.engine import Generation
from draftwise.methods import METHODS

DEFAULT_MAX_TOKENS = 256
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
