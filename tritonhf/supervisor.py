"""Self-healing: a model whose backend process died is reloaded, and readiness tells the truth meanwhile.

Triton 2.51 does not restart a Python backend's stub process: once the kernel's
OOM killer (or anything else) kills it, every request to that model fails with
"Stub process ... is not healthy" for as long as the server runs, while the
model and the server keep answering ready. The supervisor watches the server's
child processes instead (psutil; no probe traffic): each stub's command line
names its model and instance, and a stub that died stays a zombie, whose exit
status /proc still holds. When one dies, the supervisor

1. unloads the model through the repository API (instant, with the control
   key): from then on ``/v2/models/<name>/ready`` answers not-ready (and
   ``/v2/health/ready`` while the model unloads and reloads: Triton's strict
   readiness skips a model unloaded on purpose), and requests are refused at
   once (Triton: "has no available versions", gRPC NOT_FOUND / HTTP 400)
   instead of failing inside;
2. loads it again: Triton restarts its stubs and brings back the ensembles that
   use it (they went down with it), then readiness is true again;
3. logs each step with the model's name and the cause (signal or exit code).

A model that keeps dying backs off (0, 1, 2, 4, ... s) and, after ``max_restarts``
restarts within ``window`` seconds, is left unloaded with the reason in the log.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tritonhf import TritonHFError
from tritonhf.server import TritonServer
from tritonhf.storage import check_not_pushing

logger = logging.getLogger(__name__)
STUB = "triton_python_backend_stub"


INSTANCE = re.compile(r"^(?P<model>.+)_\d+_\d+$")  # <model>_<group>_<index>, e.g. gpt2_0_0


@dataclass(frozen=True)
class Stub:
    """One model instance's backend process, as its command line names it."""

    pid: int
    model: str
    instance: str  # argv[8], e.g. gpt2_0_0


def stubs(server_pid: int, models: Collection[str] | None = None) -> list[Stub]:
    """The live stub processes of model instances under the server (of ``models``, if given).

    The model is read from the instance name, not from the model's path (argv[1]): a
    repository on object storage is copied to a temporary directory named at random.
    Left out: zombies (dead ones), and the short-lived stub a model load starts to
    complete the model's config, which is named after the model alone and exits by design
    (a model named like an instance, ``x_0_0``, would pass for one of ``x``: ``models`` tells).
    """
    found = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            argv = child.cmdline()
            if child.status() == psutil.STATUS_ZOMBIE or not argv or Path(argv[0]).name != STUB or len(argv) <= 8:
                continue
            if (match := INSTANCE.match(argv[8])) and (models is None or match["model"] in models):
                found.append(Stub(child.pid, match["model"], argv[8]))
        except psutil.Error:  # gone, or a zombie, between listing and reading
            continue
    return found


def cause_of_death(pid: int) -> str:
    """What killed a process: its zombie's wait status (/proc/<pid>/stat, last field), if still there."""
    try:
        status = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[-1])
    except (OSError, ValueError, IndexError):
        return "exit status unknown"
    if number := status & 0x7F:
        try:
            return f"killed by signal {number} ({signal.Signals(number).name})"
        except ValueError:
            return f"killed by signal {number}"
    return f"exited with code {status >> 8}"


@dataclass
class Health:
    """One model's restarts, for back-off and giving up."""

    restarts: list[float] = field(default_factory=list)  # monotonic times
    healing: bool = False
    given_up: bool = False


class Supervisor:
    """Watches a running TritonServer's model processes on a thread of its own and heals the models they serve."""

    def __init__(
        self,
        server: TritonServer,
        poll: float = 0.25,
        max_restarts: int = 5,
        window: float = 600.0,
        backoff: float = 1.0,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.server, self.poll = server, poll
        self.max_restarts, self.window, self.backoff = max_restarts, window, backoff
        self.on_event = on_event or (lambda model, what: None)
        self.known: dict[int, Stub] = {}
        self.health: dict[str, Health] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="tritonhf-supervisor", daemon=True)
        self.healers: list[threading.Thread] = []
        self.models: set[str] = set()  # the repository's, from the server's index at the start

    def stubs(self) -> list[Stub]:
        return stubs(self.server.process.pid, self.models)

    def __enter__(self) -> Supervisor:
        self.models = {model["name"] for model in json.loads(self.server.control("index"))}
        self.known = {stub.pid: stub for stub in self.stubs()}
        self.thread.start()
        logger.info("supervising %d model processes of tritonserver %d", len(self.known), self.server.process.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop watching; then unload the models whose stub died, so that the server's shutdown need not wait
        its whole grace period on them (Triton waits for a dead stub until its exit timeout)."""
        self.stop()
        try:
            dead = sorted({stub.model for stub in self.dead()})
        except psutil.Error:  # the server itself is gone: serve() says so
            return
        for model in dead:
            try:
                self.server.control("unload", model, timeout=self.server.grace)
            except TritonHFError as err:
                logger.warning("model %s: unload before shutdown failed: %s", model, err)

    def stop(self) -> None:
        """Stop watching, and let a reload under way finish (a server stopped mid-load waits its whole grace)."""
        self.stopping.set()
        deadline = time.monotonic() + self.server.grace + 60
        if self.thread.is_alive():  # first the watch, so that no healer starts after the list below
            self.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for healer in self.healers:
            healer.join(timeout=max(0.0, deadline - time.monotonic()))

    def run(self) -> None:
        while not self.stopping.wait(self.poll):
            try:
                self.check()
            except psutil.NoSuchProcess:  # the server itself is gone: serve() reports it
                return
            except Exception:  # logged with its traceback; the watch goes on, the next poll tries again
                logger.exception("supervisor check failed")

    def dead(self) -> list[Stub]:
        """The stubs that died since the last look (those of a model being healed are not watched)."""
        if self.server.process is None or self.server.process.poll() is not None:
            return []
        with self.lock:  # the snapshot too: a healer adds its new processes to ``known`` under this lock
            alive = {stub.pid: stub for stub in self.stubs()}
            healing = {model for model, health in self.health.items() if health.healing}
            dead = [stub for pid, stub in self.known.items() if pid not in alive and stub.model not in healing]
            self.known = {pid: stub for pid, stub in alive.items() if stub.model not in healing}
        return dead

    def check(self) -> None:
        """One look at the processes: start healing every model whose stub died."""
        dead = self.dead()
        for model in dict.fromkeys(stub.model for stub in dead):
            died = next(stub for stub in dead if stub.model == model)
            self.begin(model, f"backend process {died.pid} ({died.instance}) {cause_of_death(died.pid)}")

    def begin(self, model: str, cause: str) -> None:
        with self.lock:
            health = self.health.setdefault(model, Health())
            if health.healing or health.given_up or self.stopping.is_set():
                return
            health.healing = True
        healer = threading.Thread(target=self.heal, args=(model, cause), name=f"tritonhf-heal-{model}", daemon=True)
        self.healers = [thread for thread in self.healers if thread.is_alive()] + [healer]
        healer.start()

    def heal(self, model: str, cause: str) -> None:
        """Unload at once (readiness false, requests refused), then load with back-off until it serves or we give up.

        Whatever happens, the model ends up watched again or given up: never stuck half-way.
        """
        try:
            self.restore(model, cause)
        except Exception:  # logged with its traceback; the next death of this model starts over
            logger.exception("model %s: healing failed", model)
        finally:
            with self.lock:
                self.health[model].healing = False

    def restore(self, model: str, cause: str) -> None:
        health, started = self.health[model], time.monotonic()
        self.report(model, "died", f"model {model}: {cause}; unloading it (not ready until it is back)", logging.ERROR)
        try:
            self.server.control("unload", model)
        except TritonHFError as err:
            self.report(model, "unload failed", f"model {model}: unload failed: {err}", logging.ERROR)
        while not self.stopping.is_set():
            now = time.monotonic()
            health.restarts = [t for t in health.restarts if now - t < self.window] + [now]
            if len(health.restarts) > self.max_restarts:  # failed reloads count too: a model that won't load gives up
                health.given_up = True
                message = (
                    f"model {model}: gave up after {self.max_restarts} restarts within {self.window:.0f} s;"
                    f" left unloaded (last cause: {cause})"
                )
                self.report(model, "gave up", message, logging.ERROR)
                return
            delay = self.backoff * 2 ** (len(health.restarts) - 2) if len(health.restarts) > 1 else 0.0
            if self.stopping.wait(delay):
                break
            try:
                self.server.control("load", model)
            except TritonHFError as err:
                cause = f"reload failed: {err}"
                self.report(model, "reload failed", f"model {model}: {cause}", logging.ERROR)
                continue
            with self.lock:
                self.known.update({s.pid: s for s in self.stubs() if s.model == model})
                health.healing = False
            self.report(model, "serving", f"model {model}: serving again after {time.monotonic() - started:.1f} s")
            return

    def report(self, model: str, what: str, message: str, level: int = logging.WARNING) -> None:
        logger.log(level, message)
        self.on_event(model, what)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(
    repository: Path | str,
    http_port: int = 8000,
    host: str = "127.0.0.1",
    grace: float = 30.0,
    max_restarts: int = 5,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
) -> None:
    """``tritonhf serve``: start, supervise, print the endpoints; drain and stop on Ctrl-C or SIGTERM.

    ``repository`` is a directory or an object-storage URI (storage.py). gRPC and metrics
    take the two ports after ``http_port`` unless given. The supervisor heals a model
    whose backend process dies.
    """
    check_not_pushing(repository)
    grpc_port, metrics_port = grpc_port or http_port + 1, metrics_port or http_port + 2
    server = TritonServer(repository, http_port, grpc_port, metrics_port, host=host, grace=grace)
    signal.signal(signal.SIGTERM, interrupt)
    print(f"starting tritonserver on {server.repository} (log: {server.log_path})", flush=True)
    with server, Supervisor(server, max_restarts=max_restarts):
        endpoints = f"HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}"
        print(f"ready: {endpoints} on {host}, supervised  (Ctrl-C stops)", flush=True)
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
            raise TritonHFError(f"tritonserver exited (log: {server.log_path}):\n{server.log()[-4000:]}")
        except KeyboardInterrupt:
            for number in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the stop short
                signal.signal(number, signal.SIG_IGN)
            print(f"stopping: in-flight requests get up to {grace:.0f} s, new ones are refused", flush=True)
