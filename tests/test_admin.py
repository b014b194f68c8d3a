"""Triton's admin APIs answer only with the control key, over HTTP and gRPC, and a refused call changes nothing;
health, metadata, statistics and inference stay open, and our own clients need no key. Against a real server.

Each refusal is printed (run with ``-s`` to see the table): the answers the README quotes."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tritonhf import TritonHFError, client
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.server import CONTROL_HEADER, GRPC_CONTROL_HEADER, RESTRICTED, TritonServer

from .conftest import CLASSIFIER, GEN_MAX_LEN
from .helpers import burst, bytes_input

pytestmark = pytest.mark.server
MODEL, UNBATCHED = CLASSIFIER, f"{CLASSIFIER}_baseline"
REGION, SIZE = "tritonhf-admin", 64  # a POSIX shared-memory region: /dev/shm/tritonhf-admin
HANDLE = base64.b64encode(bytes(64)).decode()  # the size of a cudaIpcMemHandle_t, not a real one
HTTP_REFUSAL = (403, f"This API is restricted, expecting header '{CONTROL_HEADER}'")
GRPC_REFUSAL = ("StatusCode.UNAVAILABLE", f"This protocol is restricted, expecting header '{GRPC_CONTROL_HEADER}'")
PROMPT = {"name": "prompt", "shape": [1, 1], "datatype": "BYTES"}  # one row, in the HTTP/JSON form
State = dict[str, Any]


@dataclass(frozen=True)
class Call:
    """One admin call, in both protocols, and what it does to the server's state when it is let through."""

    api: str  # Triton's name for the restricted API
    method: str  # HTTP
    path: str
    body: dict | None
    grpc: str  # tritonclient.grpc.InferenceServerClient's method
    args: tuple = ()
    effect: Callable[[State], bool] | None = None  # holds after the call went through
    fails: bool = False  # with the key too, by the handler's own refusal (a made-up CUDA memory handle)


CALLS = [  # in an order that leaves the server as it was, but for the log and trace settings (restored after)
    Call("model-repository", "POST", "/v2/repository/index", {}, "get_model_repository_index"),
    Call(
        "model-repository",
        "POST",
        f"/v2/repository/models/{MODEL}/unload",
        {},
        "unload_model",
        (MODEL,),
        lambda s: s["index"][MODEL] != "READY",
    ),
    Call(
        "model-repository",
        "POST",
        f"/v2/repository/models/{MODEL}/load",
        {},
        "load_model",
        (MODEL,),
        lambda s: s["index"][MODEL] == "READY",
    ),
    Call("model-config", "GET", f"/v2/models/{MODEL}/config", None, "get_model_config", (MODEL,)),
    Call("logging", "GET", "/v2/logging", None, "get_log_settings"),
    Call(
        "logging",
        "POST",
        "/v2/logging",
        {"log_verbose_level": 1},
        "update_log_settings",
        ({"log_verbose_level": 1},),
        lambda s: s["logging"]["log_verbose_level"] == 1,
    ),
    Call("trace", "GET", "/v2/trace/setting", None, "get_trace_settings"),
    Call(
        "trace",
        "POST",
        "/v2/trace/setting",
        {"trace_rate": "7"},
        "update_trace_settings",
        (None, {"trace_rate": "7"}),
        lambda s: s["trace"]["trace_rate"] == "7",
    ),
    Call("trace", "GET", f"/v2/models/{MODEL}/trace/setting", None, "get_trace_settings", (MODEL,)),
    Call(
        "trace",
        "POST",
        f"/v2/models/{MODEL}/trace/setting",
        {"trace_rate": "9"},
        "update_trace_settings",
        (MODEL, {"trace_rate": "9"}),
        lambda s: s["model_trace"]["trace_rate"] == "9",
    ),
    Call("shared-memory", "GET", "/v2/systemsharedmemory/status", None, "get_system_shared_memory_status"),
    Call(
        "shared-memory",
        "POST",
        f"/v2/systemsharedmemory/region/{REGION}/register",
        {"key": f"/{REGION}", "offset": 0, "byte_size": SIZE},
        "register_system_shared_memory",
        (REGION, f"/{REGION}", SIZE),
        lambda s: s["shm"] == [REGION],
    ),
    Call(
        "shared-memory",
        "POST",
        f"/v2/systemsharedmemory/region/{REGION}/unregister",
        {},
        "unregister_system_shared_memory",
        (REGION,),
        lambda s: s["shm"] == [],
    ),
    Call("shared-memory", "GET", "/v2/cudasharedmemory/status", None, "get_cuda_shared_memory_status"),
    Call(
        "shared-memory",
        "POST",
        f"/v2/cudasharedmemory/region/{REGION}/register",
        {"raw_handle": {"b64": HANDLE}, "device_id": 0, "byte_size": SIZE},
        "register_cuda_shared_memory",
        (REGION, HANDLE.encode(), 0, SIZE),
        fails=True,  # a handle of zeros, and no CUDA here: the handler's answer, not the lock's
    ),
    Call("shared-memory", "POST", "/v2/cudasharedmemory/unregister", {}, "unregister_cuda_shared_memory"),
]


@pytest.fixture(scope="module")
def admin_server(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A server of its own (its models are unloaded and loaded, its settings changed): the classifier batched, and
    the tutorial's unbatched copy of it."""
    options = BuildOptions(
        output=tmp_path_factory.mktemp("admin") / "repo", variants=("python", "baseline"), instances=1
    )
    region = shared_memory.SharedMemory(REGION, create=True, size=SIZE)
    try:
        with TritonServer(build(plan([], [str(tiny[CLASSIFIER])], [], GEN_MAX_LEN), options)) as running:
            yield running
    finally:
        region.close()
        region.unlink()


def http(server: TritonServer, method: str, path: str, body: dict | None = None, key: str = "") -> tuple[int, Any]:
    """(status, parsed body) of one HTTP call, refused or not."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{server.http_url}{path}", data=data, method=method, headers={CONTROL_HEADER: key} if key else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    return status, json.loads(text) if text else None


def grpc(server: TritonServer, call: Call, key: str = "") -> InferenceServerException | None:
    """The gRPC call's refusal, or None if it went through."""
    channel = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        getattr(channel, call.grpc)(*call.args, headers={GRPC_CONTROL_HEADER: key} if key else None)
    except InferenceServerException as err:
        return err
    finally:
        channel.close()
    return None


def state(server: TritonServer) -> State:
    """What the admin calls could change, read with the key."""

    def read(method: str, path: str) -> Any:
        status, body = http(server, method, path, {} if method == "POST" else None, server.control_key)
        assert status == 200, (path, body)
        return body

    return {
        "index": {model["name"]: model.get("state") for model in read("POST", "/v2/repository/index")},
        "logging": read("GET", "/v2/logging"),
        "trace": read("GET", "/v2/trace/setting"),
        # an unloaded model has no trace settings: then Triton's answer for an unknown model
        "model_trace": http(server, "GET", f"/v2/models/{MODEL}/trace/setting", key=server.control_key)[1],
        "shm": [region["name"] for region in read("GET", "/v2/systemsharedmemory/status")],
        "cuda_shm": read("GET", "/v2/cudasharedmemory/status"),
    }


def test_the_calls_cover_every_restricted_api() -> None:
    assert {call.api for call in CALLS} == set(RESTRICTED)


def test_without_the_key_every_admin_call_is_refused_and_changes_nothing(admin_server: TritonServer) -> None:
    before = state(admin_server)
    assert before["index"] == {MODEL: "READY", UNBATCHED: "READY"} and before["shm"] == []
    answers = []
    for call in CALLS:
        for key in ("", "not-the-key"):
            status, body = http(admin_server, call.method, call.path, call.body, key)
            assert (status, (body or {}).get("error")) == HTTP_REFUSAL, (call.path, key)
            refusal = grpc(admin_server, call, key)
            assert refusal is not None and (refusal.status(), refusal.message()) == GRPC_REFUSAL, (call.grpc, key)
        answers.append(f"{call.api:16} HTTP {call.method:4} {call.path}: {status} {body['error']}")
        answers.append(f"{call.api:16} gRPC {call.grpc}: {refusal.status()} {refusal.message()}")
    print("\n" + "\n".join(answers))
    assert state(admin_server) == before, "a refused call changed the server"
    assert admin_server.ready(MODEL)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_with_the_key_every_admin_call_works(admin_server: TritonServer, protocol: str) -> None:
    before = state(admin_server)
    try:
        for call in CALLS:
            if protocol == "http":
                status, body = http(admin_server, call.method, call.path, call.body, admin_server.control_key)
                refused = body["error"] if status != 200 else ""
            else:
                error = grpc(admin_server, call, admin_server.control_key)
                refused = error.message() if error else ""
            assert bool(refused) == call.fails and "restricted" not in refused, (call.path, refused)
            assert call.effect is None or call.effect(state(admin_server)), (call.path, "had no effect")
    finally:  # the settings the calls changed, as they were
        key = admin_server.control_key
        http(admin_server, "POST", "/v2/logging", {"log_verbose_level": before["logging"]["log_verbose_level"]}, key)
        http(admin_server, "POST", "/v2/trace/setting", {"trace_rate": before["trace"]["trace_rate"]}, key)
        http(admin_server, "POST", f"/v2/models/{MODEL}/trace/setting", {"trace_rate": None}, key)
    assert state(admin_server) == before


def test_health_metadata_statistics_and_inference_stay_open(admin_server: TritonServer) -> None:
    """What a load balancer, a client and monitoring use needs no key."""
    for method, path, body in [
        ("GET", "/v2/health/live", None),
        ("GET", "/v2/health/ready", None),
        ("GET", "/v2", None),
        ("GET", f"/v2/models/{MODEL}", None),
        ("GET", f"/v2/models/{MODEL}/ready", None),
        ("GET", f"/v2/models/{MODEL}/stats", None),
        ("POST", f"/v2/models/{MODEL}/infer", {"inputs": [{**PROMPT, "data": ["good"]}]}),
    ]:
        assert http(admin_server, method, path, body)[0] == 200, path
    with urllib.request.urlopen(admin_server.metrics_url, timeout=10) as response:
        assert "nv_inference_request_success" in response.read().decode()
    channel = grpcclient.InferenceServerClient(admin_server.grpc_url)
    assert channel.is_server_live() and channel.is_server_ready() and channel.is_model_ready(MODEL)
    assert channel.get_server_metadata().version and channel.get_model_metadata(MODEL).name == MODEL
    assert channel.get_inference_statistics(MODEL).model_stats[0].name == MODEL
    assert channel.infer(MODEL, [bytes_input(["good"])]).as_numpy("label").shape == (1, 1)
    channel.close()


def test_our_clients_need_no_key(admin_server: TritonServer) -> None:
    """`tritonhf client` and the tests' burst read the model's metadata, which is open, not its config."""
    for protocol, url in (("http", admin_server.http_url), ("grpc", admin_server.grpc_url)):
        batched = client.infer(MODEL, ["good", "bad", "fine"], url, protocol)
        assert batched["label"].shape == batched["score"].shape == (3, 1)
        single = client.infer(UNBATCHED, ["good"], url, protocol)
        assert set(single) == {"label", "score"} and single["label"].shape == (1,)
        with pytest.raises(TritonHFError, match="does not batch"):
            client.infer(UNBATCHED, ["good", "bad"], url, protocol)
    [answer] = burst(admin_server, MODEL, [[bytes_input(["good"])]])
    assert np.array_equal(answer["label"], batched["label"][:1])
