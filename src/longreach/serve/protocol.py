"""OpenAI request bodies (validated) and response shapes.

Nothing a client sends is silently ignored. Fields this server implements are used; fields that change nothing
here (``user``, ``metadata``, ``store``, ...) are accepted; fields that OpenAI defines but this server does
not implement (``n > 1``, logprobs, penalties, tools, ...) are accepted only at the value that changes nothing
and refused with a 400 naming them otherwise; and any other field (a typo such as ``max_token``, or another
server's extension such as ``top_k``) is refused with a 400 naming it. A client that asked for something gets
it or an error, never an answer that quietly lacks it.
"""

from __future__ import annotations

import difflib
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .engine import DEFAULT_MAX_TOKENS, Sampling


class APIError(Exception):
    """An answer with an HTTP status and an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    """Every request model: exact JSON types, and an unknown field is an error (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI pads chunks against side channels; nothing to pad here


# Fields OpenAI defines that this server does not implement, with the values at which they change nothing:
# those are accepted (clients often send defaults explicitly), any other value is refused.
NO_OP_VALUES: dict[str, tuple[object, ...]] = {
    "n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
    "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "suffix": ("",), "tools": ([],),
    "functions": ([],), "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},), "modalities": (["text"],),
}


def _same(value: object, plain: object) -> bool:
    """Equal, and not a bool standing for a number (``logprobs: 0`` asks for something; ``false`` does not)."""
    return value == plain and isinstance(value, bool) == isinstance(plain, bool)


class Common(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    method: str | None = None  # a longreach spec for this request (default: the server's --method)
    # Accepted because they change nothing here: OpenAI's bookkeeping, routing and caching hints.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Not implemented: accepted only at their NO_OP_VALUES (check_supported).
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty stop strings")
        return v

    def check_supported(self) -> None:
        """A 400 for the first unimplemented field set to a value that would change the answer."""
        for name, plain in NO_OP_VALUES.items():
            value = getattr(self, name, None)
            if value is not None and not any(_same(value, ok) for ok in plain):
                allowed = " or ".join(repr(ok) for ok in plain)
                raise APIError(400, f"{name}={value!r} is not supported by this server (it accepts {name} only "
                                    f"as {allowed}, which changes nothing); leave it out", param=name,
                               code="unsupported_parameter")

    def asked_max_tokens(self) -> tuple[int | None, str]:
        """The answer's length the client asked for (None: the default), and the field it used."""
        return self.max_tokens, "max_tokens"

    def sampling(self, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Sampling:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        asked, _ = self.asked_max_tokens()
        return Sampling(asked or default_max_tokens, 1.0 if self.temperature is None else self.temperature,
                        1.0 if self.top_p is None else self.top_p, self.seed, stops)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    functions: list | None = None
    tool_choice: str | dict | None = None
    function_call: str | dict | None = None
    parallel_tool_calls: bool | None = None  # changes nothing without tools (which are refused)
    response_format: dict | None = None
    modalities: list[str] | None = None

    def asked_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(Common):
    prompt: str | list[str]
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("give one prompt (a string); batches of prompts are not supported")
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def unknown_field(model: type[BaseModel], loc: tuple) -> APIError:
    """The 400 for a field this server does not know, with the nearest known name when there is one."""
    where = ".".join(str(p) for p in loc)
    hint = ""
    if len(loc) == 1:
        near = difflib.get_close_matches(str(loc[0]), list(model.model_fields), n=1, cutoff=0.75)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
    return APIError(400, f"unknown field '{where}'{hint}: this server does not implement it, and refuses it "
                         "rather than ignore it; remove it", param=where, code="unknown_parameter")


def parse(model: type[BaseModel], body: object) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            raise unknown_field(model, tuple(first["loc"])) from None
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
