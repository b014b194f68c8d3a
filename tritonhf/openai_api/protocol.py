"""The OpenAI API's requests as this server reads them, and its errors: no Triton, no HTTP.

Every field of OpenAI's completions, chat and embeddings requests is either
served, accepted as metadata (``user``), or refused with a 400 that names it:
nothing is silently ignored. A field set to ``null`` counts as not set, as
OpenAI's own server reads it. Pydantic checks types and ranges; its complaints
come back in OpenAI's error shape, naming the field (``param``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, field_validator

MAX_CHOICES = 16  # n x prompts: each is a request to the model, so a bound on what one HTTP request can queue
MAX_STOP = 8  # backends/python_hf/parameters.MAX_STOP_STRINGS


@dataclass
class APIError(Exception):
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None  # seconds, for 429

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "overloaded_error",
    }

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def refused(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param, "unsupported_parameter")


class Request(BaseModel):
    """What every endpoint shares: a model, and nothing unknown (OpenAI refuses unknown fields as well)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    user: str | None = None  # an end-user id for abuse tracking: metadata, nothing to serve

    REFUSED: ClassVar[dict[str, str]] = {}  # field -> why, for OpenAI fields this server does not serve

    @classmethod
    def parse(cls, body: bytes) -> Request:
        """A request body, checked: an APIError (400) names the first thing wrong."""
        try:
            raw = json.loads(body)
        except ValueError as err:
            raise APIError(400, f"the body is not JSON: {err}") from None
        if not isinstance(raw, dict):
            raise APIError(400, "the body must be a JSON object")
        raw = {key: value for key, value in raw.items() if value is not None}  # null: not set
        for name, why in cls.REFUSED.items():
            if name in raw and not cls.harmless(name, raw[name], raw):
                raise refused(name, why)
        try:
            return cls.model_validate({key: value for key, value in raw.items() if key not in cls.REFUSED})
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            if first["type"] == "extra_forbidden":
                raise APIError(400, f"unknown field {param!r}", param, "unknown_parameter") from None
            raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from None

    @classmethod
    def harmless(cls, name: str, value: Any, raw: Mapping[str, Any]) -> bool:
        """A refused field set to what the server does anyway (``logprobs: false``, ``n`` for ``best_of``)."""
        return value in (False, 0, {}, []) or (name == "best_of" and value == raw.get("n", 1))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


def texts(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """OpenAI's four shapes of a prompt or input, checked here with messages that say which shape was meant
    (a union's own checks would name one of its members only)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError("a text, a list of texts, a list of token ids, or a list of token-id lists; not empty")
    if all(isinstance(item, str) for item in value):
        return value
    if all(isinstance(item, list) for item in value):
        for i, ids in enumerate(value):
            token_ids(ids, f"item {i}: ")
        return value
    return token_ids(value, "")


def token_ids(ids: list, where: str) -> list[int]:
    if not ids:
        raise ValueError(f"{where}a list of token ids must not be empty")
    if not all(type(i) is int for i in ids):  # no bools, no floats, no texts mixed in
        raise ValueError(f"{where}token ids are integers, and a list holds one kind (texts, ids or lists of ids)")
    if min(ids) < 0:
        raise ValueError(f"{where}token ids are >= 0, got {min(ids)}")
    return ids


# a prompt or an embedding input: one text, several (a choice or a row each), token ids, or several lists of them
Texts = Annotated[str | list[str] | list[int] | list[list[int]], PlainValidator(texts)]


def rows(value: Texts) -> list[str]:
    """The rows a prompt or input makes, as the models read them: a text each, or a token-id list each as JSON
    (with the models' ``token_ids`` parameter: is_token_ids)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value[0], int):
        return [json.dumps(value)]
    return [item if isinstance(item, str) else json.dumps(item) for item in value]


def is_token_ids(value: Texts) -> bool:
    return isinstance(value, list) and not isinstance(value[0], str)


Penalty = Annotated[float, Field(ge=-2, le=2)]
Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)]


class Sampling(Request):
    """The generation fields completions and chat share, and what they ask of the ``_stream`` model."""

    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: Stop | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0  # vLLM's extension: EOS held back until this many tokens

    REFUSED: ClassVar[dict[str, str]] = {
        "logprobs": "log probabilities are not returned by this server's models yet",
        "top_logprobs": "log probabilities are not returned by this server's models yet",
        "logit_bias": "not supported by this server",
        "best_of": "not supported by this server (use n)",
        "suffix": "not supported by this server",
        "tools": "tool calls are not supported by this server",
        "tool_choice": "tool calls are not supported by this server",
        "parallel_tool_calls": "tool calls are not supported by this server",
        "functions": "function calls are not supported by this server",
        "function_call": "function calls are not supported by this server",
        "response_format": "only plain text answers are supported by this server",
        "audio": "not supported by this server",
        "modalities": "only text is supported by this server",
        "prediction": "not supported by this server",
        "reasoning_effort": "not supported by this server",
        "service_tier": "not supported by this server",
        "store": "not supported by this server",
        "metadata": "not supported by this server",
        "web_search_options": "not supported by this server",
    }

    @classmethod
    def harmless(cls, name: str, value: Any, raw: Mapping[str, Any]) -> bool:
        if name == "response_format":
            return value == {"type": "text"}
        if name == "modalities":
            return value == ["text"]
        return super().harmless(name, value, raw)

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def parameters(self, choice: int) -> dict[str, Any]:
        """The ``_stream`` model's request parameters for one choice (backends/python_hf/parameters.py).

        Temperature 0 decodes greedily; above it samples with no top-k filter (OpenAI has none). With ``n`` > 1
        and a seed, choice i samples with seed + i: the same request gives the same choices, and they differ.
        """
        parameters: dict[str, Any] = {"truncate": False, "return_full_text": False, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            parameters.update(temperature=self.temperature, top_k=0, top_p=self.top_p)
        if (new_tokens := self.new_tokens()) is not None:
            parameters["max_new_tokens"] = new_tokens
        if self.min_tokens:
            parameters["min_new_tokens"] = self.min_tokens
        if self.seed is not None:
            parameters["seed"] = (self.seed + choice) % 2**63
        if self.presence_penalty:
            parameters["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            parameters["frequency_penalty"] = self.frequency_penalty
        return parameters

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @field_validator("stream_options")
    @classmethod
    def only_when_streaming(cls, value: StreamOptions | None, info: Any) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value


class CompletionRequest(Sampling):
    prompt: Texts
    echo: bool = False

    def prompts(self) -> list[str]:
        return rows(self.prompt)

    def parameters(self, choice: int) -> dict[str, Any]:
        token_ids = {"token_ids": True} if is_token_ids(self.prompt) else {}
        return {**super().parameters(choice), "return_full_text": self.echo, **token_ids}

    def new_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def new_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) over ``max_tokens``; none: the model's default."""
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> str:
        """The messages as the model's ``chat`` parameter reads them (text.render_chat)."""
        return json.dumps([{"role": m.role, "content": m.text()} for m in self.messages])

    def parameters(self, choice: int) -> dict[str, Any]:
        return {**super().parameters(choice), "chat": True}


class EmbeddingRequest(Request):
    input: Texts
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None

    def inputs(self) -> list[str]:
        return rows(self.input)

    def parameters(self) -> dict[str, Any]:
        """The embedding model's request parameters."""
        return {"token_ids": True} if is_token_ids(self.input) else {}
