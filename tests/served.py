"""``tritonhf serve`` as a pod runs it: the real CLI in a process and session of its own, on free ports, its stdout
and stderr kept in files; the probe answers read as the kubelet reads them."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tritonhf import kubernetes
from tritonhf.server import free_port
from tritonhf.sizing import read_facts
from tritonhf.storage import Files


def call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """One HTTP request to a local port: (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# Now and then tritonserver 2.51 itself aborts when a Python-backend stub is killed while it holds a mutex of the
# shared memory both use (Triton issues #4857, #8882; README, "Perf"): then serve exits, as it should.
UPSTREAM_ABORT = "terminate called after throwing an instance of 'boost::interprocess::lock_exception'"


class Serve:
    """One ``tritonhf serve`` process; ``ports`` by the container's port names (http, grpc, metrics, health)."""

    def __init__(self, repository: Path | str, workdir: Path, *args: str, name: str = "serve") -> None:
        self.ports = {port: free_port() for port in ("http", "grpc", "metrics", "health")}
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        argv = [sys.executable, "-m", "tritonhf", "serve", "--model-repository", str(repository)]
        argv += [arg for port, number in self.ports.items() for arg in (f"--{port}-port", str(number))]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen([*argv, *args], stdout=out, stderr=err, start_new_session=True)
        self.processes: set[psutil.Process] = set()  # the server leads a session of its own: found and followed

    def status(self, port: str, path: str, timeout: float = 3) -> int | None:
        """The HTTP status a GET gets; None if the port refuses (not listening yet, or any more)."""
        try:
            return call(self.ports[port], "GET", path, timeout=timeout)[0]
        except (OSError, http.client.HTTPException):
            return None

    def http_body(self, port: str, path: str, timeout: float = 3) -> str:
        """What a GET answers (status and body), for a failure's message."""
        try:
            status, body = call(self.ports[port], "GET", path, timeout=timeout)
        except (OSError, http.client.HTTPException) as err:
            return f"no answer: {err!r}"
        return f"{status} {body.decode(errors='replace')}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.status("health", "/v2/health/ready") != 200:
            if self.process.poll() is not None:
                pytest.fail(f"serve exited ({self.process.returncode}) while loading:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve not ready after {timeout:.0f} s:\n{self.output()}")
            time.sleep(0.1)
        self.follow()

    def follow(self) -> None:
        """Note every process under the CLI, so that none outlives the test."""
        with contextlib.suppress(psutil.Error):
            self.processes |= set(psutil.Process(self.process.pid).children(recursive=True))

    def events(self, stream: str = "err") -> list[dict]:
        """The JSON events written so far (``--log-format json``), each line one object."""
        path = self.err if stream == "err" else self.out
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def said(self, text: str) -> bool:
        return text in self.err.read_text(errors="replace")

    def terminate(self) -> float:
        """SIGTERM to the CLI itself, as the kubelet sends it; returns when it was sent."""
        self.follow()
        self.process.send_signal(signal.SIGTERM)
        return time.monotonic()

    def left(self) -> list[str]:
        """Processes of this serve still running (zombies don't run)."""
        return [
            " ".join(p.cmdline())[:100] for p in self.processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]

    def stop(self) -> None:
        """Whatever happened in the test, nothing of it lives on."""
        self.follow()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(60)
        for process in self.processes:
            with contextlib.suppress(psutil.Error):
                process.kill()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def aborted_upstream(self, timeout: float = 30) -> bool:
        """Whether serve exited, within ``timeout``, because tritonserver aborted in that race (its log: stderr)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        return self.process.poll() is not None and UPSTREAM_ABORT in self.err.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stderr ---\n{self.err.read_text()[-4000:]}\n--- stdout ---\n{self.out.read_text()[-4000:]}"


def generated_probes(repository: Path) -> dict[str, tuple[str, str]]:
    """What the generated Deployment's probes ask: probe -> (container port's name, path)."""
    facts = read_facts(Files(repository))
    deployment = kubernetes.base(facts, kubernetes.DeployOptions(), "cpu")["deployment.yaml"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    names = {port["containerPort"]: port["name"] for port in container["ports"]}
    return {
        kind: (names[container[kind]["httpGet"]["port"]], container[kind]["httpGet"]["path"])
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
