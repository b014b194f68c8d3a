"""``tritonhf perf --soak``: a long run at high concurrency where every request is accounted for.

perf_analyzer counts responses but never reads them, so the soak uses its own
asynchronous gRPC client: it keeps ``concurrency`` requests in flight for
``seconds``, checks each answer against that prompt's answer sent alone before
the run (same label, score within 1e-4), counts every refusal by its status
code (a refused client waits ``RETRY_AFTER_S`` before its next request), and
samples the resident memory of the server and its model processes.
With ``kill_at`` it kills the model's backend process that many seconds in (what
the OOM killer does), under ``tritonhf serve``'s supervisor, and records the
readiness the server answered meanwhile and when the model served again.

It passes when every request was answered correctly or refused with a code the
situation allows (UNAVAILABLE for a full queue; around a kill, Triton's codes
for a model that is down or reloading), none went unanswered or wrong, and
memory settled: the last third of the run grew less than 5% over the middle third.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import tritonclient.grpc as grpcclient

from tritonhf.server import TritonServer


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the server and its Python stubs)."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # gone between listing and reading
            total += process.memory_info().rss
    return total / 2**20


RETRY_AFTER_S = 0.25  # a refused request's client waits this long before its next request
REFUSALS = {"StatusCode.UNAVAILABLE"}  # a full queue: the client may retry elsewhere
DOWN = {"StatusCode.NOT_FOUND", "StatusCode.INTERNAL"}  # a model being reloaded; a request inside the killed process
DOWN_MARGIN_S = 5.0  # answers to requests sent just before the model served again may arrive this much later


@dataclass
class SoakReport:
    model: str
    concurrency: int
    seconds: float
    sent: int = 0
    answered: int = 0  # correct answers
    wrong: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # status code -> count
    messages: list[str] = field(default_factory=list)  # the first refusal of each kind
    latency_ms: list[float] = field(default_factory=list)  # of the correct answers
    rss_mb: list[float] = field(default_factory=list)
    killed_at: float | None = None  # seconds into the run
    events: list[tuple[float, str]] = field(default_factory=list)  # (seconds into the run, supervisor event)
    readiness: list[tuple[float, bool, bool]] = field(default_factory=list)  # (s, model ready, server ready) changes
    down_refused_at: list[float] = field(default_factory=list)  # seconds into the run of each NOT_FOUND / INTERNAL

    @property
    def unanswered(self) -> int:
        return self.sent - self.answered - self.wrong - sum(self.refused.values())

    @property
    def memory_settled(self) -> bool:
        third = max(1, len(self.rss_mb) // 3)
        middle, last = self.rss_mb[third : 2 * third] or self.rss_mb, self.rss_mb[2 * third :] or self.rss_mb
        return max(last) <= 1.05 * max(middle)

    @property
    def down_explained(self) -> bool:
        """Every NOT_FOUND / INTERNAL fell between the kill and a moment after the supervisor said it serves again."""
        served = max((t for t, what in self.events if what == "serving"), default=None)
        if self.killed_at is None or served is None:
            return not self.down_refused_at
        return all(self.killed_at - 1 <= t <= served + DOWN_MARGIN_S for t in self.down_refused_at)

    @property
    def passed(self) -> bool:
        allowed = REFUSALS | DOWN
        settled = self.memory_settled and self.down_explained
        return not self.wrong and not self.unanswered and set(self.refused) <= allowed and settled

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latency_ms) or [float("nan")]
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self) -> str:
        """The report in a few lines: counts, latency and memory, and around a kill, what happened when."""
        refused = ", ".join(
            f"{count} {code.removeprefix('StatusCode.')}" for code, count in sorted(self.refused.items())
        )
        counts = (
            f"soak {self.model}: {self.sent} sent in {self.seconds:.0f} s at concurrency {self.concurrency}:"
            f" {self.answered} answered correctly ({self.answered / self.seconds:.1f} req/s), {self.wrong} wrong,"
            f" refused: {refused or 'none'}, unanswered: {self.unanswered}"
        )
        resources = (
            f"  answered latency p50 {self.percentile(0.5):.0f} ms, p99 {self.percentile(0.99):.0f} ms;"
            f" server RSS {self.rss_mb[0]:.0f} -> {self.rss_mb[-1]:.0f} MB (peak {max(self.rss_mb):.0f}),"
            f" settled: {self.memory_settled}"
        )
        lines = [counts, resources]
        if self.killed_at is not None:
            events = "; ".join(f"{what} at +{t - self.killed_at:.2f} s" for t, what in self.events)
            ready = ", ".join(f"+{t - self.killed_at:.2f} s: model {m}, server {s}" for t, m, s in self.readiness)
            lines += [
                f"  killed the model's process at {self.killed_at:.1f} s; supervisor: {events}",
                f"  readiness: {ready}",
            ]
        lines += [f"  first refusals: {self.messages}"] if self.messages else []
        lines += [] if self.down_explained else ["  NOT_FOUND / INTERNAL refusals outside the kill's window"]
        return "\n".join([*lines, "PASS" if self.passed else "FAIL"])


def soak(
    server: TritonServer,
    model: str,
    prompts: list[str],
    concurrency: int = 64,
    seconds: float = 300.0,
    kill_at: float | None = None,
) -> SoakReport:
    """Keep ``concurrency`` requests in flight; with ``kill_at``, kill the model's process then (supervised)."""
    from tritonhf.supervisor import Supervisor, stubs

    client = grpcclient.InferenceServerClient(server.grpc_url)

    def request(text: str) -> list[grpcclient.InferInput]:
        tensor = grpcclient.InferInput("prompt", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        return [tensor]

    expected = {text: client.infer(model, request(text)) for text in prompts}
    expected = {text: (r.as_numpy("label")[0, 0], float(r.as_numpy("score")[0, 0])) for text, r in expected.items()}
    report = SoakReport(model, concurrency, seconds)
    lock, slots = threading.Lock(), threading.Semaphore(concurrency)
    begin = time.monotonic()
    stop = begin + seconds

    def done(text: str, sent: float, result: grpcclient.InferResult | None, error: Exception | None) -> None:
        with lock:
            if error is not None:
                code = str(error.status()) if hasattr(error, "status") else type(error).__name__
                if code not in report.refused:
                    report.messages.append(f"{code}: {error}"[:200])
                report.refused[code] = report.refused.get(code, 0) + 1
                if code in DOWN:
                    report.down_refused_at.append(time.monotonic() - begin)
            elif (
                result.as_numpy("label")[0, 0] != expected[text][0]
                or abs(float(result.as_numpy("score")[0, 0]) - expected[text][1]) > 1e-4
            ):
                report.wrong += 1
            else:
                report.answered += 1
                report.latency_ms.append((time.monotonic() - sent) * 1000)
        if error is None:
            slots.release()
        else:  # a refused client backs off before it tries again, as a client with retries does
            threading.Timer(RETRY_AFTER_S, slots.release).start()

    def watch() -> None:
        while time.monotonic() < stop:
            state = (time.monotonic() - begin, server.ready(model), server.ready())
            if not report.readiness or report.readiness[-1][1:] != state[1:]:
                report.readiness.append(state)
            time.sleep(0.02)

    supervisor = Supervisor(server, on_event=lambda m, what: report.events.append((time.monotonic() - begin, what)))
    watcher = threading.Thread(target=watch, daemon=True)
    with supervisor:
        watcher.start()
        next_sample, i = time.monotonic(), 0
        while time.monotonic() < stop:
            now = time.monotonic()
            if now >= next_sample:
                report.rss_mb.append(process_tree_rss_mb(server.process.pid))
                next_sample += 5
            due = kill_at is not None and report.killed_at is None and now - begin >= kill_at
            # no stub yet (a native runtime, or a reload under way): try again at the next request
            if due and (victims := [stub for stub in stubs(server.process.pid) if stub.model == model]):
                os.kill(victims[0].pid, signal.SIGKILL)
                report.killed_at = time.monotonic() - begin
            if slots.acquire(timeout=0.5):
                text = prompts[i % len(prompts)]
                sent = time.monotonic()
                callback = lambda result, error, text=text, sent=sent: done(text, sent, result, error)  # noqa: E731 - bound per request
                client.async_infer(model, request(text), callback=callback, client_timeout=120)
                report.sent, i = report.sent + 1, i + 1
        for _ in range(concurrency):  # wait for the last requests in flight
            slots.acquire(timeout=150)
        watcher.join(timeout=5)
    report.rss_mb.append(process_tree_rss_mb(server.process.pid))
    client.close()
    return report


def write(report: SoakReport, path: Path) -> None:
    body = {**asdict(report), "latency_ms": None, "passed": report.passed, "unanswered": report.unanswered}
    body.update(p50_ms=report.percentile(0.5), p99_ms=report.percentile(0.99))
    path.write_text(json.dumps(body, indent=1))
