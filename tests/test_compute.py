"""The perf report's compute limit (perf/compute.py): the probe measures what this host computes natively, and a
request's work is counted exactly (a BERT layer's FLOPs by hand, against the counter)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from tritonhf.backends.python_hf.hardware import cpu_bf16
from tritonhf.perf import compute
from tritonhf.perf.report import compute_markdown

from .conftest import EMBEDDER


def test_the_probe_covers_the_native_precisions() -> None:
    limits = compute.limits()
    assert list(limits) == ["float32", *(["bfloat16"] if cpu_bf16() else []), "int8"]
    assert all(flops > 1e8 for flops in limits.values()), limits  # a tenth of a GFLOP/s: any CPU of this century


def test_a_request_is_counted_as_its_matmuls(tiny: dict[str, Path]) -> None:
    """all-MiniLM-L6-v2 (BERT): per layer, Q, K, V and the output projection (4 of h x h), scores and their use of
    the values (2 of L x L x h), the feed-forward (2 of h x i); then the pooler's h x h on the first token."""
    source = tiny[EMBEDDER]
    config, tokenizer = AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    prompts = ["the quick brown fox jumps over the lazy dog", "hello"]
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    by_hand = [
        n * (2 * 4 * length * h * h + 2 * 2 * length * length * h + 2 * 2 * length * h * i) + 2 * h * h
        for length in (len(tokenizer(p)["input_ids"]) for p in prompts)
    ]
    assert compute.request_flops(source, prompts) == sum(by_hand) / 2


def test_the_report_shows_each_variants_best_share() -> None:
    facts = {"compute limit": "float32 100 GFLOP/s, int8 400 GFLOP/s"}
    rows = [
        {"variant": v, "dtype": d, "concurrency": c, "throughput_rps": rps, "gflops": g, "share_of_limit": s}
        for v, d, c, rps, g, s in [
            ("python", "float32", 16, 50.0, 50.0, 0.5),
            ("python", "float32", 64, 60.0, 60.0, 0.6),
            ("onnx-int8", "int8", 64, 120.0, 120.0, 0.3),
        ]
    ]
    text = "\n".join(compute_markdown([*rows, {"variant": "baseline", "concurrency": 1}], facts))
    assert "float32 100 GFLOP/s, int8 400 GFLOP/s" in text
    assert "| python | float32 | 64 | 60.0 | 60 | 60% |\n| onnx-int8 | int8 | 64 | 120.0 | 120 | 30% |" in text
    assert compute_markdown([{"variant": "baseline"}], facts) == []
    assert compute.share(100.0, 2e9, 400e9) == 0.5
