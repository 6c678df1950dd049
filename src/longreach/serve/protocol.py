"""OpenAI request bodies (validated) and response shapes.

Fields that would change the answer but are not implemented (``n > 1``, logprobs, penalties, tools, ...) are
refused with a 400 that names them, never ignored; fields that change nothing (``user``, ...) are accepted.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .engine import Sampling

DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    """An answer with an HTTP status and an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    method: str | None = None  # a longreach spec for this request (default: the server's --method)
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    best_of: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty stop strings")
        return v

    def check_supported(self) -> None:
        for name, plain in (("n", 1), ("best_of", 1), ("presence_penalty", 0), ("frequency_penalty", 0)):
            if getattr(self, name) not in (None, plain):
                raise APIError(400, f"{name} other than {plain} is not supported by this server", param=name,
                               code="unsupported_parameter")
        for name in ("logit_bias", "logprobs", "top_logprobs", "tools", "functions", "tool_choice", "suffix"):
            if getattr(self, name, None):
                raise APIError(400, f"{name} is not supported by this server; leave it out", param=name,
                               code="unsupported_parameter")
        fmt = getattr(self, "response_format", None)
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            raise APIError(400, "response_format other than text is not supported by this server",
                           param="response_format", code="unsupported_parameter")
        if getattr(self, "echo", False):
            raise APIError(400, "echo is not supported by this server; leave it out", param="echo",
                           code="unsupported_parameter")

    def sampling(self, max_tokens: int | None) -> Sampling:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(max_tokens or DEFAULT_MAX_TOKENS, 1.0 if self.temperature is None else self.temperature,
                        1.0 if self.top_p is None else self.top_p, self.seed, stops)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def sampling(self, max_tokens: int | None = None) -> Sampling:  # type: ignore[override]
        return super().sampling(self.max_completion_tokens or self.max_tokens)


class CompletionRequest(Common):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("give one prompt (a string); batches of prompts are not supported")
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def sampling(self, max_tokens: int | None = None) -> Sampling:  # type: ignore[override]
        return super().sampling(self.max_tokens)


def parse(model: type[BaseModel], body: object) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{where}: {msg}" if where else msg, param=where,
                       code="missing_field" if first["type"] == "missing" else "invalid_value") from None
    req.check_supported()  # type: ignore[attr-defined]
    return req


# -- responses ---------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(rid: str, model: str, text: str, finish: str, usage: dict, info: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}], "usage": usage, "longreach": info}


def completion_response(rid: str, model: str, text: str, finish: str, usage: dict, info: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage,
            "longreach": info}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_chunk(rid: str, model: str, text: str, finish: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def usage_chunk(rid: str, model: str, obj: str, usage: dict, info: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage,
            "longreach": info}
