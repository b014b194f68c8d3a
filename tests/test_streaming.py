"""Integration tier for generation beyond static batches: per-request parameters, streams, continuous batching.

Every test talks to the real tritonserver; references are transformers' own
``generate`` in this process, or the same model served statically.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonhf import cli
from tritonhf.backends.python_hf.tasks import TextGeneration, load_task
from tritonhf.server import TritonServer

from .conftest import GEN, GEN_MAX_LEN
from .helpers import (
    LENGTHS,
    NAMES,
    PROMPTS,
    Streamed,
    burst,
    bytes_input,
    counters_after,
    metric,
    ok,
    reference,
    settled_counters,
    until,
)

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def models(tiny: dict[str, Path]) -> dict[str, TextGeneration]:
    return {
        NAMES[source]: load_task(str(tiny[source]), "text-generation", max_length=str(GEN_MAX_LEN)) for source in GEN
    }


def streams(server: TritonServer, model: str, requests: list[tuple[str, dict[str, Any]]]) -> list[Streamed]:
    """All at once, each on its own gRPC stream; waits for every final response."""
    return [call.wait() for call in [Streamed(server, model, prompt, parameters) for prompt, parameters in requests]]


def scalar_input(name: str, value: Any, datatype: str, batched: bool = True) -> grpcclient.InferInput:
    data = np.array(
        [[value]] if batched else [value],
        dtype={"INT32": np.int32, "INT64": np.int64, "BOOL": bool, "FP32": np.float32}[datatype],
    )
    tensor = grpcclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def post(server: TritonServer, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{server.http_url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


# --- the same answers, however they are asked for ------------------------------------------


@pytest.mark.parametrize("name", [NAMES[source] for source in GEN])
def test_greedy_stream_equals_static_and_generate(
    server: TritonServer, models: dict[str, TextGeneration], name: str
) -> None:
    """Alone, then 16 at once with different lengths: stream == static == transformers' generate."""
    for prompt, n in zip(PROMPTS[:3], LENGTHS):
        expected, tokens = reference(models[name], prompt, max_new_tokens=n, do_sample=False)
        [static] = ok(burst(server, name, [[bytes_input([prompt])]], [{"max_new_tokens": n}]))
        assert static["text"][0, 0].decode() == expected and static["new_tokens"][0, 0] == tokens
        streamed = Streamed(server, f"{name}_stream", prompt, {"max_new_tokens": n}).wait()
        assert (streamed.text, streamed.tokens) == (expected, tokens)
    requests = [(prompt, {"max_new_tokens": n}) for prompt, n in zip(PROMPTS, LENGTHS)]
    before = settled_counters(server, name)
    static = ok(
        burst(server, name, [[bytes_input([prompt])] for prompt, _ in requests], [options for _, options in requests])
    )
    inferences, executions = counters_after(server, name, before, 16)
    assert executions < inferences, "requests with different parameters still batch"
    calls = streams(server, f"{name}_stream", requests)
    for (prompt, options), got, call in zip(requests, static, calls):
        expected, tokens = reference(models[name], prompt, max_new_tokens=options["max_new_tokens"], do_sample=False)
        assert (got["text"][0, 0].decode(), got["new_tokens"][0, 0]) == (expected, tokens)
        assert (call.text, call.tokens) == (expected, tokens)
    assert sum(len(call.pieces) for call in calls) > 3 * len(calls), (
        "streamed in pieces (a piece waits only for a whole UTF-8 character)"
    )


def test_every_request_gets_exactly_its_length(server: TritonServer) -> None:
    """max_new_tokens per request in one burst (min_new_tokens = max: a random model's EOS can't end one early)."""
    requests = [
        (prompt, {"max_new_tokens": n, "min_new_tokens": n, "return_full_text": False})
        for prompt, n in zip(PROMPTS, LENGTHS)
    ]
    for call, (_, options) in zip(streams(server, "gpt2_stream", requests), requests):
        assert call.tokens == options["max_new_tokens"]
    tensors = [
        [bytes_input([prompt]), scalar_input("max_new_tokens", n, "INT32"), scalar_input("min_new_tokens", n, "INT32")]
        for prompt, n in zip(PROMPTS, LENGTHS)
    ]
    static = ok(burst(server, "gpt2", tensors))
    assert [int(got["new_tokens"][0, 0]) for got in static] == LENGTHS, "the same, as input tensors"


def test_seeded_sampling_is_reproducible(server: TritonServer) -> None:
    seeded = {"do_sample": True, "seed": 1234, "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 16}
    first = Streamed(server, "gpt2_stream", PROMPTS[4], seeded).wait().text
    crowd = streams(
        server,
        "gpt2_stream",
        [(PROMPTS[4], seeded), *((p, {"do_sample": True, "max_new_tokens": 16}) for p in PROMPTS[:6])],
    )
    assert crowd[0].text == first, "the same seed gives the same answer, in company too"
    static = ok(burst(server, "gpt2", [[bytes_input([PROMPTS[4]])]], [seeded]))[0]["text"][0, 0].decode()
    assert static == first, "and the same in the static model"
    assert Streamed(server, "gpt2_stream", PROMPTS[4], {**seeded, "seed": 4321}).wait().text != first


# --- continuous batching, observed ---------------------------------------------------------


class SharedStream:
    """Several requests on one gRPC stream: their pieces in the one order the server sent them.

    Each piece is (request id, new tokens, final). The model sends every row's piece of a step in turn, and one
    stream keeps their order, so which piece came before which is the order of the steps, however fast or slow
    the machine runs them. ``wait_for`` wakes on each piece (no polling).
    """

    def __init__(self, server: TritonServer, model: str) -> None:
        self.model = model
        self.order: list[tuple[str, int, bool]] = []
        self.errors: list[InferenceServerException] = []
        self.arrived = threading.Condition()
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.client.start_stream(callback=self.receive)

    def send(self, request_id: str, prompt: str, parameters: dict[str, Any]) -> None:
        tensor = grpcclient.InferInput("prompt", [1], "BYTES")  # a stream model takes one prompt, unbatched
        tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        self.client.async_stream_infer(self.model, [tensor], request_id=request_id, parameters=parameters)

    def receive(self, result: Any, error: InferenceServerException | None) -> None:
        with self.arrived:
            if error:
                self.errors.append(error)
            else:
                response = result.get_response()
                final = response.parameters["triton_final_response"].bool_param
                self.order.append((response.id, int(result.as_numpy("new_tokens")[0]), final))
            self.arrived.notify_all()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: condition() or self.errors, timeout), f"timed out waiting for {what}"
        assert not self.errors, [(e.status(), e.message(), e.debug_details()) for e in self.errors]

    def tokens(self, request_id: str, before: int | None = None) -> int:
        """The request's tokens in the pieces (of the first ``before`` pieces on the stream)."""
        return sum(n for rid, n, _ in self.order[:before] if rid == request_id)

    def finished(self, request_id: str) -> int | None:
        """Where the request's final piece is in the order, once it came."""
        return next((i for i, (rid, _, final) in enumerate(self.order) if rid == request_id and final), None)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def test_a_late_request_is_admitted_at_a_step_boundary(server: TritonServer) -> None:
    """Two long answers decoding; a short request sent once both have tokens joins them and finishes first.

    Judged by the order of the pieces on one stream, never by clocks: the late request's pieces interleave with
    the early ones' (it decoded in their batch), and its final piece comes while they still have tokens to go
    (it did not wait for the batch to drain)."""
    early, late_tokens = 240, 8
    stream = SharedStream(server, "gpt2_stream")
    try:
        for name, i in (("early-1", 1), ("early-2", 2)):
            stream.send(name, PROMPTS[i], {"max_new_tokens": early, "min_new_tokens": early})
        stream.wait_for(lambda: stream.tokens("early-1") and stream.tokens("early-2"), "both early rows to decode")
        stream.send("late", PROMPTS[3], {"max_new_tokens": late_tokens, "min_new_tokens": late_tokens})
        stream.wait_for(lambda: all(stream.finished(r) is not None for r in ("early-1", "early-2", "late")), "all")
    finally:
        stream.close()
    order = stream.order
    first = next(i for i, (rid, _, _) in enumerate(order) if rid == "late")
    last = stream.finished("late")
    assert stream.tokens("late") == late_tokens and order[last][2]
    for name in ("early-1", "early-2"):
        assert stream.tokens(name) == early
        assert stream.tokens(name, first) >= 1, f"{name} was decoding when the late request joined"
        during = {rid for rid, _, _ in order[first:last]}
        assert name in during, f"{name} went on decoding with the late request in its batch"
        assert stream.tokens(name, last + 1) < early, f"the late request finished before {name}: it did not wait"
    print(
        f"\nlate request: first piece at {first}, final at {last} of {len(order)} pieces; early rows then had"
        f" {[stream.tokens(n, last + 1) for n in ('early-1', 'early-2')]} of {early} tokens"
    )


def test_cancelling_a_stream_frees_its_slot(server: TritonServer, models: dict[str, TextGeneration]) -> None:
    tokens_before = metric(server, "tritonhf_generated_tokens", "gpt2_stream")
    kept = Streamed(server, "gpt2_stream", PROMPTS[5], {"max_new_tokens": 120})
    gone = Streamed(server, "gpt2_stream", PROMPTS[6], {"max_new_tokens": 240, "min_new_tokens": 240})
    until(lambda: len(gone.pieces) >= 3, what="the stream to be cancelled to start")
    gone.cancel()
    assert kept.wait().text == reference(models["gpt2"], PROMPTS[5], max_new_tokens=120, do_sample=False)[0]
    until(
        lambda: metric(server, "tritonhf_running_sequences", "gpt2_stream") == 0,
        10,
        "the cancelled stream's slot to be freed",
    )
    generated = metric(server, "tritonhf_generated_tokens", "gpt2_stream") - tokens_before
    assert generated < kept.tokens + 240, (
        f"the cancelled stream stopped early ({generated - kept.tokens:.0f} of 240 tokens)"
    )
    assert Streamed(server, "gpt2_stream", PROMPTS[0], {"max_new_tokens": 3}).wait().tokens >= 1, "still serving"


# --- bad parameters ------------------------------------------------------------------------

BAD = {
    "negative max_new_tokens": ({"max_new_tokens": -1}, "max_new_tokens must be in 1..255, got -1"),
    "temperature 0 with sampling": (
        {"do_sample": True, "temperature": 0},
        "temperature must be > 0 when do_sample is true",
    ),
    "unknown key": ({"beams": 4}, "unknown generation parameter 'beams'"),
    "a digit int() refuses": ({"max_new_tokens": "²"}, "max_new_tokens must be an integer"),
}


@pytest.mark.parametrize("name", ["gpt2", "gpt2_stream"])
def test_bad_parameters_fail_alone(server: TritonServer, name: str) -> None:
    good = {"max_new_tokens": 5}
    requests = [(PROMPTS[0], good), *((PROMPTS[1], raw) for raw, _ in BAD.values()), (PROMPTS[2], good)]
    if name == "gpt2":
        results = burst(server, name, [[bytes_input([prompt])] for prompt, _ in requests], [raw for _, raw in requests])
        errors, answers = results[1:-1], [results[0], results[-1]]
        assert all(not isinstance(answer, Exception) and answer["new_tokens"][0, 0] >= 1 for answer in answers)
    else:
        calls = streams(server, name, requests)
        errors, answers = [call.error for call in calls[1:-1]], calls[:: len(calls) - 1]
        assert all(call.error is None and call.tokens >= 1 for call in answers)
    for (what, (_, message)), error in zip(BAD.items(), errors):
        assert isinstance(error, InferenceServerException), what
        assert message in error.message(), (what, error.message())
    assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()


def test_tritons_generate_endpoints(server: TritonServer) -> None:
    """POST /generate on the static model, /generate_stream (server-sent events) on the stream."""
    status, body = post(
        server, "/v2/models/gpt2/generate", {"prompt": PROMPTS[7], "parameters": {"max_new_tokens": 12}}
    )
    assert status == 200, body
    answer = json.loads(body)
    status, body = post(
        server, "/v2/models/gpt2_stream/generate_stream", {"prompt": PROMPTS[7], "parameters": {"max_new_tokens": 12}}
    )
    assert status == 200, body
    events = [json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")]
    assert len(events) > 1 and "".join(event["text"] for event in events) == answer["text"]
    assert sum(event["new_tokens"] for event in events) == answer["new_tokens"]
    status, body = post(server, "/v2/models/gpt2/generate", {"prompt": PROMPTS[7], "parameters": {"top_p": 2}})
    assert status == 400 and "top_p must be in (0, 1]" in body


def test_generation_metrics(server: TritonServer) -> None:
    before = {
        name: metric(server, name, "opt-125m_stream")
        for name in (
            "tritonhf_generated_tokens",
            "tritonhf_time_to_first_token_seconds_count",
            "tritonhf_inter_token_latency_seconds_count",
        )
    }
    calls = streams(
        server, "opt-125m_stream", [(prompt, {"max_new_tokens": 10, "min_new_tokens": 10}) for prompt in PROMPTS[:4]]
    )
    after = {name: metric(server, name, "opt-125m_stream") for name in before}
    assert (
        after["tritonhf_generated_tokens"] - before["tritonhf_generated_tokens"]
        == sum(call.tokens for call in calls)
        == 40
    )
    assert (
        after["tritonhf_time_to_first_token_seconds_count"] - before["tritonhf_time_to_first_token_seconds_count"] == 4
    )
    assert (
        after["tritonhf_inter_token_latency_seconds_count"] - before["tritonhf_inter_token_latency_seconds_count"] == 36
    )
    assert metric(server, "tritonhf_queued_sequences", "opt-125m_stream") == 0


def test_client_streams(
    server: TritonServer, models: dict[str, TextGeneration], capsys: pytest.CaptureFixture[str]
) -> None:
    stream = ["client", "-m", "gpt2_stream", "--stream", "--url", server.grpc_url]
    assert cli.main([*stream, "--prompt", PROMPTS[8], "--param", "max_new_tokens=9"]) == 0
    captured = capsys.readouterr()
    expected, tokens = reference(models["gpt2"], PROMPTS[8], max_new_tokens=9, do_sample=False)
    assert captured.out == expected + "\n"
    assert f"[{tokens} new tokens]" in captured.err
    assert cli.main([*stream, "--prompt", "x", "--param", "max_new_tokens=0"]) == 1
    assert "max_new_tokens must be in" in capsys.readouterr().err
