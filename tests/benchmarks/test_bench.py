"""pytest-benchmark latency benchmarks (``make bench``; ``make test`` runs each once, unmeasured).

- the in-process batched step of every variant at batch 1/8/32: the Python
  model's one forward, or an ensemble's steps run in this process;
- collect/pad/split alone, over an uneven batch of 32 requests;
- one request end to end through the real server, per variant;
- one decoding step of gpt2's running batch at 1/8/32 rows, and admitting one
  request into a running batch of 32 (prefill + cache join): the costs the
  streaming scheduler's admission rule trades.
Results are saved as JSON under perf/benchmarks; compare two runs with
``pytest-benchmark compare`` or ``--benchmark-compare``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonhf.backends.python_hf.batching import run_batch
from tritonhf.backends.python_hf.running_batch import RunningBatch
from tritonhf.backends.python_hf.tasks import TextGeneration, load_task
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.server import TritonServer
from tritonhf.variants import VARIANTS

from ..conftest import CLASSIFIER
from ..helpers import PROMPTS, alone, in_process

BATCHED = ("python", "onnx", "onnx-int8", "torchscript")


@pytest.fixture(scope="session")
def bench_models(request: pytest.FixtureRequest, tiny: dict[str, Path]) -> dict[str, Path]:
    if request.config.getoption("--bench-size") == "tiny":
        return tiny
    from tritonhf.standins import write_standins

    return write_standins(Path(".cache/standins"), "full")


@pytest.fixture(scope="session")
def bench_repository(bench_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    entries = plan([], [str(bench_models[CLASSIFIER])], [], 16)
    return build(entries, BuildOptions(output=tmp_path_factory.mktemp("bench") / "repo", variants=tuple(VARIANTS)))


@pytest.fixture(scope="session")
def bench_server(bench_repository: Path) -> Iterator[TritonServer]:
    with TritonServer(bench_repository) as server:
        yield server


def served_name(variant: str) -> str:
    return CLASSIFIER if variant == "python" else f"{CLASSIFIER}_{variant}"


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("variant", BATCHED)
def test_batched_step(benchmark: pytest.FixtureRequest, bench_repository: Path, variant: str, batch: int) -> None:
    run = in_process(bench_repository, served_name(variant))
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    benchmark.extra_info.update(variant=variant, batch=batch)
    outputs = benchmark(run, texts)
    assert outputs["label"].shape == (batch, 1) and outputs["score"].shape == (batch, 1)


def test_collect_pad_split_overhead(benchmark: pytest.FixtureRequest) -> None:
    """The data path alone, with a forward that does nothing: 32 requests of 1-3 rows."""
    prompts = [
        np.array([text.encode() for text in PROMPTS[: 1 + i % 3]], dtype=object).reshape(-1, 1) for i in range(32)
    ]

    def forward(texts: list[str]) -> dict[str, np.ndarray]:
        return {"n": np.zeros((len(texts), 1), dtype=np.float32)}

    results = benchmark(run_batch, forward, prompts)
    assert [len(r["n"]) for r in results] == [1 + i % 3 for i in range(32)]


@pytest.mark.server
@pytest.mark.parametrize("variant", ["baseline", *BATCHED])
def test_one_request_end_to_end(benchmark: pytest.FixtureRequest, bench_server: TritonServer, variant: str) -> None:
    name = served_name(variant)
    rows = [PROMPTS[3]]
    if variant == "baseline":  # unbatched: no batch axis
        from tritonhf.client import infer

        result = benchmark(infer, name, rows, bench_server.grpc_url, "grpc")
    else:
        result = benchmark(alone, bench_server, name, rows)
    assert result["label"].reshape(-1).shape == (1,)


@pytest.fixture(scope="session")
def bench_generator(bench_models: dict[str, Path]) -> TextGeneration:
    return load_task(str(bench_models["gpt2"]), "text-generation")


def running(model: TextGeneration, rows: int) -> RunningBatch:
    """A running batch of rows that won't finish within a benchmark's rounds."""
    batch = RunningBatch(model)
    batch.admit(
        [
            model.sequence(
                PROMPTS[i % len(PROMPTS)], model.parse_options({"max_new_tokens": 200, "min_new_tokens": 200})
            )
            for i in range(rows)
        ]
    )
    return batch


@pytest.mark.parametrize("rows", [1, 8, 32])
def test_decoding_step(benchmark: pytest.FixtureRequest, bench_generator: TextGeneration, rows: int) -> None:
    with torch.inference_mode():
        batch = running(bench_generator, rows)
        benchmark.extra_info.update(rows=rows)
        benchmark.pedantic(batch.step, rounds=20, warmup_rounds=2)
    lengths = {len(row.tokens) for row in batch.rows}
    assert len(lengths) == 1 and lengths.pop() > 1 and len(batch.rows) == rows, "one token a row a step"


def test_admitting_one_into_32(benchmark: pytest.FixtureRequest, bench_generator: TextGeneration) -> None:
    def setup() -> tuple[tuple, dict]:
        return (running(bench_generator, 32), [bench_generator.sequence(PROMPTS[5], bench_generator.defaults)]), {}

    def admit(batch: RunningBatch, new: list) -> RunningBatch:
        batch.admit(new)
        return batch

    with torch.inference_mode():
        batch = benchmark.pedantic(admit, setup=setup, rounds=5)
    assert len(batch.rows) == 33 and batch.cache.layers[0].keys.shape[0] == 33
