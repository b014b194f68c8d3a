"""Faults against a real tritonserver: a killed model process heals, overload is refused fast, the control
plane is locked, shutdown drains. Tiny models, so that the faults, not the models, take the time."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonhf.backends.python_hf.parameters import Limits
from tritonhf.model_config import QueuePolicy
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.server import TritonServer
from tritonhf.supervisor import Supervisor, stubs

from .conftest import CLASSIFIER, GEN_MAX_LEN
from .helpers import PROMPTS, Streamed, alone, burst, bytes_input, metric, until

pytestmark = [pytest.mark.server, pytest.mark.slow]
ENSEMBLE, NETWORK = f"{CLASSIFIER}_onnx", f"{CLASSIFIER}_onnx_model"
HEAL_BOUND_S = 60  # a tiny model reloads in 2-7 s on 2 CPU cores; the bound leaves room for a loaded CI machine
QUEUE = 4  # small, so that a burst overflows it
GROWTH_BOUND = 100 * 2**20  # resident memory a burst may add to any process of the server (seen: 0-4 MiB)


@pytest.fixture(scope="module")
def fault_repository(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    options = BuildOptions(
        output=tmp_path_factory.mktemp("faults") / "repo",
        variants=("python", "stream", "onnx"),
        runtime="python-ensemble",  # the network in a Python-backend process of its own, to be killed
        instances=1,  # that process is the model's only instance: killing it takes the model down
        queue=QueuePolicy(max_size=QUEUE, timeout_us=30_000_000),
        limits=Limits(max_waiting_sequences=64),
    )
    return build(plan([str(tiny["gpt2"])], [str(tiny[CLASSIFIER])], [], GEN_MAX_LEN), options)


@pytest.fixture(scope="module")
def supervised(fault_repository: Path) -> Iterator[tuple[TritonServer, Supervisor, list[tuple[str, str, float]]]]:
    events: list[tuple[str, str, float]] = []  # (model, what, when)
    with (
        TritonServer(fault_repository, grace=10) as server,
        Supervisor(server, backoff=0.2, on_event=lambda m, what: events.append((m, what, time.monotonic()))) as watch,
    ):
        yield server, watch, events


def happened(events: list[tuple[str, str, float]], model: str, what: str, after: float = 0.0) -> float | None:
    """When the supervisor last reported ``what`` for ``model`` after a time, if it did."""
    return max((t for m, w, t in events if m == model and w == what and t > after), default=None)


def kill(server: TritonServer, model: str) -> int:
    [stub] = [stub for stub in stubs(server.process.pid) if stub.model == model]
    os.kill(stub.pid, signal.SIGKILL)
    return stub.pid


class Load:
    """Requests in a loop on threads of their own, each answer or error kept with its time; readiness sampled."""

    def __init__(self, server: TritonServer, models: dict[str, tuple[str, str]], watch: str, clients: int = 1) -> None:
        """``models``: model -> (prompt to send, output to keep); ``clients`` threads per model."""
        self.server, self.stopping = server, threading.Event()
        self.results: dict[str, list[tuple[float, object]]] = {model: [] for model in models}
        self.readiness: list[tuple[float, bool, bool]] = []
        self.threads = [
            threading.Thread(target=self.send, args=(m, *sent)) for m, sent in models.items() for _ in range(clients)
        ]
        self.threads.append(threading.Thread(target=self.sample, args=(watch,)))
        for thread in self.threads:
            thread.start()

    def send(self, model: str, prompt: str, output: str) -> None:
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        while not self.stopping.is_set():
            try:
                answer = client.infer(model, [bytes_input([prompt])], client_timeout=60)
                self.results[model].append((time.monotonic(), answer.as_numpy(output).tolist()))
            except InferenceServerException as err:
                self.results[model].append((time.monotonic(), err))
                time.sleep(0.01)
        client.close()

    def sample(self, model: str) -> None:
        while not self.stopping.is_set():
            state = (time.monotonic(), self.server.ready(model), self.server.ready())
            if not self.readiness or self.readiness[-1][1:] != state[1:]:
                self.readiness.append(state)
            time.sleep(0.01)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=120)


def assert_heals(load: Load, events: list, healed: str, model: str, killed_at: float, expected: object) -> None:
    """Healed (the supervisor says so) within the bound, then served correctly again; not ready in between;
    every failure said clearly why."""
    until(lambda: happened(events, healed, "serving", killed_at), timeout=HEAL_BOUND_S, what=f"{healed} to heal")
    served = happened(events, healed, "serving", killed_at)
    until(lambda: any(t > served and r == expected for t, r in load.results[model]), what=f"{model} to answer again")
    load.stop()
    assert any(not ready for _, ready, _ in load.readiness), "the model never answered not-ready while down"
    assert any(not ready for _, _, ready in load.readiness), (
        "the server never answered not-ready while a model was down"
    )
    after = [r for t, r in load.results[model] if t > killed_at]
    errors = [r for r in after if isinstance(r, InferenceServerException)]
    assert all(r == expected for r in after if not isinstance(r, InferenceServerException)), "a wrong answer"
    clear = ("is not healthy", "has no available versions", "is not ready")
    assert all(any(text in err.message() for text in clear) for err in errors), [e.message() for e in errors]


def test_a_killed_model_heals_under_load(supervised: tuple) -> None:
    server, _, events = supervised
    expected = alone(server, CLASSIFIER, [PROMPTS[3]])["label"].tolist()
    other = alone(server, "gpt2", [PROMPTS[1]])["text"].tolist()
    load = Load(server, {CLASSIFIER: (PROMPTS[3], "label"), "gpt2": (PROMPTS[1], "text")}, watch=CLASSIFIER)
    until(lambda: len(load.results[CLASSIFIER]) > 3, what="load to start")
    killed_at = time.monotonic()
    kill(server, CLASSIFIER)
    assert_heals(load, events, CLASSIFIER, CLASSIFIER, killed_at, expected)
    assert [r for _, r in load.results["gpt2"]] == [other] * len(load.results["gpt2"]), "the other model noticed"
    assert happened(events, CLASSIFIER, "died", killed_at)


def test_an_ensemble_whose_network_died_comes_back(supervised: tuple) -> None:
    server, _, events = supervised
    expected = alone(server, ENSEMBLE, [PROMPTS[2]])["label"].tolist()
    load = Load(server, {ENSEMBLE: (PROMPTS[2], "label")}, watch=ENSEMBLE)
    until(lambda: len(load.results[ENSEMBLE]) > 3, what="load to start")
    killed_at = time.monotonic()
    kill(server, NETWORK)
    assert_heals(load, events, NETWORK, ENSEMBLE, killed_at, expected)


def test_errors_pass_through_the_ensemble(supervised: tuple) -> None:
    """A bad request fails alone through tokenize -> network -> postprocess; its neighbours are answered."""
    server, _, _ = supervised
    requests = [[bytes_input([PROMPTS[2]])], [bytes_input([b"\xff"])], [bytes_input([PROMPTS[7]])]]
    results = burst(server, ENSEMBLE, requests)
    assert isinstance(results[1], InferenceServerException) and "not valid UTF-8" in results[1].message()
    for got, text in ((results[0], PROMPTS[2]), (results[2], PROMPTS[7])):
        assert got["label"].tolist() == alone(server, ENSEMBLE, [text])["label"].tolist()


def test_a_crash_loop_backs_off_and_gives_up(supervised: tuple) -> None:
    server, supervisor, events = supervised
    supervisor.max_restarts = 1
    try:
        killed_at = time.monotonic()
        kill(server, "gpt2")
        until(lambda: happened(events, "gpt2", "serving", killed_at), timeout=HEAL_BOUND_S, what="the first restart")
        until(lambda: any(s.model == "gpt2" for s in stubs(server.process.pid)), what="the new process")
        kill(server, "gpt2")
        until(lambda: happened(events, "gpt2", "gave up", killed_at), timeout=HEAL_BOUND_S, what="giving up")
        time.sleep(1)
        assert not server.ready("gpt2") and not any(s.model == "gpt2" for s in stubs(server.process.pid))
    finally:
        supervisor.max_restarts = 5
        supervisor.health.pop("gpt2", None)
        server.control("load", "gpt2")
    assert server.ready("gpt2") and server.ready()


def test_the_control_plane_needs_the_key(supervised: tuple) -> None:
    server, _, _ = supervised
    unload = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/gpt2/unload", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(unload, timeout=10)
    assert refused.value.code == 403
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted") as refused_grpc:
        client.unload_model("gpt2")
    assert refused_grpc.value.status() == "StatusCode.UNAVAILABLE"
    assert server.ready("gpt2"), "nothing was unloaded"
    assert server.host == "127.0.0.1", "bound to loopback unless opened with --host"


def resident(server: TritonServer) -> dict[str, int]:
    """Resident memory (bytes) of tritonserver and of each model instance's process, by instance name."""
    pids = {"tritonserver": server.process.pid} | {stub.instance: stub.pid for stub in stubs(server.process.pid)}
    return {name: psutil.Process(pid).memory_info().rss for name, pid in pids.items()}


def test_overload_is_refused_at_once_and_only_that(supervised: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    """A burst far over the queue bound: every request is answered correctly or refused UNAVAILABLE; none hangs.

    At once: a refusal never waits for the queue to move, so the slowest refusal (p99) comes back before the
    answers that waited in the queue (the slowest answer). Memory: neither the server nor any model process
    grows."""
    server, _, _ = supervised
    expected = {p: alone(server, CLASSIFIER, [p])["label"].tolist() for p in PROMPTS}
    before = resident(server)
    requests = [[bytes_input([PROMPTS[i % len(PROMPTS)]])] for i in range(256)]
    latencies: list[float] = []
    results = burst(server, CLASSIFIER, requests, latencies=latencies)
    after = resident(server)
    refused = [i for i, r in enumerate(results) if isinstance(r, InferenceServerException)]
    answered = [i for i, r in enumerate(results) if not isinstance(r, InferenceServerException)]
    assert refused and answered, (len(refused), len(answered))
    assert {(results[i].status(), "Exceeds maximum queue size" in results[i].message()) for i in refused} == {
        ("StatusCode.UNAVAILABLE", True)
    }
    assert all(results[i]["label"].tolist() == expected[PROMPTS[i % len(PROMPTS)]] for i in answered)
    refusals_ms, answers_ms = (np.array([latencies[i] * 1e3 for i in group]) for group in (refused, answered))
    refusal_p99 = float(np.percentile(refusals_ms, 99))
    mib = {name: (round(before[name] / 2**20), round(after.get(name, 0) / 2**20)) for name in before}
    with capsys.disabled():
        print(
            f"\noverload: {len(refused)} of {len(results)} refused; refusals p50 {np.median(refusals_ms):.1f} ms,"
            f" p99 {refusal_p99:.1f} ms; answers p50 {np.median(answers_ms):.1f} ms, max {answers_ms.max():.1f} ms;"
            f" RSS MiB before -> after: {mib}"
        )
    assert refusal_p99 < answers_ms.max(), "refusals waited as long as the queue did"
    assert after.keys() == before.keys(), "a process of the server died or was replaced"
    assert all(after[name] < before[name] + GROWTH_BOUND for name in before), mib
    assert server.ready()


def test_sigterm_drains_in_flight_requests(fault_repository: Path) -> None:
    """Requests and a stream in flight at SIGTERM: each gets its answer or a clear error; the server exits in time.

    Triton 2.51 holds its exit while a client keeps a gRPC stream open after its final answer, up to the
    grace period; so the stream's client closes its stream once answered, as a client does.
    """
    server = TritonServer(fault_repository, grace=20).start()
    answers: list = []
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for prompt in PROMPTS[:8]:
        client.async_infer(
            "gpt2", [bytes_input([prompt])], callback=lambda result, error: answers.append(error or result)
        )
    stream = Streamed(server, "gpt2_stream", PROMPTS[0], {"max_new_tokens": 200, "min_new_tokens": 200})
    until(lambda: stream.pieces, what="the stream to start")
    stopping = threading.Thread(target=server.stop)
    started = time.monotonic()
    stopping.start()
    stream.wait()
    until(lambda: len(answers) == 8, timeout=60, what="every request to be answered")
    stopping.join(timeout=server.grace + 60)
    assert not stopping.is_alive() and not server.forced, "the server drained and exited on its own"
    assert time.monotonic() - started < server.grace + 30
    assert stream.error is None and stream.tokens == 200, "the stream in flight was finished, not cut"
    for answer in answers:
        assert isinstance(answer, InferenceServerException) or answer.as_numpy("text") is not None
        if isinstance(answer, InferenceServerException):  # refused by the bounded queue, or by the stopping server
            assert answer.status() == "StatusCode.UNAVAILABLE", answer.message()


def test_48_cancelled_streams_free_their_slots(server: TritonServer) -> None:
    streams = [
        Streamed(server, "gpt2_stream", PROMPTS[i % 16], {"max_new_tokens": 60, "min_new_tokens": 60})
        for i in range(48)
    ]
    until(lambda: sum(bool(s.pieces) for s in streams) >= 16, timeout=120, what="streams to be answering")
    for stream in streams:
        stream.cancel()
    until(
        lambda: (
            metric(server, "tritonhf_running_sequences", "gpt2_stream") == 0
            and metric(server, "tritonhf_queued_sequences", "gpt2_stream") == 0
        ),
        timeout=120,
        what="the gauges to drop to 0",
    )
    fresh = Streamed(server, "gpt2_stream", PROMPTS[4], {"max_new_tokens": 5, "return_full_text": False}).wait()
    assert fresh.tokens == 5
    [static] = burst(server, "gpt2", [[bytes_input([PROMPTS[4]])]], [{"max_new_tokens": 5, "return_full_text": False}])
    assert fresh.text == static["text"][0, 0].decode()
    assert server.ready()
