"""How the OpenAI API's requests are read (tritonhf/openai_api/protocol.py), without a server: what each field asks of
the model, what is accepted as set to nothing, and what is refused by name."""

from __future__ import annotations

import json

import pytest

from tritonhf.openai_api.protocol import APIError, ChatRequest, CompletionRequest, EmbeddingRequest
from tritonhf.openai_api.triton import ClientGoneError, error_for


def parse(cls: type, **body: object) -> object:
    return cls.parse(json.dumps({"model": "m", **body}).encode())


def test_temperature_zero_is_greedy_and_above_it_samples_without_top_k() -> None:
    greedy = parse(CompletionRequest, prompt="hi", temperature=0)
    assert greedy.parameters(0) == {
        "truncate": False, "return_full_text": False, "do_sample": False, "max_new_tokens": 16,
    }  # fmt: skip
    sampled = parse(CompletionRequest, prompt="hi", top_p=0.9, seed=5, n=3, presence_penalty=0.5, echo=True)
    assert sampled.parameters(2) == {
        "truncate": False, "return_full_text": True, "do_sample": True, "temperature": 1.0, "top_k": 0,
        "top_p": 0.9, "max_new_tokens": 16, "seed": 7, "presence_penalty": 0.5,
    }  # fmt: skip


def test_chat_takes_max_completion_tokens_over_max_tokens_and_the_models_default_without() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    chat = parse(ChatRequest, messages=messages, max_tokens=5, max_completion_tokens=7)
    assert chat.parameters(0)["max_new_tokens"] == 7 and chat.parameters(0)["chat"] is True
    assert json.loads(chat.chat()) == [{"role": "user", "content": "ab"}]
    assert "max_new_tokens" not in parse(ChatRequest, messages=messages).parameters(0)


def test_null_and_harmless_values_are_not_refused() -> None:
    """What clients send by default: nulls, logprobs false, a text response format, best_of equal to n."""
    request = parse(
        ChatRequest, messages=[{"role": "user", "content": "hi"}], logprobs=False, top_logprobs=None,
        response_format={"type": "text"}, tools=None, user="someone", stop=None,
    )  # fmt: skip
    assert request.stops() == [] and request.user == "someone"
    assert parse(CompletionRequest, prompt="hi", best_of=2, n=2).n == 2
    assert parse(CompletionRequest, prompt="hi", stop=["a", "b"]).stops() == ["a", "b"]


def test_token_ids_go_to_the_models_as_json_rows() -> None:
    """A list of ids is one row, a list of lists a row each (OpenAI's four prompt shapes), with ``token_ids``."""
    assert parse(EmbeddingRequest, input=[1, 2]).inputs() == ["[1, 2]"]
    many = parse(EmbeddingRequest, input=[[1], [2, 3]])
    assert many.inputs() == ["[1]", "[2, 3]"] and many.parameters() == {"token_ids": True}
    assert parse(EmbeddingRequest, input=["1", "2"]).parameters() == {}
    completion = parse(CompletionRequest, prompt=[[5, 6], [7]], n=2)
    assert completion.prompts() == ["[5, 6]", "[7]"] and completion.parameters(1)["token_ids"] is True
    assert "token_ids" not in parse(CompletionRequest, prompt=["a", "b"]).parameters(0)


REFUSED = {
    "tools": (ChatRequest, {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
    "response_format": (
        ChatRequest,
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
    ),
    "best_of": (CompletionRequest, {"prompt": "x", "best_of": 3}),
    "suffix": (CompletionRequest, {"prompt": "x", "suffix": "y"}),
    "logit_bias": (CompletionRequest, {"prompt": "x", "logit_bias": {"50256": -100}}),
    "messages.0.role": (ChatRequest, {"messages": [{"role": "tool", "content": "x"}]}),
    "messages.0.content": (ChatRequest, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    "stop": (CompletionRequest, {"prompt": "x", "stop": ["a"] * 9}),
    "input": (EmbeddingRequest, {"input": [[1, 2], "mixed"]}),
    "prompt": (CompletionRequest, {"prompt": [[1, -2]]}),
    "encoding_format": (EmbeddingRequest, {"input": "x", "encoding_format": "int8"}),
    "dimensions": (EmbeddingRequest, {"input": "x", "dimensions": 0}),
}


@pytest.mark.parametrize("param", REFUSED)
def test_what_is_not_served_is_refused_by_name(param: str) -> None:
    cls, body = REFUSED[param]
    with pytest.raises(APIError) as refused:
        parse(cls, **body)
    assert refused.value.status == 400 and refused.value.param is not None
    assert refused.value.param.startswith(param), refused.value
    assert refused.value.body()["error"]["type"] == "invalid_request_error"


ANSWERS = [  # (the server's message, its gRPC status or None on a stream) -> HTTP status, code
    ("Exceeds maximum queue size", "StatusCode.UNAVAILABLE", 429, "model_overloaded"),
    ("overloaded: 4 requests already wait for a slot; try again later", None, 429, "model_overloaded"),
    ("Request for unknown model: 'gpt2_stream' has no available versions", "StatusCode.NOT_FOUND", 503, None),
    ("the model is unloading", None, 503, "model_unavailable"),
    ("max_new_tokens must be in 1..63, got 99", "StatusCode.INVALID_ARGUMENT", 400, None),
    ("chat: the prompt must be a JSON list of messages", None, 400, None),
    ("inference failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied", "StatusCode.INTERNAL", 500, None),
    ("generation failed: OutOfMemoryError: ...", None, 500, "internal_error"),
]


@pytest.mark.parametrize(("message", "status", "http", "code"), ANSWERS)
def test_the_servers_errors_map_to_openais(message: str, status: str | None, http: int, code: str | None) -> None:
    """429 for what may succeed later, 503 while the model is away, 400 for the request's fault, 500 for the
    model's: its message stays in the log, never in the body."""
    error = error_for(message, status, "gpt2")
    assert isinstance(error, APIError) and error.status == http, error
    assert code is None or error.body()["error"]["code"] == code
    assert (message in error.body()["error"]["message"]) == (http in (400, 429)), error.body()
    assert (error.retry_after == 1.0) == (http == 429)
    assert isinstance(error_for("request cancelled", None, "gpt2"), ClientGoneError)
