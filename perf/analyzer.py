"""perf_analyzer: argv from typed options, its CSV read through one column table.

Measurement settings (README, "Perf"): gRPC, synchronous clients at a fixed
concurrency, time windows of ``window_ms`` each, or windows of ``request_count``
answers where answers come in bursts (a batch of 32 generations finishes at
once: time windows would see 0 or 32 of them); a measurement is stable when
throughput and latency of three windows in a row are within
``stability_percent`` of their mean, tried at most ``max_trials`` windows.
Inputs come from a JSON data file of prompts of varied length, cycled.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tritonhf.server import GRPC_CONTROL_HEADER

PROMPTS = Path(__file__).with_name("prompts.json")  # prompts of varied length, cycled


def prompts() -> list[str]:
    return json.loads(PROMPTS.read_text())["prompts"]


def data_file(path: Path) -> Path:
    """perf_analyzer's input format: one entry per prompt, cycled."""
    path.write_text(json.dumps({"data": [{"prompt": [p]} for p in prompts()]}))
    return path


# perf_analyzer CSV column -> (our metric name, factor to our unit). Latencies arrive in us.
COLUMNS = {
    "Concurrency": ("concurrency", 1.0),
    "Inferences/Second": ("throughput_rps", 1.0),
    "Client Send": ("client_send_ms", 1e-3),
    "Server Queue": ("server_queue_ms", 1e-3),
    "Server Compute Input": ("server_compute_input_ms", 1e-3),
    "Server Compute Infer": ("server_compute_infer_ms", 1e-3),
    "Server Compute Output": ("server_compute_output_ms", 1e-3),
    "Client Recv": ("client_recv_ms", 1e-3),
    "p50 latency": ("p50_ms", 1e-3),
    "p90 latency": ("p90_ms", 1e-3),
    "p95 latency": ("p95_ms", 1e-3),
    "p99 latency": ("p99_ms", 1e-3),
    "Avg latency": ("avg_ms", 1e-3),
}


@dataclass(frozen=True)
class PerfOptions:
    model: str
    url: str  # gRPC host:port
    input_data: Path
    concurrency: int
    csv_path: Path
    window_ms: int = 4000
    request_count: int = 0  # > 0: windows of this many answers instead of window_ms (for answers that come in bursts)
    stability_percent: int = 20
    max_trials: int = 6
    streaming: bool = False  # gRPC streaming: required by decoupled (streaming) models
    profile_path: Path | None = None  # --profile-export-file: every request's send and response times and outputs
    control_key: str = ""  # TritonServer.control_key: perf_analyzer reads the model config, a restricted API
    request_rate: float = 0.0  # > 0: open loop, requests sent at this rate (Poisson arrivals) instead of concurrency

    def argv(self) -> list[str]:
        windows = (
            ["--measurement-mode", "count_windows", "--measurement-request-count", str(self.request_count)]
            if self.request_count
            else ["--measurement-mode", "time_windows", "--measurement-interval", str(self.window_ms)]
        )
        return [
            "perf_analyzer",
            "-m", self.model,
            "-u", self.url,
            "-i", "grpc",
            "--input-data", str(self.input_data),
            *self.load(),
            *windows,
            "--stability-percentage", str(self.stability_percent),
            "--max-trials", str(self.max_trials),
            "-f", str(self.csv_path),
            *(["--streaming"] if self.streaming else []),
            *(["--profile-export-file", str(self.profile_path)] if self.profile_path else []),
            # -H is sent as gRPC metadata too, whatever --help says (seen with 2.51)
            *(["-H", f"{GRPC_CONTROL_HEADER}:{self.control_key}"] if self.control_key else []),
        ]  # fmt: skip

    def load(self) -> list[str]:
        if self.request_rate:
            rate = f"{self.request_rate:g}"
            return ["--request-rate-range", f"{rate}:{rate}", "--request-distribution", "poisson"]
        return ["--concurrency-range", f"{self.concurrency}:{self.concurrency}"]


# A stability band no three windows can miss (perf_analyzer accepts any percentage): for runs whose
# figures don't come from the windows' averages (profile exports, tests of the plumbing), a noisy
# machine must not fail them.
ANY_WINDOWS = 1000


class PerfAnalyzerError(RuntimeError):
    pass


def parse(csv_path: Path) -> dict[str, float]:
    """The measurement's one row, as our metric names and units."""
    with csv_path.open() as handle:
        row = next(csv.DictReader(handle))
    return {
        name: float(row[column]) * factor
        for column, (name, factor) in COLUMNS.items()
        if row.get(column) not in (None, "")
    }


def measure(options: PerfOptions, env: dict[str, str], relaxed_percent: int = 50) -> dict[str, float]:
    """One measurement; if it won't stabilise or a window saw no answer (a shared, noisy machine), one retry with a
    wider band and windows twice as long, flagged."""
    retry = dataclasses.replace(options, stability_percent=relaxed_percent, window_ms=2 * options.window_ms)
    for attempt in (options, retry):
        if attempt.profile_path is not None:  # perf_analyzer won't overwrite one: an earlier try's, or measurement's
            attempt.profile_path.unlink(missing_ok=True)
        try:
            result = subprocess.run(attempt.argv(), env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as err:
            raise PerfAnalyzerError(f"perf_analyzer for {options.model} ran past {err.timeout:.0f} s") from err
        attempt.csv_path.with_suffix(".log").write_text(result.stdout + result.stderr)
        if result.returncode == 0 and attempt.csv_path.exists():
            return {**parse(attempt.csv_path), "stability_percent": attempt.stability_percent}
    raise PerfAnalyzerError(
        f"perf_analyzer failed for {options.model} at concurrency {options.concurrency}:\n"
        f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
    )
