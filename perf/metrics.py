"""The server's Prometheus metrics around a measurement: executed batch sizes, queue and compute time."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterable

SAMPLE = re.compile(r'^(nv_inference_\w+)\{model="([^"]+)",version="[^"]*"\} (\S+)$', re.M)
COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)
Snapshot = dict[str, dict[str, float]]  # model -> counter -> value


def snapshot(metrics_url: str) -> Snapshot:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values: Snapshot = {}
    for metric, model, value in SAMPLE.findall(text):
        if metric in COUNTERS:
            values.setdefault(model, {})[metric] = float(value)
    return values


def delta(before: Snapshot, after: Snapshot, model: str) -> dict[str, float]:
    return {key: after.get(model, {}).get(key, 0.0) - before.get(model, {}).get(key, 0.0) for key in COUNTERS}


def server_side(before: Snapshot, after: Snapshot, network: str, pipeline: Iterable[str]) -> dict[str, float]:
    """Average executed batch of the network step; queue and compute ms per request over the pipeline's steps.

    Triton charges a batch's compute time to every request in it, so compute per
    request is the time a request spent in execution, not CPU time divided by batch.
    """
    net = delta(before, after, network)
    steps = [delta(before, after, model) for model in pipeline]

    def per_request(key: str) -> float:
        return (
            sum(s[key] / s["nv_inference_request_success"] for s in steps if s["nv_inference_request_success"]) / 1000
        )

    return {
        "avg_batch": net["nv_inference_count"] / net["nv_inference_exec_count"]
        if net["nv_inference_exec_count"]
        else 0.0,
        "queue_ms": per_request("nv_inference_queue_duration_us"),
        "compute_ms": sum(
            per_request(f"nv_inference_compute_{part}_duration_us") for part in ("input", "infer", "output")
        ),
    }
