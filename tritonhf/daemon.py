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
- **Logs**: Triton's events on stdout, the supervisor's on stderr, text or JSON
  (logs.py); nothing is written to disk.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from tritonhf import TritonHFError, logs, placement, storage
from tritonhf.server import UNLOAD_S, TritonServer
from tritonhf.supervisor import Supervisor

logger = logging.getLogger(__name__)
READY, LIVE = "/v2/health/ready", "/v2/health/live"


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
    log_format: str = "text"


class Probes(ThreadingHTTPServer):
    """The kubelet's probes, answered from the supervisor's and Triton's state together."""

    daemon_threads = True

    def __init__(self, supervisor: Supervisor, host: str, port: int) -> None:
        self.supervisor, self.draining = supervisor, threading.Event()
        super().__init__((host, port), ProbeHandler)
        self.thread = threading.Thread(target=self.serve_forever, name="tritonhf-probes", daemon=True)

    def ready(self) -> tuple[bool, dict[str, str]]:
        if self.draining.is_set():
            return False, {"*": "shutting down"}
        try:
            down = self.supervisor.down()
        except TritonHFError as err:  # Triton does not answer its repository index
            return False, {"*": str(err)}
        if not down and not self.supervisor.server.ready():
            down = {"*": "tritonserver is not ready"}
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
    """SIGTERM and SIGINT: the first one starts the shutdown (KeyboardInterrupt in the main thread), and the clock of
    its budget; later ones are ignored, so that nothing cuts the drain short."""

    def __init__(self) -> None:
        self.since: float | None = None
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self.interrupt)

    def interrupt(self, signum: int, frame: FrameType | None) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        self.since = time.monotonic()
        logger.info("%s: shutting down", signal.Signals(signum).name)
        raise KeyboardInterrupt

    def left(self, budget: float) -> float:
        """What remains of ``budget`` seconds since the signal (all of it, if none came)."""
        return budget if self.since is None else max(1.0, budget - (time.monotonic() - self.since))


def serve(options: ServeOptions) -> None:
    """Start, supervise, answer the probes; drain and stop on SIGTERM or Ctrl-C; stop too after giving up on a model
    (TritonHFError: the process exits 1, to be restarted whole)."""
    logs.configure(options.log_format)
    shutdown = Shutdown()
    repository = storage.materialize(options.repository)  # a local, verified copy of the exact build
    placement.check_host(repository)  # the build's CPU choices hold on this host, or serve refuses
    http = options.http_port
    server = TritonServer(
        repository,
        http,
        options.grpc_port or http + 1,
        options.metrics_port or http + 2,
        host=options.host,
        grace=options.grace,
        log_sink=logs.sink(options.log_format),
    )
    budget = options.grace + UNLOAD_S
    logger.info("starting tritonserver on %s (drain %.0f s, stopped within %.0f s)", repository, options.grace, budget)
    try:
        server.start(options.start_timeout)  # stops the server itself if it fails or is interrupted
    except KeyboardInterrupt:
        logger.info("stopped while loading")
        return
    supervisor = Supervisor(server, max_restarts=options.max_restarts, backoff=options.backoff)
    probes, exited = None, None
    try:
        supervisor.start()
        probes = Probes(supervisor, options.host, options.health_port or http + 3).start()
        logger.info(
            "ready: HTTP %s  gRPC %s  metrics %s  probes http://%s:%d%s,%s on %s, supervised (Ctrl-C stops)",
            *(server.http_url, server.grpc_url, server.metrics_url, server.local_host),
            *(probes.server_port, READY, LIVE, options.host),
        )
        while (exited := server.process.poll()) is None and not supervisor.given_up:
            time.sleep(0.25)
    except KeyboardInterrupt:
        logger.info("stopping: in-flight requests get up to %.0f s, new ones are refused", options.grace)
    finally:
        if probes is not None:
            probes.draining.set()  # out of the Service first
        supervisor.stop()  # a heal under way is abandoned: the drain comes first
        server.stop(timeout=shutdown.left(budget))
        if probes is not None:
            probes.close()
    if supervisor.given_up:
        raise TritonHFError(
            f"gave up on {', '.join(supervisor.given_up)} after {options.max_restarts} restarts: stopped, so that"
            " the whole server is restarted"
        )
    if exited is not None:
        raise TritonHFError(f"tritonserver exited with code {exited}:\n{server.log()[-4000:]}")
    logger.info("stopped%s", " (forced: past the budget)" if server.forced else "")
