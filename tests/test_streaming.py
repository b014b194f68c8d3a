"""Integration tier for generation beyond static batches: per-request parameters, streams, continuous batching.

Every test talks to the real tritonserver; references are transformers' own
``generate`` in this process, or the same model served statically.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
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


def test_a_late_request_is_admitted_at_a_step_boundary(server: TritonServer) -> None:
    early = [
        Streamed(server, "gpt2_stream", PROMPTS[i], {"max_new_tokens": 200, "min_new_tokens": 200}) for i in (1, 2)
    ]
    until(lambda: early[0].tokens >= 5, what="the early requests to be decoding")
    late = Streamed(server, "gpt2_stream", PROMPTS[3], {"max_new_tokens": 4, "min_new_tokens": 4}).wait()
    early = [call.wait() for call in early]
    first_late, last_early = late.pieces[0][0], min(call.pieces[-1][0] for call in early)
    assert first_late < last_early, "the late request's first token came before the early ones finished"
    assert late.pieces[-1][0] < last_early, "and it finished first: it did not wait for the batch"
    assert min(len(call.pieces) for call in early) > 100


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
