"""Self-healing: a model whose backend process died is reloaded, and readiness tells the truth meanwhile.

Triton 2.51 does not restart a Python backend's stub process: once the kernel's
OOM killer (or anything else) kills it, every request to that model fails with
"Stub process ... is not healthy" for as long as the server runs, while the
model and the server keep answering ready. The supervisor watches the server's
child processes instead (psutil; no probe traffic): each stub's command line
names its model and instance, and a stub that died stays a zombie, whose exit
status /proc still holds. When one dies, the supervisor

1. unloads the model through the repository API (instant, with the control
   key): from then on ``/v2/models/<name>/ready`` answers not-ready, and so
   does ``tritonhf serve``'s readiness probe (``down``, daemon.py: Triton's own
   strict readiness skips a model unloaded on purpose), and requests are
   refused at once (Triton: "has no available versions", gRPC NOT_FOUND / HTTP
   404) instead of failing inside;
2. loads it again: Triton restarts its stubs and brings back the ensembles that
   use it (they went down with it), then readiness is true again;
3. logs each step with the model's name and the cause (signal or exit code).

A model that keeps dying backs off (0, 1, 2, 4, ... s) and, after ``max_restarts``
restarts within ``window`` seconds, is left unloaded with the reason in the log;
``tritonhf serve`` (daemon.py) then stops, so that the process manager (the kubelet)
restarts the whole server with its own back-off.

With several instances a model has several stubs. A heal snapshots them all when it
starts and never watches them again: Triton's unload returns before the old instances
finish their batches, so they exit while (or after) the model loads anew, and are not
new crashes. A stub that exits while its model is not being served (unloaded on
purpose, through the repository API) is not a crash either.
"""

from __future__ import annotations

import dataclasses
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
        self.retired: set[int] = set()  # stubs of a model being healed, when the heal began: never watched again

    def stubs(self) -> list[Stub]:
        return stubs(self.server.process.pid, self.models)

    def __enter__(self) -> Supervisor:
        return self.start()

    def start(self) -> Supervisor:
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
        """Stop watching, and abandon a heal under way: the server's shutdown must not wait for a reload (a
        healer's load fails or finishes as the server stops; it starts nothing new once ``stopping`` is set)."""
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=self.poll + 5)

    @property
    def given_up(self) -> list[str]:
        with self.lock:  # a first crash adds its model to ``health`` on the watch thread
            return sorted(model for model, health in self.health.items() if health.given_up)

    def state(self, timeout: float = 2.0) -> dict[str, dict[str, str]]:
        """The repository index: model -> {"state": READY / UNAVAILABLE / LOADING / UNLOADING, "reason": ...}."""
        return {entry["name"]: entry for entry in json.loads(self.server.control("index", timeout=timeout))}

    def down(self, timeout: float = 2.0) -> dict[str, str]:
        """The repository's models that are not serving now, and why: what readiness must not hide.

        Triton's own readiness skips a model unloaded on purpose, which is how a heal, its back-off and
        giving up all look to it; so each model's state is read from the repository index as well.
        """
        if self.stopping.is_set():
            return {"*": "shutting down"}
        states = self.state(timeout)
        with self.lock:
            health = {model: dataclasses.replace(h) for model, h in self.health.items()}
        down = {}
        for model in sorted(self.models):
            health_now, state = health.get(model, Health()), states.get(model, {})
            if health_now.given_up:
                down[model] = "given up after repeated crashes"
            elif health_now.healing:
                down[model] = "restarting after a crash"
            elif state.get("state") != "READY":
                down[model] = f"{state.get('state', 'not in the repository')}: {state.get('reason', '')}".strip(": ")
        return down

    def run(self) -> None:
        while not self.stopping.wait(self.poll):
            try:
                self.check()
            except psutil.NoSuchProcess:  # the server itself is gone: serve() reports it
                return
            except Exception:  # logged with its traceback; the watch goes on, the next poll tries again
                logger.exception("supervisor check failed")

    def dead(self) -> list[Stub]:
        """The stubs that died since the last look (those of a model being healed, and retired ones, are not
        watched)."""
        if self.server.process is None or self.server.process.poll() is not None:
            return []
        with self.lock:  # the snapshot too: a healer adds its new processes to ``known`` under this lock
            running = self.stubs()
            self.retired &= {stub.pid for stub in running}  # a retired stub matters until it is gone
            alive = {stub.pid: stub for stub in running if stub.pid not in self.retired}
            healing = {model for model, health in self.health.items() if health.healing}
            dead = [stub for pid, stub in self.known.items() if pid not in alive and stub.model not in healing]
            self.known = {pid: stub for pid, stub in alive.items() if stub.model not in healing}
        return dead

    def check(self) -> None:
        """One look at the processes: start healing every model whose stub crashed."""
        dead = self.dead()
        states: dict[str, dict[str, str]] | None = None
        for model in dict.fromkeys(stub.model for stub in dead):
            died = next(stub for stub in dead if stub.model == model)
            cause = cause_of_death(died.pid)
            if cause != "exited with code 0":  # a stub exits cleanly when its model unloads
                try:
                    states = self.state() if states is None else states
                except TritonHFError:  # the server did not say: look again at the next poll
                    with self.lock:
                        self.known.update({stub.pid: stub for stub in dead if stub.model == model})
                    continue
                if states.get(model, {}).get("state") == "READY":  # served, yet its process is gone: a crash
                    self.begin(model, f"backend process {died.pid} ({died.instance}) {cause}")
                    continue
            # unloaded on purpose (the repository API): its processes exit, and that is not a crash
            logger.info("model %s: backend process %d %s while unloading: not a crash", model, died.pid, cause)

    def begin(self, model: str, cause: str) -> None:
        with self.lock:
            health = self.health.setdefault(model, Health())
            if health.healing or health.given_up or self.stopping.is_set():
                return
            health.healing = True
            self.retired |= {stub.pid for stub in self.stubs() if stub.model == model}  # old instances, draining
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
                if self.stopping.is_set():  # the server is going: the heal is abandoned, not failed
                    break
                cause = f"reload failed: {err}"
                self.report(model, "reload failed", f"model {model}: {cause}", logging.ERROR)
                continue
            if self.stopping.is_set():  # loaded as the server stops: nothing to watch, nobody to tell
                return
            with self.lock:
                self.known.update({s.pid: s for s in self.stubs() if s.model == model and s.pid not in self.retired})
                health.healing = False
            self.report(model, "serving", f"model {model}: serving again after {time.monotonic() - started:.1f} s")
            return

    def report(self, model: str, what: str, message: str, level: int = logging.WARNING) -> None:
        logger.log(level, message)
        self.on_event(model, what)
