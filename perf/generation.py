"""Generation under a mixed workload: the static model against the streaming (continuous-batching) one.

Every request asks for its own ``max_new_tokens``, uniform in 8..64 (and the
same ``min_new_tokens``, so that a random-weight stand-in's EOS can't shorten
the work). perf_analyzer drives both models at one concurrency, the stream
with ``--streaming`` over gRPC, and ``--profile-export-file`` records each
request's send time and the arrival time and outputs of each of its
responses. From those, for every request: time to first token (first
response; for the static model, its only one), inter-token latency (gaps
between responses, per token they carry) and end-to-end latency; over the
measurement, output tokens/s = new tokens / (last answer - first request).
The model's own ``new_tokens`` output counts the tokens, not the text.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from tritonhf.perf.analyzer import PerfOptions, measure

MIXED_TOKENS = (8, 64)
ENTRIES = 64


def mixed_data(path: Path, prompts: list[str], seed: int = 0) -> Path:
    """perf_analyzer input data: prompts cycled, each with its own max_new_tokens (= min_new_tokens)."""
    rng = random.Random(seed)
    entries = []
    for i in range(ENTRIES):
        tokens = rng.randint(*MIXED_TOKENS)
        entries.append({"prompt": [prompts[i % len(prompts)]], "max_new_tokens": [tokens], "min_new_tokens": [tokens]})
    path.write_text(json.dumps({"data": entries}))
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def profile_stats(path: Path) -> dict[str, float]:
    """Generation metrics from perf_analyzer's profile export (timestamps in ns)."""
    requests = [r for experiment in json.loads(path.read_text())["experiments"] for r in experiment["requests"] if r["response_timestamps"]]
    if not requests:
        raise ValueError(f"{path}: no answered requests")
    ttft, itl, e2e, tokens = [], [], [], 0
    for request in requests:
        times = request["response_timestamps"]
        counts = [int(output.get("new_tokens", 0)) for output in request["response_outputs"]]
        ttft.append((times[0] - request["timestamp"]) / 1e6)
        e2e.append((times[-1] - request["timestamp"]) / 1e6)
        itl += [(later - earlier) / 1e6 / n for earlier, later, n in zip(times, times[1:], counts[1:]) if n]
        tokens += sum(counts)
    span_s = (max(r["response_timestamps"][-1] for r in requests) - min(r["timestamp"] for r in requests)) / 1e9
    return {
        "requests": len(requests),
        "output_tokens_per_s": tokens / span_s,
        "requests_per_s": len(requests) / span_s,
        "tokens_per_request": tokens / len(requests),
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p95_ms": percentile(ttft, 0.95),
        "itl_p50_ms": statistics.median(itl) if itl else None,
        "e2e_p50_ms": statistics.median(e2e),
    }


def measure_mixed(model: str, streaming: bool, url: str, data: Path, concurrency: int, results: Path, env: dict[str, str]) -> dict[str, float]:
    """One model under the mixed workload: windows of 2 x concurrency answers, then the profile's metrics."""
    stem = f"{model}.mixed.c{concurrency}"
    options = PerfOptions(model, url, data, concurrency, results / f"{stem}.csv", request_count=2 * concurrency, streaming=streaming, profile_path=results / f"{stem}.profile.json")
    measured = measure(options, env)
    return {**profile_stats(options.profile_path), "stability_percent": measured["stability_percent"]}
