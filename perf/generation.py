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

from tritonhf.perf.analyzer import ANY_WINDOWS, PerfOptions, measure

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


def profile_samples(path: Path) -> dict[str, list[float]]:
    """Per answered request (timestamps in ns in perf_analyzer's profile export): ttft_ms, e2e_ms, tokens, sent_s,
    done_s; itl_ms per gap."""
    requests = [
        r
        for experiment in json.loads(path.read_text())["experiments"]
        for r in experiment["requests"]
        if r["response_timestamps"]
    ]
    if not requests:
        raise ValueError(f"{path}: no answered requests")
    samples: dict[str, list[float]] = {key: [] for key in ("ttft_ms", "e2e_ms", "itl_ms", "tokens", "sent_s", "done_s")}
    for request in requests:
        times = request["response_timestamps"]
        counts = [int(output.get("new_tokens", 0)) for output in request["response_outputs"]]
        samples["ttft_ms"].append((times[0] - request["timestamp"]) / 1e6)
        samples["e2e_ms"].append((times[-1] - request["timestamp"]) / 1e6)
        samples["itl_ms"] += [
            (later - earlier) / 1e6 / n for earlier, later, n in zip(times, times[1:], counts[1:]) if n
        ]
        samples["tokens"].append(sum(counts))
        samples["sent_s"].append(request["timestamp"] / 1e9)
        samples["done_s"].append(times[-1] / 1e9)
    return samples


def profile_stats(path: Path) -> dict[str, float | None]:
    """Generation metrics over the measurement: throughput over its span, latencies' percentiles."""
    s = profile_samples(path)
    span_s = max(s["done_s"]) - min(s["sent_s"])
    return {
        "requests": len(s["tokens"]),
        "output_tokens_per_s": sum(s["tokens"]) / span_s,
        "requests_per_s": len(s["tokens"]) / span_s,
        "tokens_per_request": statistics.mean(s["tokens"]),
        "ttft_p50_ms": statistics.median(s["ttft_ms"]),
        "ttft_p95_ms": percentile(s["ttft_ms"], 0.95),
        "ttft_p99_ms": percentile(s["ttft_ms"], 0.99),
        "itl_p50_ms": statistics.median(s["itl_ms"]) if s["itl_ms"] else None,
        "itl_p99_ms": percentile(s["itl_ms"], 0.99) if s["itl_ms"] else None,
        "e2e_p50_ms": statistics.median(s["e2e_ms"]),
        "e2e_p99_ms": percentile(s["e2e_ms"], 0.99),
    }


def measure_mixed(
    model: str,
    streaming: bool,
    url: str,
    data: Path,
    concurrency: int,
    results: Path,
    env: dict[str, str],
    control_key: str = "",
) -> dict[str, float]:
    """One model under the mixed workload: windows of 2 x concurrency answers (16 at least), then the profile's metrics.

    Lengths differ from request to request, so a small window's average latency
    swings with which requests it caught; if the windows won't agree within 20%,
    the retry accepts any windows (flagged as stability_percent): the figures come
    from every request in the profile, not from the windows' averages.
    """
    stem = f"{model}.mixed.c{concurrency}"
    options = PerfOptions(
        model,
        url,
        data,
        concurrency,
        results / f"{stem}.csv",
        request_count=max(2 * concurrency, 16),
        streaming=streaming,
        profile_path=results / f"{stem}.profile.json",
        control_key=control_key,
    )
    measured = measure(options, env, relaxed_percent=ANY_WINDOWS)
    return {
        **profile_stats(options.profile_path),
        "stability_percent": measured["stability_percent"],
        "profile": str(options.profile_path),
    }
