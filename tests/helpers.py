"""Talking to the test server: requests, bursts, metrics, comparisons."""

from __future__ import annotations

import queue
import re
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonhf.server import TritonServer

from .conftest import CLASSIFIER, EMBEDDER

NAMES = {"gpt2": "gpt2", "facebook/opt-125m": "opt-125m", CLASSIFIER: CLASSIFIER, EMBEDDER: EMBEDDER}
# Sixteen prompts of different lengths, so that every burst pads.
PROMPTS = [" ".join(["the quick brown fox jumps over the lazy dog"] * (1 + i % 5))[: 8 + 13 * i] + f" #{i}" for i in range(16)]
Outputs = dict[str, np.ndarray]


def bytes_input(rows: Sequence[str | bytes], name: str = "prompt") -> grpcclient.InferInput:
    data = np.array([r.encode() if isinstance(r, str) else r for r in rows], dtype=object).reshape(-1, 1)
    tensor = grpcclient.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def burst(server: TritonServer, model: str, requests: Sequence[list[grpcclient.InferInput]]) -> list[Outputs | InferenceServerException]:
    """Send every request at once (async gRPC) and wait for all answers, in request order."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    outputs = [o.name for o in client.get_model_config(model).config.output]
    answers: queue.Queue = queue.Queue()
    for index, inputs in enumerate(requests):
        client.async_infer(model, inputs, callback=lambda result, error, i=index: answers.put((i, result, error)))
    results: list = [None] * len(requests)
    for _ in requests:
        index, result, error = answers.get(timeout=120)
        results[index] = error if error else {name: result.as_numpy(name) for name in outputs}
    client.close()
    return results


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
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = [re.search(rf'^{metric}{{model="{model}",version="1"}} (\S+)$', text, re.M) for metric in ("nv_inference_count", "nv_inference_exec_count")]
    assert all(values), f"no metrics for {model}"
    return float(values[0][1]), float(values[1][1])


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
    from tritonhf.backends.python_hf.batching import load_step

    config = model_config.read(repository / name / "config.pbtxt")
    if config.get("platform") != "ensemble":
        return load_step(config, repository / name / "1")[0]
    steps = [(step, load_step(model_config.read(repository / step["model_name"] / "config.pbtxt"), repository / step["model_name"] / "1")[0]) for step in config["ensemble_scheduling"]["step"]]

    def run(texts: list[str]) -> dict[str, np.ndarray]:
        tensors: dict = {"prompt": texts}
        for step, forward in steps:
            inputs = {inner: tensors[outer] for inner, outer in step["input_map"].items()}
            outputs = forward(inputs["prompt"] if list(inputs) == ["prompt"] else inputs)
            tensors.update({step["output_map"][inner]: array for inner, array in outputs.items() if inner in step["output_map"]})
        return {t["name"]: tensors[t["name"]] for t in config["output"]}

    return run
