"""Shared fixtures: tiny stand-in models built once per session, and one real tritonserver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tritonhf.repo_builder import BuildOptions, ModelEntry, build, plan
from tritonhf.server import TritonServer
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
