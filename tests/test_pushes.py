"""Immutable, verified builds on object storage, against real servers: moto's S3 on loopback, the real
``tritonhf`` CLI, a real tritonserver.

Proven here: a build's id is derived from its files, so the same build pushed twice is one build and is not
uploaded again; a push writes a new build below the prefix, never into another build, its manifest last and
the pointer after it; deploy writes the exact build into the pod template (a new build: a new template);
serve refuses a build whose objects differ from its record, naming the file; and a replica whose model is
killed while a different build is pushed to the same prefix heals back to exactly the build it was serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from tritonhf import TritonHFError, cli, storage
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import HASHES, MARKER, build_id, local_files, seal, sealed_id, verify
from tritonhf.server import free_port
from tritonhf.storage import POINTER
from tritonhf.supervisor import stubs

from .conftest import CLASSIFIER, GEN_MAX_LEN, S3
from .helpers import PROMPTS, in_process, until
from .served import call
from .test_loopback import MODEL_PATH, Replica, agrees, answer, infer_body

pytestmark = [pytest.mark.server, pytest.mark.slow]
Answers = dict[str, tuple[str, float]]
ASKED = PROMPTS[:6]


@pytest.fixture(scope="module")
def builds(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two builds of the classifier under the same served name: ``a`` the stand-in, ``b`` the same network with
    its classifier's bias moved, so that every answer differs observably."""
    root = tmp_path_factory.mktemp("builds")
    other = root / "standin-b" / CLASSIFIER
    shutil.copytree(tiny[CLASSIFIER], other)
    model = AutoModelForSequenceClassification.from_pretrained(other)
    with torch.no_grad():
        model.classifier.bias += torch.tensor([3.0, -3.0])
    model.save_pretrained(other)
    options = BuildOptions(variants=("python",), instances=1, dtype="float32")
    return {
        name: build(plan([], [str(source)], [], GEN_MAX_LEN), dataclasses.replace(options, output=root / name))
        for name, source in (("a", tiny[CLASSIFIER]), ("b", other))
    }


@pytest.fixture(scope="module")
def answers(builds: dict[str, Path]) -> dict[str, Answers]:
    """Each build's answers, each prompt run alone in this process: they differ for every prompt."""
    found = {}
    for name, path in builds.items():
        run = in_process(path, CLASSIFIER)
        found[name] = {p: (out["label"][0, 0].decode(), float(out["score"][0, 0])) for p in ASKED for out in [run([p])]}
    assert not any(agrees(found["a"][p], found["b"][p]) for p in ASKED), found
    return found


def pointer(s3: S3, prefix: str) -> str:
    return s3.client().get_object(Bucket=s3.bucket, Key=f"{prefix}/{POINTER}")["Body"].read().decode().strip()


def serve_cli(uri: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m tritonhf serve`` in a process of its own, its temporary directory (the verified copies) in
    ``workdir``, for a build it must refuse. A server it wrongly starts gives up at once (--start-timeout 1, counted
    from serve's start) and says so, not what the test expects."""
    port = str(free_port())
    argv = [sys.executable, "-m", "tritonhf", "serve", "--model-repository", uri, "--http-port", port]
    env = {**os.environ, "TMPDIR": str(workdir)}
    return subprocess.run([*argv, "--start-timeout", "1"], capture_output=True, text=True, env=env, timeout=300)


def test_build_ids_are_derived_from_the_files_and_a_push_is_idempotent(
    s3: S3, builds: dict[str, Path], tmp_path: Path
) -> None:
    a = builds["a"]
    record = (a / HASHES).read_text()
    assert sorted(line.split("  ", 1)[1] for line in record.splitlines()) == sorted(set(local_files(a)) - {HASHES})
    assert verify(a) == sealed_id(a) == build_id(record) and len(sealed_id(a)) == 16
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    assert seal(copy) == sealed_id(a), "the same files, elsewhere: the same build"
    config = copy / CLASSIFIER / "config.pbtxt"
    config.write_text(config.read_text() + "\n")
    with pytest.raises(TritonHFError, match=f"{CLASSIFIER}/config.pbtxt does not match"):
        verify(copy)
    assert seal(copy) != sealed_id(a), "one byte more: another build"

    uri = s3.uri("ids/repo")
    first = storage.push(a, uri)
    assert (first.build, first.uri, first.uploaded) == (sealed_id(a), f"{uri}/{sealed_id(a)}", len(local_files(a)))
    assert s3.keys("ids/repo") == {POINTER} | {f"{first.build}/{name}" for name in local_files(a)}
    assert pointer(s3, "ids/repo") == first.build
    since = s3.log.stat().st_size
    again = storage.push(a, uri)
    assert (again.uri, again.uploaded) == (first.uri, 0)
    until(lambda: s3.writes(since), timeout=10, what="the server to log the pointer's write")
    assert s3.writes(since) == [("PUT", f"/{s3.bucket}/ids/repo/{POINTER}")], "only the pointer was written again"


def test_a_push_never_writes_into_a_build(s3: S3, builds: dict[str, Path]) -> None:
    uri, prefix = s3.uri("never/repo"), "never/repo"
    a = storage.push(builds["a"], uri)
    client = s3.client()
    in_a = s3.keys(prefix) - {POINTER}
    before = {key: client.head_object(Bucket=s3.bucket, Key=f"{prefix}/{key}")["ETag"] for key in in_a}
    since = s3.log.stat().st_size
    b = storage.push(builds["b"], uri)
    assert b.build != a.build and pointer(s3, prefix) == b.build
    until(lambda: ("PUT", f"/{s3.bucket}/{prefix}/{POINTER}") in s3.writes(since), timeout=10, what="the log")
    writes = [path.removeprefix(f"/{s3.bucket}/{prefix}/") for method, path in s3.writes(since)]
    assert all(path.startswith(f"{b.build}/") for path in writes[:-1]), writes
    assert writes[-2:] == [f"{b.build}/{MARKER}", POINTER], "the manifest last, then the pointer"
    assert {key: client.head_object(Bucket=s3.bucket, Key=f"{prefix}/{key}")["ETag"] for key in before} == before
    assert storage.push(builds["a"], uri).uploaded == 0 and pointer(s3, prefix) == a.build, "a rollback: no upload"

    client.put_object(Bucket=s3.bucket, Key="shared/notes.txt", Body=b"someone else's")
    for target in (f"s3://{s3.endpoint}/{s3.bucket}", s3.uri("shared"), a.uri):  # root; foreign; a build's own
        with pytest.raises(TritonHFError, match="prefix"):
            storage.push(builds["b"], target)
    assert s3.keys("shared") == {"notes.txt"} and s3.keys(f"{prefix}/{a.build}") == set(local_files(builds["a"]))


def test_deploy_writes_the_exact_build(s3: S3, builds: dict[str, Path], tmp_path: Path) -> None:
    uri = s3.uri("deploy-exact/repo")

    def deployed(repository: str, *extra: str) -> tuple[list[str], str]:
        """(the Deployment's container args, KServe's storageUri) that ``tritonhf deploy kubernetes`` writes."""
        output = tmp_path / f"k8s-{len(list(tmp_path.iterdir()))}"
        argv = ["deploy", "kubernetes", "--model-repository", repository, "--output", str(output), *extra]
        assert cli.main(argv) == 0
        deployment = yaml.safe_load((output / "base" / "deployment.yaml").read_text())
        service = yaml.safe_load((output / "overlays" / "kserve" / "inferenceservice.yaml").read_text())
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return container["args"], service["spec"]["predictor"]["model"]["storageUri"]

    def repository(args: list[str]) -> str:
        return args[args.index("--model-repository") + 1]

    a = storage.push(builds["a"], uri)
    args_a, storage_uri = deployed(uri)
    assert repository(args_a) == a.uri and storage_uri == f"s3://{s3.bucket}/deploy-exact/repo/{a.build}"
    b = storage.push(builds["b"], uri)
    args_b, storage_uri = deployed(uri)
    assert repository(args_b) == b.uri and storage_uri.endswith(f"/{b.build}")
    assert args_a != args_b, "a new build: a new pod template, so a rollout"
    assert repository(deployed(a.uri)[0]) == a.uri, "an exact build is used as is, whatever the pointer says"
    assert repository(deployed(uri, "--built", str(builds["a"]))[0]) == a.uri, "--built names the build"
    refused = ["--model-repository", a.uri, "--built", str(builds["b"]), "--output", str(tmp_path / "no")]
    assert cli.main(["deploy", "kubernetes", *refused]) == 1, "--built is another build than the URI's"


def test_serve_refuses_a_build_that_differs_from_its_record(s3: S3, builds: dict[str, Path], tmp_path: Path) -> None:
    """The real CLI refuses, naming the file, before any server starts; nothing of the copy stays behind."""
    prefix, client = "tamper/repo", s3.client()
    pushed = storage.push(builds["a"], s3.uri(prefix))
    changed = f"{CLASSIFIER}/config.pbtxt"
    key = f"{prefix}/{pushed.build}/{changed}"
    original = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3.bucket, Key=key, Body=original.replace(b"max_batch_size: 32", b"max_batch_size: 64"))
    done = serve_cli(s3.uri(prefix), tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"{changed} does not match the build" in done.stderr and pushed.uri in done.stderr, done.stderr
    assert "starting tritonserver" not in done.stdout
    assert not (tmp_path / storage.BUILDS / pushed.build).exists(), "no copy of a refused build"
    client.put_object(Bucket=s3.bucket, Key=key, Body=original)

    cases = {  # what else a copy can lack or hold, checked in this process: the message names the file
        "extra.txt": lambda: client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{pushed.build}/extra.txt", Body=b""),
        f"{CLASSIFIER}/1/model.py": lambda: client.delete_object(
            Bucket=s3.bucket, Key=f"{prefix}/{pushed.build}/{CLASSIFIER}/1/model.py"
        ),
        "not a complete build": lambda: client.delete_object(Bucket=s3.bucket, Key=f"{prefix}/{pushed.build}/{MARKER}"),
    }
    for expected, damage in cases.items():
        damage()
        with pytest.raises(TritonHFError, match=expected):
            storage.materialize(s3.uri(prefix), tmp_path / "copies")
    local = tmp_path / "local"  # a local copy with its record, as KServe's /mnt/models: checked in place
    shutil.copytree(builds["a"], local)
    (local / changed).write_bytes(original + b"\n")
    with pytest.raises(TritonHFError, match=f"{changed} does not match"):
        storage.materialize(str(local))


def test_a_copy_somebody_else_made_must_be_the_build_deploy_names(
    s3: S3, builds: dict[str, Path], tmp_path: Path
) -> None:
    """KServe's storage initializer copies the build to /mnt/models: the runtime passes serve the build's id, and
    serve refuses a copy without its seal, or sealed as another build (a tampered copy sealed anew)."""
    pushed = storage.push(builds["a"], s3.uri("kserve-copy/repo"))
    output = tmp_path / "k8s"
    assert cli.main(["deploy", "kubernetes", "--model-repository", pushed.uri, "--output", str(output)]) == 0
    runtime = yaml.safe_load((output / "overlays" / "kserve" / "servingruntime.yaml").read_text())
    (container,) = runtime["spec"]["containers"]
    args = container["args"]
    assert cli.parser().parse_args(["serve", *args]).build == pushed.build, "what serve will be asked for"
    copy = tmp_path / "mnt-models"
    shutil.copytree(builds["a"], copy)
    assert storage.materialize(str(copy), build=pushed.build) == str(copy)
    other = sealed_id(builds["b"])
    with pytest.raises(TritonHFError, match=f"not build {other}'s record \\(its id is {pushed.build}\\)"):
        storage.materialize(str(copy), build=other)
    (copy / HASHES).unlink()
    assert storage.materialize(str(copy)) == str(copy), "unsealed and not asked for a build: served, with a warning"
    with pytest.raises(TritonHFError, match=f"no {HASHES}, so not provably build {pushed.build}"):
        storage.materialize(str(copy), build=pushed.build)


@pytest.fixture
def replicas(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[Replica]]:
    """Replicas the test starts; every process of them stopped at the end, their output shown if it failed."""
    started: list[Replica] = []
    failed_before = request.session.testsfailed
    try:
        yield started
    finally:
        with contextlib.ExitStack() as stops:
            for replica in started:
                stops.callback(replica.stop)
        if request.session.testsfailed > failed_before:
            for replica in started:
                print(f"\n--- replica {replica.name} ---\n{replica.output()}")


def stub_of(replica: Replica) -> psutil.Process:
    (server,) = [p for p in psutil.Process(replica.process.pid).children() if p.name() == "tritonserver"]
    (stub,) = stubs(server.pid, {CLASSIFIER})
    return psutil.Process(stub.pid)


def served(replica: Replica) -> Answers:
    found = {}
    for prompt in ASKED:
        status, body = call(replica.http_port, "POST", MODEL_PATH, infer_body(prompt))
        assert status == 200, body
        found[prompt] = answer(body)
    return found


def same(got: Answers, want: Answers) -> bool:
    return all(agrees(got[prompt], want[prompt]) for prompt in want)


def test_a_push_while_a_replica_heals_changes_nothing_it_serves(
    s3: S3,
    builds: dict[str, Path],
    answers: dict[str, Answers],
    replicas: list[Replica],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Serve build A from the prefix; kill the model's process and push build B to the same prefix while the
    supervisor heals it: the healed model answers as A, from A's verified copy. Again once B's push is complete.
    A replica started afterwards serves B, beside the first, in the same temporary directory."""
    prefix = "heal/repo"
    uri = s3.uri(prefix)
    a = storage.push(builds["a"], uri)
    copy_a = tmp_path / storage.BUILDS / a.build
    first = Replica("first", uri, tmp_path)
    replicas.append(first)
    first.start().wait_ready()
    assert same(served(first), answers["a"])
    assert stub_of(first).cmdline()[1].startswith(f"{copy_a}/"), "Triton serves the verified local copy"

    def heals(count: int) -> float:
        until(lambda: first.logs[-1].read_text().count("serving again") >= count, timeout=90, what="the heal")
        until(first.ready, timeout=30, what="readiness after the heal")
        return time.monotonic()

    killed_at = time.monotonic()
    stub_of(first).send_signal(signal.SIGKILL)
    healing = "serving again" not in first.logs[-1].read_text()
    assert cli.main(["push", str(builds["b"]), uri]) == 0
    pushed_at = time.monotonic()
    healed_at = heals(1)
    assert healing, "the push began before the heal ended"
    assert pointer(s3, prefix) == sealed_id(builds["b"]), "the prefix now names build B"
    after_first = served(first)
    assert same(after_first, answers["a"]), (after_first, answers)
    assert stub_of(first).cmdline()[1].startswith(f"{copy_a}/")

    stub_of(first).send_signal(signal.SIGKILL)  # B complete and named by the pointer before this heal starts
    heals(2)
    assert same(served(first), answers["a"])

    second = Replica("second", uri, tmp_path)  # a scale-up after the push: the new build, beside the old
    replicas.append(second)
    second.start().wait_ready()
    assert same(served(second), answers["b"]), "the replica started after the push serves B"
    assert copy_a.is_dir(), "B's replica left A's copy alone: a running server holds it"
    assert same(served(first), answers["a"])
    figures = {
        "builds": {"a": a.build, "b": sealed_id(builds["b"])},
        "push_of_b_s_after_kill": round(pushed_at - killed_at, 2),
        "heal_s_after_kill": round(healed_at - killed_at, 2),
        "supervisor_heal_s": re.findall(r"serving again after ([0-9.]+) s", first.logs[-1].read_text()),
        "push_done_before_heal": pushed_at <= healed_at,
        "answers_after_heal": {p[:20]: after_first[p] for p in ASKED[:2]},
        "answers_of_b": {p[:20]: answers["b"][p] for p in ASKED[:2]},
    }
    with capsys.disabled():
        print(f"\npush while healing: {figures}")
