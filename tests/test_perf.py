"""The perf suite's pieces: perf_analyzer for real against the test server, metrics, report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tritonhf.perf.analyzer import PerfOptions, measure
from tritonhf.perf.metrics import server_side, snapshot
from tritonhf.perf.report import plot, summary_markdown
from tritonhf.perf.suite import PROMPTS, Served, data_file, ratio
from tritonhf.server import TritonServer, find_installation

from .conftest import CLASSIFIER


def test_argv_is_built_from_the_options(tmp_path: Path) -> None:
    options = PerfOptions("m", "localhost:1", tmp_path / "d.json", 16, tmp_path / "r.csv", window_ms=3000)
    argv = options.argv()
    assert argv[:3] == ["perf_analyzer", "-m", "m"]
    assert argv[argv.index("--concurrency-range") + 1] == "16:16"
    assert argv[argv.index("--measurement-mode") + 1] == "time_windows"
    assert argv[argv.index("--measurement-interval") + 1] == "3000"
    assert argv[argv.index("-f") + 1] == str(tmp_path / "r.csv")
    counted = dataclasses.replace(options, request_count=64).argv()
    assert counted[counted.index("--measurement-mode") + 1] == "count_windows"
    assert counted[counted.index("--measurement-request-count") + 1] == "64" and "--measurement-interval" not in counted


def test_prompts_are_varied() -> None:
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    lengths = sorted(len(p.split()) for p in prompts)
    assert len(prompts) >= 16 and lengths[0] <= 2 and lengths[-1] >= 30


def test_pipeline_of_each_variant() -> None:
    assert Served(CLASSIFIER, CLASSIFIER, "text-classification", "python").pipeline == [CLASSIFIER]
    assert Served(f"{CLASSIFIER}_baseline", CLASSIFIER, "text-classification", "baseline").pipeline == [f"{CLASSIFIER}_baseline"]
    onnx = Served(f"{CLASSIFIER}_onnx", CLASSIFIER, "text-classification", "onnx")
    assert onnx.network == f"{CLASSIFIER}_onnx_model"
    assert onnx.pipeline == [f"{CLASSIFIER}_tokenize", f"{CLASSIFIER}_onnx_model", f"{CLASSIFIER}_postprocess"]


@pytest.mark.server
@pytest.mark.parametrize("variant", ["python", "onnx"])
def test_a_real_measurement(server: TritonServer, tmp_path: Path, variant: str) -> None:
    """perf_analyzer itself, against the session's server: argv, CSV and metrics agree."""
    served = Served(CLASSIFIER if variant == "python" else f"{CLASSIFIER}_{variant}", CLASSIFIER, "text-classification", variant)
    before = snapshot(server.metrics_url)
    options = PerfOptions(served.name, server.grpc_url, data_file(tmp_path / "data.json"), 4, tmp_path / "r.csv", window_ms=1500, stability_percent=50)
    measured = measure(options, find_installation().env)
    side = server_side(before, snapshot(server.metrics_url), served.network, served.pipeline)
    assert measured["concurrency"] == 4 and measured["throughput_rps"] > 0
    assert 0 < measured["p50_ms"] <= measured["p95_ms"] <= measured["p99_ms"]
    assert 1.0 <= side["avg_batch"] <= 32 and side["compute_ms"] > 0


def test_report_and_plot(tmp_path: Path) -> None:
    rows = [
        {"model": "m", "task": "t", "variant": v, "concurrency": c, "throughput_rps": rps, "p50_ms": 10.0, "p95_ms": 20.0 * c, "avg_batch": 1.0, "queue_ms": 1.0, "compute_ms": 5.0}
        for v, c, rps in [("baseline", 1, 10.0), ("python", 1, 12.0), ("baseline", 16, 10.0), ("python", 16, 30.0)]
    ]
    rows.append({"model": "m", "task": "t", "variant": "onnx", "concurrency": 16, "error": "Failed to obtain stable measurement."})
    for row in rows:
        row["vs_baseline"] = ratio(rows, row["model"], row["variant"], "baseline", row["concurrency"])
    assert rows[3]["vs_baseline"] == 3.0 and rows[4]["vs_baseline"] is None
    text = summary_markdown(rows, {"cpu": "x"}, [("python / baseline", 2.2, 3.0), ("int8 / python", 2.0, 1.5), ("gone", 1.0, None)], {})
    assert "| python | 16 | 30.0 |" in text and "3.00x" in text
    assert "| onnx | 16 | not measured: Failed to obtain stable measurement. |" in text
    assert "| python / baseline | >= 2.20 | 3.00 | met |" in text
    assert "| int8 / python | >= 2.00 | 1.50 | MISSED by 25% |" in text
    plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
