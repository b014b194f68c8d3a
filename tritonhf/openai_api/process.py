"""The OpenAI API as ``tritonhf serve``'s child process: started beside the server, healed when it dies.

The API runs in a process of its own (``tritonhf openai``), so that whatever
kills it (a crash, the OOM killer) leaves the server serving; serve's
supervisor thread here starts it again (waiting 0, 1, 2, 4, ... up to 30 s
between tries), and serve's readiness probe is false while it does not answer
its ``/health``. At shutdown it gets SIGTERM with the server and the same grace
to finish its in-flight requests.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0
STEADY_S = 60.0  # a frontend that ran this long before dying starts its back-off afresh


class Frontend:
    """``tritonhf openai`` in front of the server at ``grpc_url``, on ``host:port``, kept running."""

    def __init__(self, grpc_url: str, host: str, port: int, grace: float, backoff: float = 1.0) -> None:
        self.command = [
            sys.executable, "-m", "tritonhf", "openai", "--url", grpc_url,
            "--host", host, "--openai-port", str(port), "--grace", str(grace),
        ]  # fmt: skip
        self.local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.port, self.backoff = port, backoff
        self.process: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.restarts = 0
        self.thread = threading.Thread(target=self.keep, name="tritonhf-openai", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.local}:{self.port}/v1"

    def start(self) -> Frontend:
        self.process = subprocess.Popen(self.command)
        self.thread.start()
        return self

    def keep(self) -> None:
        """Start the frontend again whenever it exits, until serve stops; a start that fails is tried again."""
        failures = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            code = self.process.wait() if self.process else None
            if self.stopping.is_set():
                return
            failures = 1 if time.monotonic() - started > STEADY_S else failures + 1
            wait = min(MAX_BACKOFF_S, self.backoff * (2 ** (failures - 2)) if failures > 1 else 0.0)
            logger.error("the OpenAI API exited (code %s): starting it again in %.0f s", code, wait)
            if self.stopping.wait(wait):
                return
            try:
                self.process = subprocess.Popen(self.command)
                self.restarts += 1
            except OSError as err:
                logger.error("the OpenAI API could not be started: %s", err)
                self.process = None

    def ready(self, timeout: float = 1.0) -> bool:
        """Running, and its /health says the server answers it."""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.local}:{self.port}/health", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return True
            time.sleep(0.1)
        return False

    def signal(self) -> None:
        """SIGTERM: stop taking requests, finish the in-flight ones within the grace."""
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def stop(self, timeout: float) -> None:
        self.signal()
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            logger.error("the OpenAI API did not stop within %.0f s: killed", timeout)
            self.process.kill()
            self.process.wait()
