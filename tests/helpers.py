"""Talking to the test server: requests, bursts, metrics, comparisons."""

from __future__ import annotations

import queue
import re
import time
import urllib.request
from collections.abc import Sequence

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


def counters_after(server: TritonServer, model: str, before: tuple[float, float], requests: int) -> tuple[float, float]:
    """(inferences, executions) since ``before``, once all ``requests`` are counted.

    The backend reports statistics after it sends the responses, so the client can
    see its answers a moment before the metrics do.
    """
    deadline = time.monotonic() + 10
    while True:
        now = counters(server, model)
        if now[0] - before[0] >= requests or time.monotonic() > deadline:
            return now[0] - before[0], now[1] - before[1]
        time.sleep(0.05)


def assert_same(model: str, got: Outputs, expected: Outputs) -> None:
    """Equal text and labels; floats within what padding changes in float32."""
    assert got.keys() == expected.keys()
    for name in got:
        if got[name].dtype == object:
            assert got[name].tolist() == expected[name].tolist(), (model, name)
        else:
            np.testing.assert_allclose(got[name], expected[name], atol=1e-5, err_msg=f"{model} {name}")


