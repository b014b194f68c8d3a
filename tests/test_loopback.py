"""A Kubernetes Service in front of replicas, on loopback: the local stand-in for a cluster.

In a cluster, a Deployment runs N pods of ``tritonhf serve --model-repository s3://...``; each
pod's readinessProbe asks serve's own probe endpoint, and the Service (kube-proxy) sends new
connections only to pods whose probe passes. Here the same pieces run for real on 127.0.0.1,
nothing mocked: moto's S3 server holds a repository pushed by ``tritonhf build --output s3://``,
two ``tritonhf serve`` processes (each in a session of its own, like a pod) read it from there,
and haproxy plays the Service: its active health check is the generated Deployment's
readinessProbe (its path, on the port ``serve --health-port`` opens, its thresholds; the period
scaled down), and it retries nothing, as kube-proxy does not: the clients retry, on the policy
the README gives a Service's clients (RetryPolicy).

Proven here: a repository goes build -> push -> serve from object storage and answers as the
in-process model does, served from a verified local copy of the exact build (test_pushes.py: builds
are immutable and checked); when a replica is killed
outright (SIGKILL to every process of it, as the kernel's OOM killer or a lost node does), it
leaves the rotation within the check interval bound, clients that retry lose no request
and get no wrong answer, and a replica restarted from the same URI takes traffic again once its
readiness says so, not before; when one model's process is killed inside a replica under load,
the replica leaves the rotation while its supervisor heals the model and comes back, the same
clients again losing nothing.

Left to a real cluster: kube-proxy's own modes (iptables/IPVS pick an endpoint per
connection, at random), the endpoint controller's propagation delay, graceful pod deletion
(preStop, endpoints removed before SIGTERM), the kubelet's restarts and probe timing under
node load, cloud credentials from a Secret, and networks other than loopback.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tritonhf import cli, kubernetes, storage
from tritonhf.repo_builder import staging_for
from tritonhf.repository import local_files, sealed_id
from tritonhf.server import READY, free_port
from tritonhf.sizing import read_facts
from tritonhf.storage import BUILDS, POINTER
from tritonhf.supervisor import STUB, Stub, stubs

from .conftest import CLASSIFIER, S3
from .helpers import PROMPTS, in_process, until
from .served import call

pytestmark = [pytest.mark.server, pytest.mark.slow]

# The readiness check is the generated readinessProbe (readiness(), from tritonhf.kubernetes) with its periodSeconds
# divided by PERIOD_SCALE, so that a replica's fall is seen in a second, not in ten.
PERIOD_SCALE = 10
# The slack of the detection bounds (Check): for a loaded 2-core CI machine, where the replicas, the clients and
# haproxy share the cores.
SLACK_S = 1.5
SUPERVISOR_POLL_S = 0.25  # how often the supervisor looks at the model processes (README, Reliability)
CLIENTS = 8  # client threads, each with one request in flight
WARM_S, DOWN_S, REVIVED_S = 3.0, 3.0, 4.0  # load before the kill, after the replica left the rotation, after revival
SCORE_ATOL = 1e-5  # float32 scores under dynamic batching (padding) against the request run alone in process
READY_TIMEOUT_S = 90  # a tiny model from S3 is ready in about 6 s alone; two at once under load take longer
PREFIX = "prod/repo"
MODEL_PATH = f"/v2/models/{CLASSIFIER}/infer"


# --- the repository on object storage --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pushed(s3: S3, tiny: dict[str, Path]) -> tuple[str, Path]:
    """The classifier built and pushed through the real CLI: (its s3:// URI, the build's local copy)."""
    uri = s3.uri(PREFIX)
    argv = ["build", "--gen-models", "", "--class-models", str(tiny[CLASSIFIER]), "--variants", "python"]
    assert cli.main([*argv, "--instances", "1", "--dtype", "float32", "--output", uri]) == 0
    return uri, staging_for(uri)


@pytest.fixture(scope="module")
def expected(pushed: tuple[str, Path]) -> dict[str, tuple[str, float]]:
    """prompt -> (label, score), each prompt run alone in this process from the built repository."""
    run = in_process(pushed[1], CLASSIFIER)
    return {
        prompt: (out["label"][0, 0].decode(), float(out["score"][0, 0]))
        for prompt in PROMPTS
        for out in [run([prompt])]
    }


def test_build_output_s3_pushes_the_build(s3: S3, pushed: tuple[str, Path]) -> None:
    build = sealed_id(pushed[1])
    assert s3.keys(PREFIX) == {POINTER} | {f"{build}/{name}" for name in local_files(pushed[1])}


# --- replicas: `tritonhf serve` from the s3:// URI, each like a pod ----------------------------------------


class Replica:
    """One ``python -m tritonhf serve`` of the pushed repository, on ports of its own.

    Like a pod, it is the CLI, its tritonserver and the model's stub processes. The CLI leads a
    session of its own; so does the tritonserver it starts (server.py), so killing the replica as a
    whole means every process group under it, each noted while it was alive.

    Triton copies each model from object storage to ``/tmp/folderXXXXXX`` (fixed: TMPDIR is not
    read) and removes the copy when it unloads the model; a killed server leaves it behind. A pod's
    emptyDir would go with the pod (but survive a restart of its container); here the copies the
    replica's stubs ran from are removed once it is dead.
    """

    def __init__(self, name: str, uri: str, workdir: Path) -> None:
        self.name, self.uri, self.workdir = name, uri, workdir
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.health_port = free_port()  # serve's probes: a pod's readinessProbe asks this port
        self.process: subprocess.Popen[bytes] | None = None
        self.groups: set[int] = set()
        self.copies: set[Path] = set()  # Triton's copies of the models
        self.logs: list[Path] = []
        self.terminated = False

    def start(self) -> Replica:
        self.logs.append(self.workdir / f"{self.name}-{len(self.logs) + 1}.log")
        argv = [sys.executable, "-m", "tritonhf", "serve", "--model-repository", self.uri, "--grace", "5"]
        ports = ["--http-port", self.http_port, "--grpc-port", self.grpc_port, "--metrics-port", self.metrics_port]
        ports += ["--health-port", self.health_port]
        env = {**os.environ, "TMPDIR": str(self.workdir)}  # where the CLI puts the server's log
        with self.logs[-1].open("wb") as log:
            self.process = subprocess.Popen(
                [*argv, *map(str, ports)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.groups, self.terminated = {self.process.pid}, False
        return self

    def ready(self) -> bool:
        try:
            return call(self.health_port, "GET", READY, timeout=2)[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                pytest.fail(f"replica {self.name} exited ({self.process.returncode}) while loading:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"replica {self.name} not ready after {timeout:.0f} s:\n{self.output()}")
            time.sleep(0.1)
        self.track()

    def track(self) -> None:
        """Note the process groups under the CLI (its tritonserver leads one of its own) and the models' copies."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(OSError, psutil.Error):
                    self.groups.add(os.getpgid(child.pid))
                    argv = child.cmdline()
                    if len(argv) > 1 and Path(argv[0]).name == STUB:  # argv[1]: <copy>/<version>/model.py
                        copy = Path(argv[1]).parents[1]
                        if copy.parent == Path("/tmp") and copy.name.startswith("folder"):
                            self.copies.add(copy)

    def stubs(self) -> list[Stub]:
        """The model processes of the replica's tritonserver."""
        [server] = [p for p in psutil.Process(self.process.pid).children() if p.name() == "tritonserver"]
        return stubs(server.pid)

    def terminate(self) -> None:
        """SIGTERM, once, as at a pod's deletion: the CLI drains and stops its server."""
        if self.process is not None and self.process.poll() is None and not self.terminated:
            self.track()
            self.process.send_signal(signal.SIGTERM)
            self.terminated = True

    def kill(self) -> None:
        """SIGKILL to every process of the replica at once, as when a pod's container is killed."""
        self.track()
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 10
        while left := self.alive():
            assert time.monotonic() < deadline, f"replica {self.name} outlived SIGKILL: {left}"
            time.sleep(0.05)
        for copy in self.copies:
            shutil.rmtree(copy, ignore_errors=True)
        self.groups, self.copies = set(), set()  # all gone: their numbers may be reused

    def stop(self) -> None:
        """Terminate, wait for the drain, then make sure that nothing of the replica lives on."""
        if self.process is not None:
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
            self.kill()

    def alive(self) -> list[str]:
        """Processes left in the replica's groups (zombies not counted: nothing of them runs)."""
        left = []
        for process in psutil.process_iter(["pid", "status", "cmdline"]):
            with contextlib.suppress(OSError, psutil.Error):
                if os.getpgid(process.pid) in self.groups and process.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(process.info["cmdline"] or [])[:120])
        return left

    def output(self) -> str:
        """The CLI's output of each start, and the tritonserver log it names."""
        parts = []
        for log in self.logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"--- {log.name} ---\n{text[-3000:]}")
            for server_log in re.findall(r"\(log: (\S+)\)", text)[:1]:
                server_text = Path(server_log).read_text(errors="replace") if Path(server_log).exists() else ""
                parts.append(f"--- {server_log} ---\n{server_text[-3000:]}")
        return "\n".join(parts)


def infer_body(prompt: str) -> bytes:
    """A KServe v2 (Triton HTTP) inference request for one prompt."""
    tensor = {"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]}
    return json.dumps({"inputs": [tensor]}).encode()


def answer(body: bytes) -> tuple[str, float]:
    outputs = {output["name"]: output["data"] for output in json.loads(body)["outputs"]}
    return outputs["label"][0], float(outputs["score"][0])


def agrees(got: tuple[str, float], want: tuple[str, float]) -> bool:
    return got[0] == want[0] and abs(got[1] - want[1]) <= SCORE_ATOL


@pytest.fixture(scope="module")
def replicas(
    pushed: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Replica, Replica]]:
    """Two replicas of the pushed repository, started together; stopped, every process of them, at the end."""
    workdir = tmp_path_factory.mktemp("replicas")
    pair = (Replica("a", pushed[0], workdir), Replica("b", pushed[0], workdir))
    failed_before = request.session.testsfailed
    try:
        for replica in pair:
            replica.start()
        for replica in pair:
            replica.wait_ready()
        yield pair
    finally:
        for replica in pair:  # both drain at once
            replica.terminate()
        with contextlib.ExitStack() as stops:  # every stop runs, whatever one of them raises; then the logs
            stops.callback(show_logs, pair, request, failed_before)
            for replica in pair:
                stops.callback(replica.stop)


def show_logs(pair: tuple[Replica, ...], request: pytest.FixtureRequest, failed_before: int) -> None:
    if request.session.testsfailed > failed_before:
        for replica in pair:
            print(f"\n--- replica {replica.name} ---\n{replica.output()}")


def test_serve_from_object_storage_answers_as_in_process(
    replicas: tuple[Replica, Replica], expected: dict[str, tuple[str, float]], pushed: tuple[str, Path]
) -> None:
    build = sealed_id(pushed[1])
    for replica in replicas:
        log = replica.logs[-1].read_text()
        assert f"build {pushed[0]}/{build}: " in log, log  # downloaded, or the other replica's copy reused
        assert f"starting tritonserver on {replica.workdir / BUILDS / build} " in log, log
        for prompt, want in expected.items():
            status, body = call(replica.http_port, "POST", MODEL_PATH, infer_body(prompt))
            assert status == 200, body
            assert agrees(answer(body), want), (replica.name, prompt, answer(body), want)


def test_a_model_served_from_object_storage_heals(
    replicas: tuple[Replica, Replica], expected: dict[str, tuple[str, float]]
) -> None:
    """The supervisor finds the stubs of models served from the verified copy of the build, and heals them."""
    replica = replicas[1]
    (server,) = [p for p in psutil.Process(replica.process.pid).children() if p.name() == "tritonserver"]
    (stub,) = stubs(server.pid)
    assert stub.model == CLASSIFIER and f"/{BUILDS}/" in psutil.Process(stub.pid).cmdline()[1]
    os.kill(stub.pid, signal.SIGKILL)
    until(lambda: "serving again" in replica.logs[-1].read_text(), timeout=60, what="the supervisor to heal it")
    until(replica.ready, timeout=30, what="readiness")
    prompt = PROMPTS[0]
    status, body = call(replica.http_port, "POST", MODEL_PATH, infer_body(prompt))
    assert status == 200 and agrees(answer(body), expected[prompt]), body
    replica.track()


# --- haproxy: the Service and its readiness checks --------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """haproxy's health check, as the generated Deployment's readinessProbe sets it: its path (asked on the
    replica's ``--health-port``), periodSeconds / PERIOD_SCALE, failureThreshold, successThreshold."""

    path: str
    inter_s: float
    fall: int
    rise: int

    @property
    def in_rotation_bound_s(self) -> float:
        """A dead replica is out of rotation within (fall + 1) checks: the last passing check came at most just
        before its death, the next comes within inter_s and fails at once (the port refuses), and fall - 1 more
        follow, inter_s apart; one more inter_s covers the checks' scheduling and the 50 ms sampling of haproxy's
        state; then the slack."""
        return (self.fall + 1) * self.inter_s + SLACK_S

    @property
    def healing_bound_s(self) -> float:
        """A replica healing a model: its supervisor sees the death within a poll, its readiness turns false, and
        the checks fail as above."""
        return SUPERVISOR_POLL_S + self.in_rotation_bound_s

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy.for_probe(self.inter_s, self.fall)


@pytest.fixture(scope="module")
def check(pushed: tuple[str, Path]) -> Check:
    """The readinessProbe of the Deployment ``tritonhf deploy`` generates for the pushed repository."""
    options = kubernetes.DeployOptions(model_repository=pushed[0])
    objects = kubernetes.base(read_facts(storage.Files(pushed[1])), options, "cpu")
    [container] = objects["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    probe, args = container["readinessProbe"], container["args"]
    assert args[args.index("--health-port") + 1] == str(probe["httpGet"]["port"]), "the probe asks serve's probes"
    period = probe["periodSeconds"] / PERIOD_SCALE
    return Check(probe["httpGet"]["path"], period, probe["failureThreshold"], probe.get("successThreshold", 1))


@pytest.fixture(scope="module")
def haproxy() -> str:
    """The haproxy binary; a missing one fails the tests that need it, never skips them."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")  # sbin: not on PATH
    if found is None:
        pytest.fail("haproxy is not installed: apt-get install haproxy (or make setup)")
    return found


class Balancer:
    """haproxy in the foreground: one frontend on loopback, the replicas behind it, checked on readiness.

    ``retries 0`` and no ``option redispatch``: a request sent to a dead replica fails back to
    the client, as through kube-proxy. State is read from the stats socket (``show stat``).
    """

    def __init__(self, binary: str, replicas: Sequence[Replica], check: Check, workdir: Path) -> None:
        self.port, self.socket = free_port(), workdir / "haproxy.sock"
        backends = "\n".join(
            f"    server {r.name} 127.0.0.1:{r.http_port} check port {r.health_port}" for r in replicas
        )
        config = f"""
global
    stats socket {self.socket} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 0

frontend service
    bind 127.0.0.1:{self.port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk
    http-check send meth GET uri {check.path}
    http-check expect status 200
    default-server inter {round(check.inter_s * 1000)}ms fall {check.fall} rise {check.rise}
{backends}
"""
        path = workdir / "haproxy.cfg"
        path.write_text(config)
        self.log_path = workdir / "haproxy.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stat(self) -> dict[str, dict[str, str]]:
        """The backend's servers by name: haproxy's ``show stat`` row for each (status, stot, econ, eresp, ...)."""
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(str(self.socket))
            client.sendall(b"show stat\n")
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
        rows = csv.DictReader(io.StringIO(b"".join(chunks).decode().lstrip("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas" and row["svname"] != "BACKEND"}

    def wait_up(self, names: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):  # the socket is not there yet
                if all(self.stat().get(name, {}).get("status") == "UP" for name in names):
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"haproxy did not see {names} up within {timeout} s:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Poller(threading.Thread):
    """haproxy's view every 50 ms: each server's status changes, with when they were seen, and every sample."""

    def __init__(self, balancer: Balancer) -> None:
        super().__init__(daemon=True)
        self.balancer, self.stopping = balancer, threading.Event()
        self.changes: list[tuple[float, str, str]] = []  # (when, server, status)
        self.rows: dict[str, dict[str, str]] = {}
        self.samples: list[tuple[float, dict[str, dict[str, str]]]] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(OSError):
                rows, now = self.balancer.stat(), time.monotonic()
                for name, row in rows.items():
                    if name not in self.rows or self.rows[name]["status"] != row["status"]:
                        self.changes.append((now, name, row["status"]))
                self.rows = rows
                self.samples.append((now, rows))
            time.sleep(0.05)

    def first(self, name: str, states: tuple[str, ...], after: float) -> float | None:
        """When the server was first seen in one of ``states`` after a time (DOWN: out of rotation; UP: in)."""
        return next((t for t, n, s in self.changes if n == name and t > after and s in states), None)

    def sessions_while_down(self, name: str, start: float, end: float) -> int:
        """The sessions haproxy gave the server from its first to its last sample as DOWN between two times."""
        down = [rows[name] for t, rows in self.samples if start <= t < end and rows[name]["status"].startswith("DOWN")]
        return int(down[-1]["stot"] or 0) - int(down[0]["stot"] or 0) if down else 0

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


# --- clients that retry on the README's policy ------------------------------------------------------------

# Triton's answers while a model is being reloaded: not loaded (HTTP 404 in 2.51), or its process died (HTTP 500)
RELOADING = ("has no available versions", "is not ready", "is not healthy")


@dataclass(frozen=True)
class RetryPolicy:
    """The README's advice to a Service's clients: retry what a replica that can't serve answers (a refused or reset
    connection, HTTP 5xx, or Triton's answer for a model being reloaded), half a probe period later, doubling,
    until the waits add up to periodSeconds x (failureThreshold + 2): the longest such a replica may stay in
    rotation, and a period more for the endpoints to change. An immediate retry is not enough behind a Service
    that retries nothing: until the checks fail the replica is still picked, the more often as it answers at once
    (seen here with immediate retries: about half of them met the dead replica again)."""

    delays: tuple[float, ...]  # before each retry

    @classmethod
    def for_probe(cls, period_s: float, failures: int) -> RetryPolicy:
        delays: list[float] = []
        while sum(delays) < period_s * (failures + 2):
            delays.append(period_s / 2 * 2 ** len(delays))
        return cls(tuple(delays))

    @staticmethod
    def retryable(status: int, body: bytes) -> bool:
        return status >= 500 or any(text.encode() in body for text in RELOADING)


@dataclass
class Sent:
    """One client request: its span, why each failed attempt failed, its answer (None: lost)."""

    prompt: str
    start: float
    end: float = 0.0
    failures: list[tuple[float, str]] = field(default_factory=list)  # (when, why)
    got: tuple[str, float] | None = None

    @property
    def lost(self) -> bool:
        return self.got is None


class Clients:
    """CLIENTS threads sending inference requests through the balancer, back to back, each on a keep-alive
    connection of its own; a request that fails retryably is sent again on a fresh connection, on the policy."""

    def __init__(self, port: int, policy: RetryPolicy) -> None:
        self.port, self.policy, self.stopping = port, policy, threading.Event()
        self.sent: list[Sent] = []
        self.threads = [threading.Thread(target=self.loop, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def loop(self, index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        number = index
        while not self.stopping.is_set():
            prompt = PROMPTS[number % len(PROMPTS)]
            number += CLIENTS
            sent = Sent(prompt, time.monotonic())
            for delay in (0.0, *self.policy.delays):
                time.sleep(delay)
                try:
                    connection.request("POST", MODEL_PATH, infer_body(prompt), {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    body = response.read()
                    if response.status == 200:
                        try:
                            sent.got = answer(body)
                        except (ValueError, KeyError, IndexError):  # answered, but not a classification: lost
                            sent.failures.append((time.monotonic(), f"bad answer: {body[:200]!r}"))
                        break
                    why = " ".join([f"HTTP {response.status}", *(t for t in RELOADING if t.encode() in body)])
                    if not self.policy.retryable(response.status, body):  # wrong, and not to be retried
                        sent.failures.append((time.monotonic(), f"{why}: {body[:200]!r}"))
                        break
                except (OSError, http.client.HTTPException) as err:
                    why = type(err).__name__
                connection.close()  # the retry opens a fresh one
                sent.failures.append((time.monotonic(), why))
            sent.end = time.monotonic()
            self.sent.append(sent)
        connection.close()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in self.threads), "a client hung"

    def between(self, start: float, end: float) -> list[Sent]:
        return [sent for sent in self.sent if start <= sent.start < end]

    def outcome(self, expected: dict[str, tuple[str, float]]) -> dict[str, Any]:
        """Requests, retried, lost and wrong (with the first few), and why attempts failed."""
        retried, lost = [s for s in self.sent if s.failures], [s for s in self.sent if s.lost]
        wrong = [
            (s.prompt, s.got, expected[s.prompt]) for s in self.sent if s.got and not agrees(s.got, expected[s.prompt])
        ]
        return {
            "requests": len(self.sent),
            "retried": len(retried),
            "retries": sum(len(s.failures) for s in retried) - len(lost),  # a lost request's last failure: no retry
            "lost": len(lost),
            "wrong": len(wrong),
            "failures": sorted({why for s in retried for _, why in s.failures}),
            "lost_first": [s.failures for s in lost[:5]],
            "wrong_first": wrong[:5],
        }


@contextlib.contextmanager
def service(
    binary: str, replicas: Sequence[Replica], check: Check, workdir: Path
) -> Iterator[tuple[Balancer, Poller, Clients]]:
    """haproxy in front of the replicas once both are in rotation, its state sampled, the clients sending."""
    with contextlib.ExitStack() as stack:
        balancer = Balancer(binary, replicas, check, workdir)
        stack.callback(balancer.stop)
        balancer.wait_up([r.name for r in replicas])
        poller = Poller(balancer)
        poller.start()
        stack.callback(poller.stop)
        clients = Clients(balancer.port, check.retry)
        stack.callback(clients.stop)
        yield balancer, poller, clients


def report(capsys: pytest.CaptureFixture[str], what: str, figures: dict[str, Any]) -> None:
    """The figures on the terminal, and as JSON where TRITONHF_FAILOVER_REPORT names a file (one key per test)."""
    with capsys.disabled():
        print(f"\n{what}: {json.dumps(figures)}")
    if path := os.environ.get("TRITONHF_FAILOVER_REPORT"):
        earlier = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        Path(path).write_text(json.dumps({**earlier, what: figures}, indent=2) + "\n")


def delta(after: dict[str, dict[str, str]], before: dict[str, dict[str, str]], name: str, column: str) -> int:
    return int(after[name][column] or 0) - int(before[name][column] or 0)


def test_a_killed_replica_leaves_the_rotation_and_comes_back(
    replicas: tuple[Replica, Replica],
    expected: dict[str, tuple[str, float]],
    haproxy: str,
    check: Check,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    victim, survivor = replicas
    with service(haproxy, replicas, check, tmp_path) as (balancer, poller, clients):
        time.sleep(WARM_S)
        loaded = poller.rows
        killed_at = time.monotonic()
        victim.kill()
        until(lambda: poller.first(victim.name, ("DOWN",), killed_at), timeout=30, what="haproxy to mark it DOWN")
        down_at = poller.first(victim.name, ("DOWN",), killed_at)
        at_down = poller.rows
        time.sleep(DOWN_S)
        while_down = balancer.stat()

        restarted_at = time.monotonic()
        victim.start()
        until(
            lambda: poller.first(victim.name, ("UP",), restarted_at) or victim.process.poll() is not None,
            timeout=READY_TIMEOUT_S,
            what="the restarted replica to be UP again in haproxy",
        )
        assert victim.process.poll() is None, f"the restarted replica exited:\n{victim.output()}"
        victim.track()
        back_at = poller.first(victim.name, ("UP",), restarted_at)
        revived = balancer.stat()
        time.sleep(REVIVED_S)
        final = balancer.stat()
        ended = time.monotonic()
    outcome = clients.outcome(expected)
    retried = [s for s in clients.sent if s.failures]
    in_rotation_s = down_at - killed_at
    after_revival = {r.name: delta(final, revived, r.name, "stot") for r in replicas}
    figures = {
        **outcome,
        "in_rotation_s": round(in_rotation_s, 3),
        "in_rotation_bound_s": check.in_rotation_bound_s,
        "retry_delays_s": check.retry.delays,
        "check": {"path": check.path, "inter_s": check.inter_s, "fall": check.fall, "rise": check.rise},
        "clients": CLIENTS,
        "before_kill": {r.name: int(loaded[r.name]["stot"]) for r in replicas},  # haproxy started with the load
        "dead_replica_after_kill": {
            "sessions": delta(at_down, loaded, victim.name, "stot"),
            "econ": delta(at_down, loaded, victim.name, "econ"),
            "eresp": delta(at_down, loaded, victim.name, "eresp"),
        },
        "dead_replica_once_down": delta(while_down, at_down, victim.name, "stot"),
        "restart_to_up_s": round(back_at - restarted_at, 2),
        "after_revival": after_revival,
        "requests_per_s": round(outcome["requests"] / (ended - started), 1),
        "duration_s": round(time.monotonic() - started, 1),
    }
    report(capsys, "failover", figures)

    assert not outcome["lost"], figures
    assert not outcome["wrong"], figures
    assert retried, "the kill cost no request a retry: did the killed replica take traffic?"
    assert in_rotation_s <= check.in_rotation_bound_s, figures
    assert figures["dead_replica_once_down"] == 0, "haproxy sent the replica requests after marking it DOWN"
    # Only the kill's window costs retries: requests already sent to the dead replica, and those haproxy
    # sent it until its checks failed; none while it comes back (haproxy waits for its readiness).
    first, last = min(s.failures[0][0] for s in retried), max(s.failures[0][0] for s in retried)
    assert killed_at <= first and last <= down_at + check.inter_s, (killed_at, first, last, down_at)
    warm = clients.between(started, killed_at)
    assert figures["before_kill"][victim.name] >= 0.2 * len(warm), figures
    assert after_revival[victim.name] >= 0.2 * sum(after_revival.values()), figures
    assert survivor.process.poll() is None


def test_a_model_killed_inside_a_replica_heals_out_of_rotation(
    replicas: tuple[Replica, Replica],
    expected: dict[str, tuple[str, float]],
    haproxy: str,
    check: Check,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The replica stays; one model's process in it is killed under load. Its supervisor heals the model, its
    readiness is false meanwhile, so the Service takes it out of rotation and back once healed; the clients,
    retrying on the policy, lose nothing and get no wrong answer."""
    healing, other = replicas
    healed_before = healing.logs[-1].read_text().count("serving again")
    with service(haproxy, replicas, check, tmp_path) as (balancer, poller, clients):
        time.sleep(WARM_S)
        loaded = poller.rows
        [stub] = healing.stubs()
        killed_at = time.monotonic()
        os.kill(stub.pid, signal.SIGKILL)
        until(lambda: poller.first(healing.name, ("DOWN",), killed_at), timeout=30, what="haproxy to mark it DOWN")
        down_at = poller.first(healing.name, ("DOWN",), killed_at)
        until(lambda: poller.first(healing.name, ("UP",), down_at), timeout=READY_TIMEOUT_S, what="it to be UP again")
        up_at = poller.first(healing.name, ("UP",), down_at)
        back = balancer.stat()
        time.sleep(REVIVED_S)
        final = balancer.stat()
    outcome = clients.outcome(expected)
    figures = {
        **outcome,
        "detected_s": round(down_at - killed_at, 3),
        "detection_bound_s": check.healing_bound_s,
        "out_of_rotation_s": round(up_at - down_at, 2),
        "retry_delays_s": check.retry.delays,
        "heals": healing.logs[-1].read_text().count("serving again") - healed_before,
        "before_kill": {r.name: int(loaded[r.name]["stot"]) for r in replicas},
        "sessions_while_down": poller.sessions_while_down(healing.name, down_at, up_at),
        "after_heal": {r.name: delta(final, back, r.name, "stot") for r in replicas},
        "other_replica": sorted({s for t, n, s in poller.changes if n == other.name}),
    }
    report(capsys, "heal in rotation", figures)

    assert not outcome["lost"], figures
    assert not outcome["wrong"], figures
    assert outcome["retried"], "the kill cost no request a retry: did the healing replica take traffic?"
    assert figures["detected_s"] <= check.healing_bound_s, figures
    assert figures["heals"] == 1 and healing.process.poll() is None, "healed once, in the same replica"
    assert figures["sessions_while_down"] == 0, "haproxy sent the healing replica requests while it was DOWN"
    assert figures["other_replica"] == ["UP"], "the other replica stayed in rotation"
    assert figures["after_heal"][healing.name] >= 0.2 * sum(figures["after_heal"].values()), figures
