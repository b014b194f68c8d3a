"""A Kubernetes Service in front of replicas, on loopback: the local stand-in for a cluster.

In a cluster, a Deployment runs N pods of ``tritonhf serve --model-repository s3://...``; each
pod's readinessProbe asks ``/v2/health/ready``, and the Service (kube-proxy) sends new
connections only to pods whose probe passes. Here the same pieces run for real on 127.0.0.1,
nothing mocked: moto's S3 server holds a repository pushed by ``tritonhf build --output s3://``,
two ``tritonhf serve`` processes (each in a session of its own, like a pod) read it from there,
and haproxy plays the Service: its active health check on ``/v2/health/ready`` is the
readinessProbe (INTER_S = periodSeconds, FALL = failureThreshold, RISE = successThreshold), and
it retries nothing, as kube-proxy does not: the clients retry once.

Proven here: a repository goes build -> push -> serve from object storage and answers as the
in-process model does; a push removes what the new build lacks; when a replica is killed
outright (SIGKILL to every process of it, as the kernel's OOM killer or a lost node does), it
leaves the rotation within the check interval bound, clients that retry once lose no request
and get no wrong answer, and a replica restarted from the same URI takes traffic again once its
readiness says so, not before.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tritonhf import TritonHFError, cli
from tritonhf.repo_builder import staging_for
from tritonhf.repository import MARKER
from tritonhf.server import free_port
from tritonhf.storage import PUSHING, local_files, push
from tritonhf.supervisor import STUB, stubs

from .conftest import CLASSIFIER, S3
from .helpers import PROMPTS, in_process, until

pytestmark = [pytest.mark.server, pytest.mark.slow]

# The readiness check, as a readinessProbe sets it: periodSeconds, failureThreshold, successThreshold.
INTER_S, FALL, RISE = 0.5, 2, 2
# Out of rotation within (FALL + 1) * INTER_S of the kill: the last passing check came at most just before it, the
# next one comes within INTER_S and fails at once (the port refuses), and FALL - 1 more follow, INTER_S apart; one
# more INTER_S covers the scheduling of the checks and the 50 ms sampling of haproxy's state. The slack is for a
# loaded 2-core CI machine, where the replicas, the clients and haproxy share the cores.
SLACK_S = 1.5
IN_ROTATION_BOUND_S = (FALL + 1) * INTER_S + SLACK_S
# A client's one retry waits out that bound. An immediate retry is not enough behind a Service that retries
# nothing: until the checks fail, the dead replica is still picked, and it is picked the more often because it
# refuses at once (kube-proxy's random pick per connection is no better). Measured here with immediate retries:
# about half of them met the dead replica again and were lost. So the retry policy a client needs follows from
# the probe: a backoff longer than periodSeconds * (failureThreshold + 1), plus the endpoints' propagation.
RETRY_AFTER_S = IN_ROTATION_BOUND_S
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


def test_a_push_deletes_what_the_new_build_lacks(s3: S3, pushed: tuple[str, Path], tmp_path: Path) -> None:
    local = pushed[1]
    assert s3.keys(PREFIX) == set(local_files(local)), "build --output s3:// uploaded exactly the build"
    repository = tmp_path / "repo"
    shutil.copytree(local, repository, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repository / CLASSIFIER, repository / "retired")
    target = s3.uri("prune/repo")
    assert push(repository, target) == len(local_files(repository))
    assert s3.keys("prune/repo") == set(local_files(repository))
    s3.client().put_object(Bucket=s3.bucket, Key="prune/repo-next/keep", Body=b"a neighbour sharing the prefix's text")
    shutil.rmtree(repository / "retired")
    since = s3.log.stat().st_size
    push(repository, target)
    assert s3.keys("prune/repo") == set(local_files(repository)), "the removed model's objects were deleted"
    assert s3.keys("prune/repo-next") == {"keep"}, "a push deletes under its own prefix only"
    assert s3.keys(PREFIX) == set(local_files(local))
    # As the S3 server saw it: a push under way is marked first, then the earlier manifest goes, the new one
    # comes last, so that no manifest vouched for the prefix while it held a mix of both builds.
    manifest, pushing = (f"/{s3.bucket}/prune/repo/{name}" for name in (MARKER, PUSHING))
    until(lambda: ("DELETE", pushing) in s3.writes(since), timeout=10, what="the server to log the push's end")
    writes = s3.writes(since)
    assert writes[:2] == [("PUT", pushing), ("DELETE", manifest)], writes
    assert writes[-2:] == [("PUT", manifest), ("DELETE", pushing)], writes
    assert ("POST", f"/{s3.bucket}?delete") in writes, "the stale objects went in one bulk delete"


def test_serve_refuses_a_repository_being_pushed(s3: S3, capsys: pytest.CaptureFixture[str]) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key=f"halfway/{PUSHING}", Body=b"{}")
    assert cli.main(["serve", "--model-repository", s3.uri("halfway")]) == 1
    assert "a push is under way" in capsys.readouterr().err


def test_a_push_never_replaces_what_it_did_not_push(s3: S3, pushed: tuple[str, Path]) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key="shared/notes.txt", Body=b"someone else's")
    for target in (f"s3://{s3.endpoint}/{s3.bucket}", s3.uri("shared")):  # the bucket's root; a foreign prefix
        with pytest.raises(TritonHFError, match="prefix"):
            push(pushed[1], target)
    assert s3.keys("shared") == {"notes.txt"}


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
        self.process: subprocess.Popen[bytes] | None = None
        self.groups: set[int] = set()
        self.copies: set[Path] = set()  # Triton's copies of the models
        self.logs: list[Path] = []
        self.terminated = False

    def start(self) -> Replica:
        self.logs.append(self.workdir / f"{self.name}-{len(self.logs) + 1}.log")
        argv = [sys.executable, "-m", "tritonhf", "serve", "--model-repository", self.uri, "--grace", "5"]
        ports = ["--http-port", self.http_port, "--grpc-port", self.grpc_port, "--metrics-port", self.metrics_port]
        env = {**os.environ, "TMPDIR": str(self.workdir)}  # where the CLI puts the server's log
        with self.logs[-1].open("wb") as log:
            self.process = subprocess.Popen(
                [*argv, *map(str, ports)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.groups, self.terminated = {self.process.pid}, False
        return self

    def ready(self) -> bool:
        try:
            return call(self.http_port, "GET", "/v2/health/ready", timeout=2)[0] == 200
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


def call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


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
    replicas: tuple[Replica, Replica], expected: dict[str, tuple[str, float]]
) -> None:
    for replica in replicas:
        assert "starting tritonserver on s3://" in replica.logs[-1].read_text()
        for prompt, want in expected.items():
            status, body = call(replica.http_port, "POST", MODEL_PATH, infer_body(prompt))
            assert status == 200, body
            assert agrees(answer(body), want), (replica.name, prompt, answer(body), want)


def test_a_model_served_from_object_storage_heals(
    replicas: tuple[Replica, Replica], expected: dict[str, tuple[str, float]]
) -> None:
    """The supervisor finds the stubs of models the server copied from S3 to a random directory, and heals them."""
    replica = replicas[1]
    (server,) = [p for p in psutil.Process(replica.process.pid).children() if p.name() == "tritonserver"]
    (stub,) = stubs(server.pid)
    assert stub.model == CLASSIFIER and "/tmp/folder" in psutil.Process(stub.pid).cmdline()[1]
    os.kill(stub.pid, signal.SIGKILL)
    until(lambda: "serving again" in replica.logs[-1].read_text(), timeout=60, what="the supervisor to heal it")
    until(replica.ready, timeout=30, what="readiness")
    prompt = PROMPTS[0]
    status, body = call(replica.http_port, "POST", MODEL_PATH, infer_body(prompt))
    assert status == 200 and agrees(answer(body), expected[prompt]), body
    replica.track()


# --- haproxy: the Service and its readiness checks --------------------------------------------------------


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

    def __init__(self, binary: str, servers: dict[str, int], workdir: Path) -> None:
        self.port, self.socket = free_port(), workdir / "haproxy.sock"
        backends = "\n".join(f"    server {name} 127.0.0.1:{port} check" for name, port in servers.items())
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
    http-check send meth GET uri /v2/health/ready
    http-check expect status 200
    default-server inter {round(INTER_S * 1000)}ms fall {FALL} rise {RISE}
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
    """haproxy's view every 50 ms: each server's status changes, with when they were seen, and the last rows."""

    def __init__(self, balancer: Balancer) -> None:
        super().__init__(daemon=True)
        self.balancer, self.stopping = balancer, threading.Event()
        self.changes: list[tuple[float, str, str]] = []  # (when, server, status)
        self.rows: dict[str, dict[str, str]] = {}

    def run(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(OSError):
                rows, now = self.balancer.stat(), time.monotonic()
                for name, row in rows.items():
                    if name not in self.rows or self.rows[name]["status"] != row["status"]:
                        self.changes.append((now, name, row["status"]))
                self.rows = rows
            time.sleep(0.05)

    def first(self, name: str, states: tuple[str, ...], after: float) -> float | None:
        """When the server was first seen in one of ``states`` after a time (DOWN: out of rotation; UP: in)."""
        return next((t for t, n, s in self.changes if n == name and t > after and s in states), None)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


# --- clients that retry once ------------------------------------------------------------------------------


@dataclass
class Sent:
    """One client request: its span, why each failed attempt failed (none, one, or two if lost), its answer."""

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
    connection of its own. A request that fails (refused, reset, HTTP 5xx: haproxy's 502/503 included) is retried
    once, on a fresh connection, RETRY_AFTER_S later: the whole of a Kubernetes client's retry policy here."""

    def __init__(self, port: int) -> None:
        self.port, self.stopping = port, threading.Event()
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
            for attempt in range(2):  # the first attempt and one retry
                if attempt:
                    time.sleep(RETRY_AFTER_S)
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
                    why = f"HTTP {response.status}"
                    if response.status < 500:  # not a replica going away: wrong, and not to be retried
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


def delta(after: dict[str, dict[str, str]], before: dict[str, dict[str, str]], name: str, column: str) -> int:
    return int(after[name][column] or 0) - int(before[name][column] or 0)


def test_a_killed_replica_leaves_the_rotation_and_comes_back(
    replicas: tuple[Replica, Replica],
    expected: dict[str, tuple[str, float]],
    haproxy: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    victim, survivor = replicas
    with contextlib.ExitStack() as stack:
        balancer = Balancer(haproxy, {r.name: r.http_port for r in replicas}, tmp_path)
        stack.callback(balancer.stop)
        balancer.wait_up([r.name for r in replicas])
        poller = Poller(balancer)
        poller.start()
        stack.callback(poller.stop)
        clients = Clients(balancer.port)
        stack.callback(clients.stop)

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
        clients.stop()
    sent = clients.sent
    retried = [s for s in sent if s.failures]
    lost = [s for s in sent if s.lost]
    wrong = [(s.prompt, s.got, expected[s.prompt]) for s in sent if s.got and not agrees(s.got, expected[s.prompt])]
    in_rotation_s = down_at - killed_at
    after_revival = {r.name: delta(final, revived, r.name, "stot") for r in replicas}
    figures = {
        "requests": len(sent),
        "retries": len(retried),
        "lost": len(lost),
        "wrong": len(wrong),
        "in_rotation_s": round(in_rotation_s, 3),
        "in_rotation_bound_s": IN_ROTATION_BOUND_S,
        "retry_after_s": RETRY_AFTER_S,
        "check": {"inter_s": INTER_S, "fall": FALL, "rise": RISE},
        "clients": CLIENTS,
        "before_kill": {r.name: int(loaded[r.name]["stot"]) for r in replicas},  # haproxy started with the load
        "dead_replica_after_kill": {
            "sessions": delta(at_down, loaded, victim.name, "stot"),
            "econ": delta(at_down, loaded, victim.name, "econ"),
            "eresp": delta(at_down, loaded, victim.name, "eresp"),
        },
        "dead_replica_once_down": delta(while_down, at_down, victim.name, "stot"),
        "failures": sorted({why for s in retried for _, why in s.failures}),
        "restart_to_up_s": round(back_at - restarted_at, 2),
        "after_revival": after_revival,
        "requests_per_s": round(len(sent) / (ended - started), 1),
        "duration_s": round(time.monotonic() - started, 1),
    }
    with capsys.disabled():
        print(
            f"\nfailover: {figures['requests']} requests, {figures['retries']} retried, {figures['lost']} lost;"
            f" the killed replica in rotation {in_rotation_s:.2f} s after the kill"
            f" (bound {figures['in_rotation_bound_s']:.1f} s); after revival {after_revival};"
            f" {figures['duration_s']} s"
        )
    if report := os.environ.get("TRITONHF_FAILOVER_REPORT"):
        Path(report).write_text(json.dumps(figures, indent=2) + "\n")

    assert not lost, f"{len(lost)} requests failed after their retry: {[s.failures for s in lost[:5]]}"
    assert not wrong, wrong[:5]
    assert retried, "the kill cost no request a retry: did the killed replica take traffic?"
    assert in_rotation_s <= IN_ROTATION_BOUND_S, figures
    assert figures["dead_replica_once_down"] == 0, "haproxy sent the replica requests after marking it DOWN"
    # Only the kill's window costs retries: requests already sent to the dead replica, and those haproxy
    # sent it until its checks failed; none while it comes back (haproxy waits for its readiness).
    first, last = min(s.failures[0][0] for s in retried), max(s.failures[0][0] for s in retried)
    assert killed_at <= first and last <= down_at + INTER_S, (killed_at, first, last, down_at)
    warm = clients.between(started, killed_at)
    assert figures["before_kill"][victim.name] >= 0.2 * len(warm), figures
    assert after_revival[victim.name] >= 0.2 * sum(after_revival.values()), figures
    assert survivor.process.poll() is None
