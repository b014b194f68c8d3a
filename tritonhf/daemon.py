"""``tritonhf serve``: the one process a pod runs. The server, its supervisor, probes that tell the truth, logs on
stdout, and one shutdown budget.

- **Probes** (``Probes``, on ``--health-port``): Triton's own ``/v2/health/ready``
  skips a model unloaded on purpose (in 2.51 it is false while a heal's unload and
  load are under way, but true once a model is left unloaded), and its
  ``/v2/health/live`` knows nothing of the supervisor; a pod that kept answering
  ready would stay in the Service while it refuses that model (HTTP 404, gRPC
  NOT_FOUND), which no client or mesh retries.
  So the probes ask ``tritonhf serve``: ``/v2/health/ready`` is 200 only when Triton is
  ready *and* every model of the repository is loaded and not being healed, and not
  while shutting down; ``/v2/health/live`` is 200 while the server runs and no model was
  given up. After giving up, ``serve`` also stops and exits 1, so that the kubelet (or
  systemd, or Docker's restart policy) restarts the whole server with its own back-off.
- **Shutdown** (SIGTERM or Ctrl-C): readiness turns false, a heal under way is
  abandoned, Triton gets SIGTERM at once and drains its in-flight requests for
  ``grace`` seconds, then ``server.UNLOAD_S`` to unload, then whatever is left is
  killed: at most ``grace + UNLOAD_S`` after the signal, inside the pod's
  ``terminationGracePeriodSeconds`` (kubernetes.py adds the preStop and a margin).
- **Start**: given up after ``--start-timeout``; ``tritonhf deploy`` sets it from the
  same estimate as the startup probe.
- **OpenAI API** (``--openai-port``): ``tritonhf openai`` as a child process
  (openai_api/process.py), started once the server serves, started again when it
  dies, part of readiness, and stopped with the server within the same budget.
- **Logs**: Triton's events on stdout, the supervisor's on stderr, text or JSON
  (logs.py); nothing is written to disk.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from tritonhf import TritonHFError, logs, placement, storage
from tritonhf.openai_api.process import Frontend
from tritonhf.repository import manifest_if_any
from tritonhf.server import LIVE, READY, UNLOAD_S, TritonServer, check_free
from tritonhf.supervisor import Supervisor

logger = logging.getLogger(__name__)
FRONTEND_START_S = 60.0
PROBE_TIMEOUT_S = 1.0  # each of the two questions to Triton: the answer must beat the probe's 3 s timeout


@dataclass(frozen=True)
class ServeOptions:
    repository: str | Path = "model_repository"
    http_port: int = 8000
    grpc_port: int | None = None  # default: HTTP + 1
    metrics_port: int | None = None  # default: HTTP + 2
    health_port: int | None = None  # default: HTTP + 3
    host: str = "127.0.0.1"
    grace: float = 30.0
    start_timeout: float = 300.0
    max_restarts: int = 5
    backoff: float = 1.0
    build: str | None = None  # the build id a local copy must be (deploy sets it where KServe makes the copy)
    log_format: str = "text"
    openai_port: int | None = None  # the OpenAI-compatible API beside the server (openai_api.process), or none


class Probes(ThreadingHTTPServer):
    """The kubelet's probes, answered from the supervisor's and Triton's state together."""

    daemon_threads = True

    def __init__(self, supervisor: Supervisor, host: str, port: int, frontend: Frontend | None = None) -> None:
        self.supervisor, self.frontend, self.draining = supervisor, frontend, threading.Event()
        super().__init__((host, port), ProbeHandler)
        self.thread = threading.Thread(target=self.serve_forever, name="tritonhf-probes", daemon=True)

    def ready(self) -> tuple[bool, dict[str, str]]:
        if self.draining.is_set():
            return False, {"*": "shutting down"}
        try:
            down = self.supervisor.down(timeout=PROBE_TIMEOUT_S)
        except TritonHFError as err:  # Triton does not answer its repository index
            return False, {"*": str(err)}
        if not down and not self.supervisor.server.ready(timeout=PROBE_TIMEOUT_S):
            down = {"*": "tritonserver is not ready"}
        if self.frontend is not None and not self.frontend.ready(timeout=PROBE_TIMEOUT_S):
            down = {**down, "openai": "the OpenAI API does not answer (being restarted?)"}
        return not down, down

    def live(self) -> tuple[bool, dict[str, str]]:
        process = self.supervisor.server.process
        if process is None or process.poll() is not None:
            return False, {"*": "tritonserver exited"}
        if gone := self.supervisor.given_up:
            return False, dict.fromkeys(gone, "given up after repeated crashes: restart the server")
        return True, {}

    def handle_error(self, request: object, client_address: object) -> None:
        """A prober that closes its connection early (haproxy resets them) is not an error worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def start(self) -> Probes:
        self.thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class ProbeHandler(BaseHTTPRequestHandler):
    server: Probes

    def do_GET(self) -> None:
        checks = {READY: self.server.ready, LIVE: self.server.live}
        if self.path not in checks:
            self.send_error(404, f"probes: {READY}, {LIVE}")
            return
        ok, down = checks[self.path]()
        body = json.dumps({"ok": ok, "down": down}).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # a probe every few seconds is not an event
        pass


class Shutdown:
    """SIGTERM and SIGINT. While the server starts, the first one interrupts (KeyboardInterrupt); once it serves,
    it only asks the main loop to stop (``requested``), so that no exception lands in the middle of the stop. The
    first one also starts the clock of the budget; later ones are ignored: nothing cuts the drain short."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.raising = True
        self.requested = threading.Event()
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self.interrupt)

    def interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.since is not None:
            return
        self.since = time.monotonic()
        logger.info("%s: shutting down", signal.Signals(signum).name)
        self.requested.set()
        if self.raising:
            raise KeyboardInterrupt

    def left(self, budget: float) -> float:
        """What remains of ``budget`` seconds since the signal (all of it, if none came)."""
        return budget if self.since is None else max(1.0, budget - (time.monotonic() - self.since))


def serve(options: ServeOptions) -> None:
    """Start, supervise, answer the probes; drain and stop on SIGTERM or Ctrl-C; stop too after giving up on a model
    (TritonHFError: the process exits 1, to be restarted whole)."""
    started = time.monotonic()  # --start-timeout counts from here, as the startup probe counts from the start
    logs.configure(options.log_format)
    shutdown = Shutdown()
    http = options.http_port
    ports = {"http": http, "grpc": options.grpc_port or http + 1, "metrics": options.metrics_port or http + 2}
    openai = {"openai": options.openai_port} if options.openai_port else {}
    check_free(options.host, {**ports, "health": options.health_port or http + 3, **openai})  # before any load
    repository = storage.materialize(options.repository, build=options.build)  # a verified copy of the build
    placement.check_host(repository)  # the build's CPU choices hold on this host, or serve refuses
    # the models' bytecode lives apart, never in the repository's __pycache__, which the seal does not cover: a
    # .pyc planted there is never imported (the server's processes inherit this environment)
    os.environ["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "tritonhf-pycache")
    server = TritonServer(
        repository,
        *ports.values(),
        host=options.host,
        grace=options.grace,
        log_sink=logs.sink(options.log_format),
    )
    budget = options.grace + UNLOAD_S
    logger.info("starting tritonserver on %s (drain %.0f s, stopped within %.0f s)", repository, options.grace, budget)
    try:
        server.start(max(1.0, options.start_timeout - (time.monotonic() - started)))  # stops itself if it fails
        shutdown.raising = False
    except KeyboardInterrupt:
        server.stop(timeout=shutdown.left(budget))  # interrupted inside start, it stopped already
        if server.forced:
            raise TritonHFError(f"stopped while loading, forced: {server.forced}") from None
        logger.info("stopped while loading")
        return
    supervisor = Supervisor(server, max_restarts=options.max_restarts, backoff=options.backoff)
    exited = supervise(server, supervisor, options, shutdown, budget)
    if supervisor.given_up:
        raise TritonHFError(
            f"gave up on {', '.join(supervisor.given_up)} after {options.max_restarts} restarts: stopped, so that"
            " the whole server is restarted"
        )
    if exited is not None:
        raise TritonHFError(f"tritonserver exited with code {exited}:\n{server.log()[-4000:]}")
    if server.forced:  # the drain did not end cleanly: a supervisor (the kubelet, systemd) should hear of it
        raise TritonHFError(f"stopped, forced: {server.forced}")
    logger.info("stopped")


def served_names(repository: Path | str) -> list[str]:
    """What clients call (the manifest's names, not an ensemble's steps); none where the manifest is not local."""
    return sorted(manifest_if_any(Path(repository)))


def supervise(
    server: TritonServer, supervisor: Supervisor, options: ServeOptions, shutdown: Shutdown, budget: float
) -> int | None:
    """Serve until a signal, a model given up or the server's exit; then stop within the budget: out of the
    Service first, then Triton signalled at once (a heal under way is abandoned). Returns Triton's own exit code,
    if it exited by itself."""
    probes, exited, frontend = None, None, None
    try:
        supervisor.start()
        if options.openai_port:
            frontend = Frontend(server.grpc_url, options.host, options.openai_port, options.grace, options.backoff)
            if not frontend.start().wait_ready(FRONTEND_START_S):
                raise TritonHFError(
                    f"the OpenAI API did not answer on port {options.openai_port} within {FRONTEND_START_S:.0f} s"
                )
            logger.info("OpenAI API: %s", frontend.url)
        probes = Probes(supervisor, options.host, options.health_port or options.http_port + 3, frontend).start()
        logger.info(
            "ready: HTTP %s  gRPC %s  metrics %s  probes http://%s:%d%s,%s on %s, supervised (Ctrl-C stops)",
            *(server.http_url, server.grpc_url, server.metrics_url, server.local_host),
            *(probes.server_port, READY, LIVE, options.host),
        )
        logger.info("models: %s", ", ".join(served_names(server.repository) or sorted(supervisor.models)))
        while (exited := server.process.poll()) is None and not supervisor.given_up:
            if shutdown.requested.wait(0.25):
                logger.info("stopping: in-flight requests get up to %.0f s, new ones are refused", options.grace)
                break
    finally:
        if probes is not None:
            probes.draining.set()
        supervisor.stopping.set()
        if frontend is not None:
            frontend.signal()  # it finishes its in-flight requests while the server drains
        server.stop(timeout=shutdown.left(budget))
        if frontend is not None:
            frontend.stop(timeout=shutdown.left(budget))
        supervisor.stop()
        if probes is not None:
            probes.close()
    return exited
