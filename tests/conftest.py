"""Shared fixtures: tiny stand-in models built once per session, one real tritonserver, an S3 server on loopback."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tritonhf import storage
from tritonhf.repo_builder import BuildOptions, ModelEntry, build, plan
from tritonhf.server import TritonServer, free_port
from tritonhf.standins import write_standins
from tritonhf.variants import DEFAULT_VARIANTS

GEN = ("gpt2", "facebook/opt-125m")
CLASSIFIER = "distilbert-base-uncased-finetuned-sst-2-english"
EMBEDDER = "all-MiniLM-L6-v2"
GEN_MAX_LEN = 8


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-size", choices=("tiny", "full"), default="tiny", help="stand-ins the benchmarks use (make bench: full)"
    )


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Exports and parity checks run afresh in every session, never from the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cache")
        patch.setenv("TRITONHF_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny stand-ins under their tutorial names, plus the real trained all-MiniLM-L6-v2."""
    from tritonhf.demo import minilm

    root = tmp_path_factory.mktemp("standins")
    paths = write_standins(root, "tiny")
    paths[EMBEDDER] = minilm(root)
    return paths


@pytest.fixture(scope="session")
def entries(tiny: dict[str, Path]) -> list[ModelEntry]:
    return plan(
        gen=[str(tiny[name]) for name in GEN],
        classify=[str(tiny[CLASSIFIER])],
        embed=[str(tiny[EMBEDDER])],
        gen_max_len=GEN_MAX_LEN,
    )


SERVED_VARIANTS = (*DEFAULT_VARIANTS, "torchscript")  # the defaults, and TorchScript, built on request


@pytest.fixture(scope="session")
def repository(entries: list[ModelEntry], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32: the served answers are checked against in-process float32 references (reduced precision and its
    gate: test_precision.py)."""
    options = BuildOptions(
        output=tmp_path_factory.mktemp("repo") / "model_repository", dtype="float32", variants=SERVED_VARIANTS
    )
    return build(entries, options)


@pytest.fixture(scope="session")
def server(repository: Path, request: pytest.FixtureRequest) -> Iterator[TritonServer]:
    """One real tritonserver for the session; its log is printed if any test failed."""
    with TritonServer(repository) as running:
        failed_before = request.session.testsfailed
        yield running
        if request.session.testsfailed > failed_before:
            print(f"\n--- tritonserver log ({running.log_path}), last 8000 characters ---\n{running.log()[-8000:]}")


@dataclass(frozen=True)
class S3:
    """An S3-compatible server on loopback and its one bucket."""

    endpoint: str  # 127.0.0.1:PORT, plain HTTP
    bucket: str
    log: Path  # the server's access log

    def uri(self, prefix: str) -> str:
        """A repository URI in Triton's form for an S3-compatible endpoint: s3://host:port/bucket/prefix."""
        return f"s3://{self.endpoint}/{self.bucket}/{prefix}"

    def client(self) -> Any:
        return storage.s3_client(storage.parse(self.uri("")))

    def keys(self, prefix: str) -> set[str]:
        """Every object key under ``prefix/``, relative to it (a prefix of builds: the pointer and every build)."""
        return {key for key, _ in storage.objects(self.client(), storage.parse(self.uri(prefix)))}

    def writes(self, since: int = 0) -> list[tuple[str, str]]:
        """(method, path) of every write the server logged from byte ``since`` of its log on, in order."""
        text = self.log.read_bytes()[since:].decode(errors="replace")
        return re.findall(r'"(?:\x1b\[[0-9;]*m)*(PUT|POST|DELETE) (\S+) HTTP', text)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """A real S3 server (moto's server mode) on 127.0.0.1 with one empty bucket, for the whole session.

    Dummy credentials are set in this process's environment, so boto3 here and every server or
    ``tritonhf`` started from here (they inherit it) reach this endpoint and nothing else: no
    profile, no session token, no instance-metadata lookup (AWS_EC2_METADATA_DISABLED, which both
    boto3 and Triton's AWS SDK honour). Name the repository with ``s3.uri(prefix)``.
    """
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            except OSError:
                if moto.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto's S3 server did not start on 127.0.0.1:{port}:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as patch:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                patch.delenv(name, raising=False)
            patch.setenv("AWS_ACCESS_KEY_ID", "tritonhf-test")
            patch.setenv("AWS_SECRET_ACCESS_KEY", "tritonhf-test")
            patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
            patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
            store = S3(f"127.0.0.1:{port}", "tritonhf", log_path)
            store.client().create_bucket(Bucket=store.bucket)
            yield store
    finally:
        moto.terminate()
        try:
            moto.wait(10)
        except subprocess.TimeoutExpired:
            moto.kill()
            moto.wait()
