"""Start the real ``tritonserver``: the one on PATH (NGC container), else the nvidia-pytriton wheel's.

The wheel's server needs a prepared environment (see README, "Running without
Docker"): a backend directory holding the Python backend and the stub built for
this Python, the venv's ``bin`` first on PATH (the stub finds site-packages
through the ``python3`` there), and the wheel's bundled libraries on
LD_LIBRARY_PATH. Without them the server does not exit: it hangs in "loading",
so every start here has a timeout and shows the server log when it fires.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tritonhf import TritonHFError, cache_dir
from tritonhf.logs import Events, Sink
from tritonhf.storage import parse

# One shutdown budget: after SIGTERM in-flight requests get the grace period (Triton's exit timeout), the models
# UNLOAD_S more to unload and their processes to exit; then whatever is left is killed. A pod's
# terminationGracePeriodSeconds adds its preStop and EXIT_MARGIN_S to that (kubernetes.py), so that the kubelet's
# SIGKILL never comes first.
UNLOAD_S = 10
READY, LIVE = "/v2/health/ready", "/v2/health/live"  # Triton's health paths; serve's probes answer on the same
EXIT_MARGIN_S = 5
HARMLESS = ("unable to create stream", "Failed to initialize NVML", "DCGM", "CudaDriverHelper", "pinned memory")


@dataclass(frozen=True)
class Installation:
    binary: Path
    backend_dir: Path | None  # None: the server's own default (/opt/tritonserver/backends)
    env: dict[str, str]


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def wheel_installation() -> Installation:
    pytriton = package_dir("pytriton")
    if pytriton is None:
        raise TritonHFError(
            "no tritonserver on PATH and nvidia-pytriton is not installed (pip install 'tritonhf[server]')"
        )
    server = pytriton / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonHFError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    backend_dir = cache_dir() / f"backends-py{version}"
    python_dir = backend_dir / "python"
    if not (python_dir / "triton_python_backend_stub").exists():
        backend_dir.parent.mkdir(parents=True, exist_ok=True)
        # built aside, renamed in: concurrent starts never see half a copy
        staging = Path(tempfile.mkdtemp(dir=backend_dir.parent))
        shutil.copytree(
            server / "backends" / "python", staging / "python", ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
        try:
            staging.rename(backend_dir)
        except OSError:  # another start got there first
            shutil.rmtree(staging)
    libs = [pytriton.parent / "nvidia_pytriton.libs"]
    if cuda_runtime := package_dir("nvidia"):
        libs.append(cuda_runtime / "cuda_runtime" / "lib")  # perf_analyzer links libcudart
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, libs), env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return Installation(server / "bin" / "tritonserver", backend_dir, env)


def find_installation() -> Installation:
    if on_path := shutil.which("tritonserver"):
        return Installation(Path(on_path), None, dict(os.environ))
    return wheel_installation()


def available_backends(install: Installation | None = None) -> set[str]:
    """The backends the server would find: its backend directory's subdirectories."""
    install = install or find_installation()
    directory = install.backend_dir or Path("/opt/tritonserver/backends")
    return {path.name for path in directory.iterdir() if path.is_dir()} if directory.is_dir() else set()


def check_free(host: str, ports: dict[str, int]) -> None:
    """Refuse at once a port another program listens on: Triton would find out only after loading every model,
    and on a port another tritonhf server holds, we would take that server for our own."""
    for name, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
            try:
                sock.bind((host, port))
            except OSError as err:
                raise TritonHFError(
                    f"the {name} port {host}:{port} is in use ({err.strerror}): another server? stop it, or choose"
                    f" another --{name}-port"
                ) from None


EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
GIVEN: set[int] = set()  # the ports free_port has handed out: never twice in one process


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port from inside it (what binding port 0 gives) can be
    taken, before the server binds it, as the source port of any outgoing connection (seen in a test: serve refused
    its gRPC port as in use)."""
    try:
        ephemeral = int(EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # no procfs: Linux's default range starts here
        ephemeral = 32768
    for _ in range(100):
        port = random.randrange(min(10000, ephemeral // 2), ephemeral)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # a server listens there
                continue
        if port not in GIVEN:
            GIVEN.add(port)
            return port
    raise OSError(f"no free port below {ephemeral} in 100 tries")


def model_errors(log: str) -> list[str]:
    """The server log's error lines, less the ones every CPU-only start prints."""
    lines = [line for line in log.splitlines() if re.match(r"^E\d{4} ", line) or "TritonModelException" in line]
    return [line for line in lines if not any(text in line for text in HARMLESS)]


EXIT_TIMEOUT = "Exit timeout expired"  # what Triton logs when its exit timeout ran out with models still loaded


def still_loaded(log: str) -> list[str]:
    """The models a server's log says are loaded, in the order they loaded: its loads less its unloads."""
    loaded: dict[str, None] = {}
    for action, name in re.findall(r"successfully (loaded|unloaded) '([^']+)'", log):
        if action == "loaded":
            loaded[name] = None
        else:
            loaded.pop(name, None)
    return list(loaded)


CONTROL_HEADER = "tritonhf-control-key"  # the admin APIs answer only with it
GRPC_CONTROL_HEADER = f"triton-grpc-protocol-{CONTROL_HEADER}"  # the name Triton reads it under from gRPC metadata
# Triton's admin APIs, closed to anyone without the key: load/unload, the log level and file, tracing, shared-memory
# regions, and model configs. Open: health, metadata, inference and statistics (what monitoring scrapes).
RESTRICTED = ("model-repository", "logging", "trace", "shared-memory", "model-config")


class TritonServer:
    """A running tritonserver, as a context manager; ports are free ones unless given.

    Models are under explicit control: every model of the repository is loaded at
    start, and Triton's admin APIs (RESTRICTED: the repository's load, unload and
    index, logging, trace, shared memory, model configs) answer only holders of a
    key made anew at every start (``control_key``): the supervisor (supervisor.py)
    and the perf suite hold it, clients don't. The endpoints bind ``host`` (127.0.0.1 unless opened).
    On stop, in-flight requests get ``grace`` seconds (Triton's exit timeout).

    The server's output goes to ``log_path`` (a temporary file unless given, removed after a clean stop), or event
    by event to ``log_sink`` (``tritonhf serve``: stdout, logs.py), with a bounded tail kept for error messages.
    """

    def __init__(
        self,
        repository: Path | str,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_path: Path | None = None,
        extra_args: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        grace: float = 30.0,
        log_sink: Sink | None = None,
        models: tuple[str, ...] = ("*",),
    ) -> None:
        # a directory, or object storage the server reads itself (storage.py: s3://, gs://, as://)
        self.repository = str(repository) if parse(repository).remote else Path(repository).resolve()
        self.host, self.grace = host, grace
        self.control_key = secrets.token_urlsafe(24)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_sink, self.events = log_sink, None
        self.temporary_log = log_path is None and log_sink is None  # removed after a clean stop, kept otherwise
        if self.temporary_log:
            descriptor, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(descriptor)  # the server's own handle is opened at start
            log_path = Path(name)
        self.log_path: Path | None = log_path
        self.extra_args = extra_args
        self.models = models  # loaded at start (explicit model control: more are loaded with control())
        self.process: subprocess.Popen[bytes] | None = None
        self.forced: str | None = None  # why the last stop was forced, if it was (None: the server exited cleanly)

    @property
    def local_host(self) -> str:
        """Where this machine reaches the server: the bound address, or loopback when bound to all."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.local_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.local_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.local_host}:{self.metrics_port}/metrics"

    @property
    def log_where(self) -> str:
        return str(self.log_path) if self.log_path else "stdout"

    def log(self) -> str:
        """The server's output so far (piped: its last lines)."""
        if self.events is not None:
            return self.events.text()
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def start(self, timeout: float = 300.0) -> TritonServer:
        check_free(self.host, {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port})
        install = find_installation()
        argv = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            *(f"--{endpoint}-address={self.host}" for endpoint in ("http", "grpc", "metrics")),
            "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in self.models),
            f"--http-restricted-api={','.join(RESTRICTED)}:{CONTROL_HEADER}={self.control_key}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED)}:{CONTROL_HEADER}={self.control_key}",
            f"--exit-timeout-secs={max(1, round(self.grace))}",
            *([f"--backend-directory={install.backend_dir}"] if install.backend_dir else []),
            *self.extra_args,
        ]
        if self.log_sink is not None:
            self.process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=install.env, start_new_session=True
            )
            self.events = Events(self.process.stdout, self.log_sink)
        else:
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=install.env, start_new_session=True
                )
        try:
            self.wait_ready(timeout)
        except BaseException:  # Ctrl-C, SIGTERM or a timeout while loading: never leave a server behind
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                errors = "\n".join(model_errors(self.log())) or self.log()[-4000:]
                raise TritonHFError(f"tritonserver exited while loading (log: {self.log_where}):\n{errors}")
            if time.monotonic() > deadline:
                raise TritonHFError(
                    f"tritonserver not ready after {timeout:.0f} s (log: {self.log_where}):\n{self.log()[-4000:]}"
                )
            time.sleep(0.25)

    def ready(self, model: str | None = None, timeout: float = 2.0) -> bool:
        """Triton's readiness (every loaded model ready), or one model's."""
        path = f"/v2/models/{model}/ready" if model else READY
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def control(
        self, action: str, model: str | None = None, timeout: float = 600.0, config: Mapping[str, Any] | None = None
    ) -> bytes:
        """The model repository API, with the key: ``load`` / ``unload`` a model, or ``index`` the repository.
        ``config``: load the model with this configuration instead of its config.pbtxt (model_config's dict form).

        Returns the body; TritonHFError with Triton's message if it refuses.
        """
        path = f"/v2/repository/models/{model}/{action}" if model else f"/v2/repository/{action}"
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        request = urllib.request.Request(
            f"http://{self.http_url}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={CONTROL_HEADER: self.control_key},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # a full-size load takes a while
                return response.read()
        except urllib.error.HTTPError as err:
            raise TritonHFError(f"{action} {model or ''}: {err.read().decode(errors='replace')}") from None
        except OSError as err:  # refused, reset, timed out: the server is going or gone
            raise TritonHFError(f"{action} {model or ''}: {err}") from err

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM lets the server drain and unload its models; then nothing of its process group may live on.

        The server leads its own session (its stub processes share its process group), so a
        stub it could not stop is killed with the group, and a server past ``timeout`` too
        (default: the grace period, plus UNLOAD_S to unload the models).
        """
        if self.process is None:
            return
        timeout = self.grace + UNLOAD_S if timeout is None else timeout
        signalled = self.process.poll() is None
        if signalled:
            self.process.send_signal(signal.SIGTERM)
        try:
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None  # past the grace period: killed below
        finally:  # whatever interrupts the wait, nothing of the group lives on
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            if self.events is not None:  # the last of its output, written before we say it stopped
                self.events.join(timeout=2)
            self.process = None
        if code is None:
            self.forced = f"killed {timeout:.0f} s after SIGTERM"
        elif signalled and code != 0 and EXIT_TIMEOUT in self.log()[-4000:]:  # the grace ran out: Triton exits 1
            held = ", ".join(still_loaded(self.log())) or "see the log"
            self.forced = f"Triton's {self.grace:.0f} s exit timeout ran out with models still loaded ({held})"
        else:
            self.forced = None
            if self.temporary_log and code == 0:  # nothing to look into: no log file left behind in /tmp
                self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
