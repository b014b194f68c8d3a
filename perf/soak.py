"""``tritonhf perf --soak``: a long run at high concurrency where every answer is checked.

perf_analyzer counts responses but never reads them, so the soak uses its own
asynchronous gRPC client: it keeps ``concurrency`` requests in flight for
``seconds``, checks each answer against that prompt's answer sent alone before
the run (same label, score within 1e-4), and samples the resident memory of
the server and its model processes. It passes when no request failed or went
unanswered and memory settled: the last third of the run grew less than 5%
over the middle third.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from tritonhf.server import TritonServer


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the server and its Python stubs)."""
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


@dataclass
class SoakReport:
    model: str
    concurrency: int
    seconds: float
    sent: int = 0
    answered: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    @property
    def memory_settled(self) -> bool:
        third = max(1, len(self.rss_mb) // 3)
        middle, last = self.rss_mb[third : 2 * third] or self.rss_mb, self.rss_mb[2 * third :] or self.rss_mb
        return max(last) <= 1.05 * max(middle)

    @property
    def passed(self) -> bool:
        return not self.errors and self.wrong == 0 and self.sent == self.answered and self.memory_settled

    def summary(self) -> str:
        return (
            f"soak {self.model}: {self.sent} sent, {self.answered} answered, {self.wrong} wrong, "
            f"{len(self.errors)} errors in {self.seconds:.0f} s "
            f"at concurrency {self.concurrency} ({self.answered / self.seconds:.1f} req/s); "
            f"server RSS {self.rss_mb[0]:.0f} -> {max(self.rss_mb):.0f} MB peak, "
            f"{self.rss_mb[-1]:.0f} MB at the end, settled: {self.memory_settled} -> "
            f"{'PASS' if self.passed else 'FAIL'}"
        )


def soak(
    server: TritonServer, model: str, prompts: list[str], concurrency: int = 64, seconds: float = 300.0
) -> SoakReport:
    client = grpcclient.InferenceServerClient(server.grpc_url)

    def request(text: str) -> list[grpcclient.InferInput]:
        tensor = grpcclient.InferInput("prompt", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        return [tensor]

    expected = {text: client.infer(model, request(text)) for text in prompts}
    expected = {text: (r.as_numpy("label")[0, 0], float(r.as_numpy("score")[0, 0])) for text, r in expected.items()}
    report = SoakReport(model, concurrency, seconds)
    lock, slots, stop = threading.Lock(), threading.Semaphore(concurrency), time.monotonic() + seconds

    def done(text: str, result: grpcclient.InferResult | None, error: Exception | None) -> None:
        with lock:
            report.answered += 1
            if error is not None:
                report.errors.append(str(error))
            elif (
                result.as_numpy("label")[0, 0] != expected[text][0]
                or abs(float(result.as_numpy("score")[0, 0]) - expected[text][1]) > 1e-4
            ):
                report.wrong += 1
        slots.release()

    next_sample, i = time.monotonic(), 0
    while time.monotonic() < stop:
        if time.monotonic() >= next_sample:
            report.rss_mb.append(process_tree_rss_mb(server.process.pid))
            next_sample += 5
        if slots.acquire(timeout=0.5):
            text = prompts[i % len(prompts)]
            client.async_infer(
                model, request(text), callback=lambda result, error, text=text: done(text, result, error)
            )
            report.sent, i = report.sent + 1, i + 1
    for _ in range(concurrency):  # wait for the last requests in flight
        slots.acquire(timeout=120)
    report.rss_mb.append(process_tree_rss_mb(server.process.pid))
    client.close()
    return report


def write(report: SoakReport, path: Path) -> None:
    path.write_text(json.dumps({**asdict(report), "errors": report.errors[:20], "passed": report.passed}, indent=1))
