"""Talking to the test server: requests, bursts, metrics, comparisons."""

from __future__ import annotations

import queue
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonhf.server import TritonServer

from .conftest import CLASSIFIER, EMBEDDER

NAMES = {"gpt2": "gpt2", "facebook/opt-125m": "opt-125m", CLASSIFIER: CLASSIFIER, EMBEDDER: EMBEDDER}
# Sixteen prompts of different lengths, so that every burst pads.
PROMPTS = [
    " ".join(["the quick brown fox jumps over the lazy dog"] * (1 + i % 5))[: 8 + 13 * i] + f" #{i}" for i in range(16)
]
LENGTHS = [3 + 5 * (i % 7) for i in range(len(PROMPTS))]  # new tokens, 3..33, one per prompt
Outputs = dict[str, np.ndarray]
POLL_S = 0.01  # how often until() looks


def bytes_input(rows: Sequence[str | bytes], name: str = "prompt") -> grpcclient.InferInput:
    data = np.array([r.encode() if isinstance(r, str) else r for r in rows], dtype=object).reshape(-1, 1)
    tensor = grpcclient.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def burst(
    server: TritonServer,
    model: str,
    requests: Sequence[list[grpcclient.InferInput]],
    parameters: Sequence[Mapping[str, Any]] | None = None,
    latencies: list[float] | None = None,
) -> list[Outputs | InferenceServerException]:
    """Send every request at once (async gRPC), with its request parameters, and wait for all answers, in request
    order; ``latencies``, if given, gets each request's seconds from its send to its answer (or error)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    outputs = [o.name for o in client.get_model_metadata(model).outputs]  # open: the config is an admin API
    answers: queue.Queue = queue.Queue()
    sent = []
    for index, inputs in enumerate(requests):
        extra = dict(parameters[index]) if parameters and parameters[index] else None
        sent.append(time.monotonic())
        client.async_infer(
            model,
            inputs,
            callback=lambda result, error, i=index: answers.put((i, result, error, time.monotonic())),
            parameters=extra,
        )
    results: list = [None] * len(requests)
    answered = [0.0] * len(requests)
    for _ in requests:
        index, result, error, answered[index] = answers.get(timeout=120)
        results[index] = error if error else {name: result.as_numpy(name) for name in outputs}
    if latencies is not None:
        latencies[:] = [end - start for start, end in zip(sent, answered)]
    client.close()
    return results


def until(condition: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    """Wait for a condition, failing (not hanging) if it never holds. It looks every POLL_S: a test that must act
    the moment something happens waits on that event itself (test_streaming.SharedStream), not on this loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


class Pieces:
    """A streamed answer as it arrives: (arrival, text, new tokens) per piece, done once the final one or an error
    came."""

    def __init__(self) -> None:
        self.pieces: list[tuple[float, str, int]] = []
        self.error: Any = None
        self.done = threading.Event()

    @property
    def text(self) -> str:
        assert self.error is None, self.error
        return "".join(text for _, text, _ in self.pieces)

    @property
    def tokens(self) -> int:
        return sum(n for _, _, n in self.pieces)


class Streamed(Pieces):
    """One request to a streaming model on a gRPC stream of its own."""

    def __init__(
        self,
        server: TritonServer,
        model: str,
        prompt: str,
        parameters: Mapping[str, Any] | None = None,
        tensors: Sequence[grpcclient.InferInput] = (),
    ) -> None:
        super().__init__()
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.client.start_stream(callback=self.receive)
        prompt_tensor = grpcclient.InferInput("prompt", [1], "BYTES")
        prompt_tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        self.client.async_stream_infer(model, [prompt_tensor, *tensors], parameters=dict(parameters or {}) or None)

    def receive(self, result: Any, error: InferenceServerException | None) -> None:
        if error:
            self.error = error
        else:
            self.pieces.append(
                (time.monotonic(), result.as_numpy("text")[0].decode(), int(result.as_numpy("new_tokens")[0]))
            )
        if error or result.get_response().parameters["triton_final_response"].bool_param:
            self.done.set()

    def wait(self, timeout: float = 120) -> Streamed:
        assert self.done.wait(timeout), "no final response"
        self.client.stop_stream()
        self.client.close()
        return self

    def cancel(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def metric(server: TritonServer | str, name: str, model: str) -> float:
    """A model's value of one of the server's Prometheus metrics, summed over its instances (0 if not reported yet).
    ``server``: a TritonServer, or its metrics URL."""
    url = server if isinstance(server, str) else server.metrics_url
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        float(value)
        for labels, value in re.findall(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M)
        if f'model="{model}"' in labels.split(",")
    )


def alone(server: TritonServer, model: str, rows: Sequence[str]) -> Outputs:
    [result] = burst(server, model, [[bytes_input(rows)]])
    assert not isinstance(result, Exception), result
    return result


def ok(results: Sequence[Outputs | Exception]) -> list[Outputs]:
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    return list(results)


def counters(server: TritonServer, model: str) -> tuple[float, float]:
    """(inferences, executions) for a model, from the server's Prometheus metrics."""
    return metric(server, "nv_inference_count", model), metric(server, "nv_inference_exec_count", model)


def settled_counters(server: TritonServer, model: str) -> tuple[float, float]:
    """Counters once they stop moving: the backend reports statistics just after it
    sends the responses, so a client can see its answers a moment before the metrics do."""
    last, deadline = counters(server, model), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = counters(server, model)
        if now == last:
            return now
        last = now
    return last


def counters_after(server: TritonServer, model: str, before: tuple[float, float], requests: int) -> tuple[float, float]:
    """(inferences, executions) since ``before``, once all ``requests`` are counted and the counters settled."""
    deadline = time.monotonic() + 10
    while counters(server, model)[0] - before[0] < requests and time.monotonic() < deadline:
        time.sleep(0.05)
    now = settled_counters(server, model)
    return now[0] - before[0], now[1] - before[1]


def assert_same(model: str, got: Outputs, expected: Outputs) -> None:
    """Equal text and labels; floats within what padding changes in float32."""
    assert got.keys() == expected.keys()
    for name in got:
        if got[name].dtype == object:
            assert got[name].tolist() == expected[name].tolist(), (model, name)
        else:
            np.testing.assert_allclose(got[name], expected[name], atol=1e-5, err_msg=f"{model} {name}")


def in_process(repository: Path, name: str) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """A served model run in this process from its config.pbtxt, as the server would run it.

    A Python model is its one step; an ensemble is its steps in order, tensors passed
    through the ensemble's input and output maps. No server, no Triton.
    """
    from tritonhf import model_config
    from tritonhf.backends.python_hf.steps import load_step

    config = model_config.read(repository / name / "config.pbtxt")
    if config.get("platform") != "ensemble":
        return load_step(config, repository / name / "1")[0]
    steps = [
        (
            step,
            load_step(
                model_config.read(repository / step["model_name"] / "config.pbtxt"),
                repository / step["model_name"] / "1",
            )[0],
        )
        for step in config["ensemble_scheduling"]["step"]
    ]

    def run(texts: list[str]) -> dict[str, np.ndarray]:
        tensors: dict = {"prompt": texts}
        for step, forward in steps:
            inputs = {inner: tensors[outer] for inner, outer in step["input_map"].items()}
            outputs = forward(inputs["prompt"] if list(inputs) == ["prompt"] else inputs)
            tensors.update(
                {step["output_map"][inner]: array for inner, array in outputs.items() if inner in step["output_map"]}
            )
        return {t["name"]: tensors[t["name"]] for t in config["output"]}

    return run


def reference(model: Any, prompt: str, **options: Any) -> tuple[str, int]:
    """transformers' own generate on one prompt alone, for a tasks.TextGeneration: (prompt + completion, new tokens)."""
    import torch

    encoded = model.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.model.generate(
            **encoded, pad_token_id=model.tokenizer.pad_token_id or model.tokenizer.eos_token_id, **options
        )
    new = out[0, encoded["input_ids"].shape[1] :]
    return prompt + model.tokenizer.decode(new, skip_special_tokens=True), len(new)
