"""Per-request generation parameters: what a request may ask for, parsed and checked.

A request gives them as request parameters (Triton's ``/generate`` endpoint:
``{"prompt": ..., "parameters": {"max_new_tokens": 16}}``) or as optional input
tensors; the model's config parameters give the defaults. Anything wrong is a
RequestError that names it, for that request alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batching import RequestError
from .tensors import TensorSpec


def scalar(name: str, value: Any) -> Any:
    """A request parameter's value, or a one-element input tensor's."""
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise RequestError(f"input {name!r} must hold one value, got shape {list(value.shape)}")
        value = value.reshape(-1)[0]
        value = value.item() if isinstance(value, np.generic) else value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def as_int(name: str, value: Any) -> int:
    value = scalar(name, value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isascii():
        with contextlib.suppress(ValueError):  # not a number: the check below names it
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    return value


def as_float(name: str, value: Any) -> float:
    value = scalar(name, value)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    return number


def as_bool(name: str, value: Any) -> bool:
    value = scalar(name, value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise RequestError(f"{name} must be true or false, got {value!r}")


def as_strings(name: str, value: Any) -> tuple[str, ...]:
    """One string (a request parameter) or a tensor of them."""
    values = value.reshape(-1).tolist() if isinstance(value, np.ndarray) else [value]
    strings = tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values)
    if not all(isinstance(s, str) and s for s in strings):
        raise RequestError(f"{name} must be non-empty strings, got {values!r}")
    return strings


@dataclass(frozen=True)
class Parameter:
    """One generation parameter: its input tensor (for clients that send tensors) and its parser."""

    tensor: TensorSpec
    parse: Callable[[str, Any], Any]


PARAMETERS = {
    p.tensor.name: p
    for p in (
        Parameter(TensorSpec("max_new_tokens", "int32", optional=True), as_int),
        Parameter(TensorSpec("min_new_tokens", "int32", optional=True), as_int),
        Parameter(TensorSpec("do_sample", "bool", optional=True), as_bool),
        Parameter(TensorSpec("temperature", "float32", optional=True), as_float),
        Parameter(TensorSpec("top_p", "float32", optional=True), as_float),
        Parameter(TensorSpec("top_k", "int32", optional=True), as_int),
        Parameter(TensorSpec("seed", "int64", optional=True), as_int),
        Parameter(TensorSpec("stop", "bytes", (-1,), optional=True), as_strings),  # any number of strings: ragged
        Parameter(TensorSpec("return_full_text", "bool", optional=True), as_bool),
        Parameter(TensorSpec("presence_penalty", "float32", optional=True), as_float),
        Parameter(TensorSpec("frequency_penalty", "float32", optional=True), as_float),
        Parameter(TensorSpec("chat", "bool", optional=True), as_bool),
        Parameter(TensorSpec("truncate", "bool", optional=True), as_bool),
        Parameter(TensorSpec("token_ids", "bool", optional=True), as_bool),
    )
}
OPTIONAL_INPUTS = tuple(parameter.tensor for parameter in PARAMETERS.values())
CONFIG_NAMES = {"max_new_tokens": "max_length", "min_new_tokens": "min_length"}  # the tutorial's config names
PER_REQUEST_ONLY = ("seed", "stop", "chat", "truncate", "token_ids")  # no model-wide default
MAX_STOP_STRINGS = 8


@dataclass(frozen=True)
class GenerationParams:
    """What one request asks for; the model's config parameters give the defaults.

    ``max_new_tokens`` counts new tokens only. ``top_k`` = 0 and ``top_p`` = 1
    switch those filters off; the defaults are transformers' (greedy, and
    top_k 50 once sampling). ``stop`` strings end the answer and are not part of
    it. ``return_full_text`` puts the prompt in front, as the tutorial's
    pipeline did (on a stream: in front of the first piece).
    ``presence_penalty`` and ``frequency_penalty`` are OpenAI's (-2..2): each
    token's logit is lowered by the first if the token was generated before, and
    by the second times how often (generated tokens only, as vLLM counts).
    ``chat``: the prompt is a JSON list of chat messages, rendered through the
    model's chat template (text.render_chat). ``truncate``: a prompt longer
    than the model leaves room for is cut from the left (the default), or,
    false, refused. ``token_ids``: the prompt is a JSON list of token ids (text.token_ids), taken as they are.
    """

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None
    stop: tuple[str, ...] = ()
    return_full_text: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    chat: bool = False
    truncate: bool = True
    token_ids: bool = False

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def updated(self, raw: Mapping[str, Any], max_new_limit: int) -> GenerationParams:
        """These defaults overridden by a request's values, checked; RequestError names what is wrong."""
        if unknown := sorted(set(raw) - set(PARAMETERS)):
            raise RequestError(
                f"unknown generation parameter {', '.join(map(repr, unknown))}; known: {', '.join(PARAMETERS)}"
            )
        values = {name: PARAMETERS[name].parse(name, value) for name, value in raw.items()}
        if "min_new_tokens" not in values:  # a default minimum never exceeds a requested maximum
            values["min_new_tokens"] = max(
                0, min(self.min_new_tokens, values.get("max_new_tokens", self.max_new_tokens))
            )
        params = dataclasses.replace(self, **values)
        params.check(max_new_limit)
        return params

    def as_config(self) -> dict[str, str]:
        """The model-wide defaults as config.pbtxt parameters (booleans as Triton writes them)."""
        values = {
            CONFIG_NAMES.get(name, name): getattr(self, name) for name in PARAMETERS if name not in PER_REQUEST_ONLY
        }
        return {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in values.items()}

    @classmethod
    def from_config(cls, parameters: Mapping[str, Any], max_new_limit: int) -> GenerationParams:
        """The defaults a model's config parameters give, checked; RequestError names what is wrong."""
        raw = {
            name: parameters[CONFIG_NAMES.get(name, name)]
            for name in PARAMETERS
            if CONFIG_NAMES.get(name, name) in parameters
        }
        return cls().updated(raw, max_new_limit)

    def check(self, max_new_limit: int) -> None:
        max_ok = 1 <= self.max_new_tokens <= max_new_limit
        problems = [
            (not max_ok, f"max_new_tokens must be in 1..{max_new_limit}, got {self.max_new_tokens}"),
            (  # compared with max_new_tokens only where that is valid: one mistake, one message
                self.min_new_tokens < 0 or (max_ok and self.min_new_tokens > self.max_new_tokens),
                f"min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}",
            ),
            (self.temperature < 0, f"temperature must be >= 0, got {self.temperature}"),
            (
                self.do_sample and self.temperature == 0,
                "temperature must be > 0 when do_sample is true (do_sample=false decodes greedily)",
            ),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k < 0, f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}"),
            (self.seed is not None and not 0 <= self.seed < 2**63, f"seed must be in 0..2**63-1, got {self.seed}"),
            *(
                (not -2 <= getattr(self, name) <= 2, f"{name} must be in -2..2, got {getattr(self, name)}")
                for name in ("presence_penalty", "frequency_penalty")
            ),
            (len(self.stop) > MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"),
            (self.chat and self.token_ids, "chat and token_ids: a prompt is chat messages or token ids, not both"),
        ]
        if messages := [message for failed, message in problems if failed]:
            raise RequestError("; ".join(messages))


@dataclass(frozen=True)
class Limits:
    """How big a stream's running batch may grow, how many tokens a packed step carries (packed.py), and when a
    padded batch admits (TGI's rule: scheduler.Scheduler)."""

    max_running_sequences: int = 32  # rows in the running batch
    max_running_tokens: int = 16384  # rows x longest (prompt + max_new_tokens): the KV cache's size in tokens
    max_prefill_tokens: int = 512  # prompt tokens a packed step carries at most (vLLM's chunked-prefill budget)
    prefill_step_slack: float = 1.25  # beside decoding rows, at most this x their own step's time (0: no time bound)
    max_waiting_steps: int = 10  # decoding steps a request may wait before it is admitted
    waiting_served_ratio: float = 1.2  # admit once waiting >= this x running
    max_waiting_sequences: int = 64  # requests waiting for a slot; more are refused at once (UNAVAILABLE)
    stream_interval: int = 1  # a stream's tokens a response (SGLang's and vLLM's stream interval); the first at once

    def check(self) -> Limits:
        """These limits, or ValueError naming what is out of range."""
        sizes = (
            self.max_running_sequences,
            self.max_running_tokens,
            self.max_prefill_tokens,
            self.max_waiting_sequences,
            self.stream_interval,
        )
        if min(sizes) < 1:
            raise ValueError(
                "max_running_sequences, max_running_tokens, max_prefill_tokens, max_waiting_sequences,"
                f" stream_interval must be >= 1; got {self}"
            )
        if min(self.max_waiting_steps, self.waiting_served_ratio) < 0:
            raise ValueError(f"max_waiting_steps and waiting_served_ratio must be >= 0; got {self}")
        if not (self.prefill_step_slack == 0 or 1 < self.prefill_step_slack < math.inf):
            raise ValueError(f"prefill_step_slack must be 0 (no time bound) or > 1; got {self.prefill_step_slack}")
        return self

    def as_config(self) -> dict[str, str]:
        return {key: str(value) for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_config(cls, parameters: Mapping[str, str]) -> Limits:
        """The limits in a model's config parameters (the rest default), checked."""
        defaults = cls()
        names = [field.name for field in dataclasses.fields(cls) if field.name in parameters]
        return cls(**{name: type(getattr(defaults, name))(parameters[name]) for name in names}).check()


Options = tuple[Mapping[str, Any], Mapping[str, np.ndarray]] | Mapping[str, Any]  # (parameters, tensors), or one


def combine(raw: Options) -> dict[str, Any]:
    """A request's options from its parameters and its optional input tensors (one name, one place); a single
    mapping (an in-process caller's) as it is."""
    if not isinstance(raw, tuple):
        return dict(raw)
    parameters, tensors = raw
    if both := sorted(set(parameters) & set(tensors)):
        raise RequestError(f"{', '.join(both)} given both as a request parameter and as an input tensor")
    return {**parameters, **tensors}
