"""A model repository on disk: the generic model's files, local weights, the manifest, the seal, the atomic swap.

Both writers of a repository (repo_builder.py for the Python-backend models,
ensembles.py for the exported variants) put their models in through these.

A finished build is sealed: ``HASHES`` records every other file's sha256 in
``sha256sum``'s format (so ``sha256sum -c .tritonhf.sha256`` checks a copy by
hand), and the build's id is derived from that record. The same files give the
same id wherever they are built or copied; one changed byte gives another id.
Every copy of a build (pushed to object storage, downloaded by ``tritonhf
serve``, copied by KServe) is checked against its record before it is served.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from tritonhf import TritonHFError, model_config

MARKER = ".tritonhf.json"  # marks a directory this builder owns (and may replace) and lists its models
LOCAL_WEIGHTS = "hf_model"  # where a local model directory is copied, inside the version dir
Manifest = dict[str, dict[str, str]]  # served name -> source, task, variant[, runtime]
HASHES = ".tritonhf.sha256"  # the seal: every other file's sha256, one "<hex>  <path>" line each, sorted by path
BUILD_ID = re.compile(r"^[0-9a-f]{16}$")  # the first 16 hex digits of the seal's own sha256
DIGEST = re.compile(r"^[0-9a-f]{64}$")


def link_or_copy(src: str, dst: str) -> None:
    """Hard links make a repository of full-size models cheap; copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def backend_modules() -> dict[str, str]:
    """The generic model as this tritonhf has it: every module of backends/python_hf, name -> text."""
    return {
        source.name: source.read_text()
        for source in resources.files("tritonhf.backends.python_hf").iterdir()
        if source.name.endswith(".py") and source.name != "__init__.py"
    }


def copy_backend(version: Path) -> None:
    """The generic model, into a version directory."""
    for name, text in backend_modules().items():
        (version / name).write_text(text)


def runs_this_backend(root: Path) -> bool:
    """Whether ``root`` is a tritonhf build whose Python models all carry this tritonhf's generic model. A
    repository holds its own copy of that code, so a cached build (a bench's) outlives changes to it."""
    modules, versions = backend_modules(), {path.parent for path in root.glob("*/*/model.py")}
    return (root / MARKER).is_file() and all(
        (version / name).is_file() and (version / name).read_text() == text
        for version in versions
        for name, text in modules.items()
    )


def write_model(root: Path, config: model_config.Config, weights: str | None = None) -> Path:
    """One model: its config.pbtxt and version directory, the generic model's files if it runs in the
    Python backend, and a local model directory copied (hard-linked) into ``1/hf_model``."""
    version = root / config["name"] / "1"
    version.mkdir(parents=True, exist_ok=True)  # ensembles need an (empty) version directory too
    if config.get("backend") == "python":
        copy_backend(version)
    if weights is not None:
        shutil.copytree(weights, version / LOCAL_WEIGHTS, copy_function=link_or_copy)
    model_config.write(config, root / config["name"])
    return version


@contextmanager
def staged(target: Path, marker: str = MARKER) -> Iterator[Path]:
    """A directory to write beside ``target``, swapped in whole (replace_dir) if the block ends without error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        replace_dir(staging, target, marker)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(new: Path, target: Path, marker: str = MARKER) -> None:
    """Swap a finished directory in for the old one; refuse to replace what we did not build (no ``marker``)."""
    if target.exists() and any(target.iterdir()) and not (target / marker).exists():
        raise TritonHFError(f"{target} exists and was not built by tritonhf; choose another --output or remove it")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except OSError:
        if old.exists():  # the swap failed half-way: the previous repository goes back in place
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(root: Path, manifest: Manifest) -> None:
    (root / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(repository: Path) -> Manifest:
    """The models a tritonhf-built repository serves: name -> {source, task, variant[, runtime]}."""
    return json.loads((repository / MARKER).read_text())


def manifest_if_any(repository: Path) -> Manifest:
    """The manifest where the repository is tritonhf's (any Triton repository may be served): else none."""
    return read_manifest(repository) if (repository / MARKER).is_file() else {}


def local_files(root: Path) -> list[str]:
    """A local repository's files, relative; a local server's bytecode (__pycache__) is not the repository's."""
    return sorted(
        str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and "__pycache__" not in path.parts
    )


def sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def record(hashes: Mapping[str, str]) -> str:
    """The seal's text: sorted, so that the same files always give the same text, and so the same build id."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items()))


def parse_record(text: str, where: str) -> dict[str, str]:
    """Relative path -> sha256, from a seal's text."""
    hashes = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if not DIGEST.match(digest) or not name or name.startswith("/") or ".." in name.split("/"):
            raise TritonHFError(f"{where}: {HASHES} is malformed at {line[:120]!r}")
        hashes[name] = digest
    return hashes


def build_id(record_text: str) -> str:
    """A build's id, from its seal: content-derived, so a build pushed twice is the same build."""
    return hashlib.sha256(record_text.encode()).hexdigest()[:16]


def seal(root: Path) -> str:
    """Record the sha256 of every file of a finished repository (all but the record itself and bytecode); returns
    the build id. Called last in a build: whatever files the build wrote are sealed, the manifest included."""
    names = [name for name in local_files(root) if name != HASHES]
    if odd := [name for name in names if "\n" in name or "\\" in name]:
        raise TritonHFError(f"{root}: file names with a newline or a backslash cannot be sealed: {odd[:3]}")
    text = record({name: sha256(root / name) for name in names})
    (root / HASHES).write_text(text)
    return build_id(text)


def sealed_id(root: Path) -> str | None:
    """The build id of a sealed repository (from its record, unchecked); None for one built before seals."""
    path = root / HASHES
    return build_id(path.read_text()) if path.exists() else None


def check_listing(where: str, hashes: Iterable[str], present: Iterable[str]) -> None:
    """Refuse a copy of a build that lacks a recorded file or holds one the build did not have."""
    expected, found = set(hashes), set(present) - {HASHES}
    if missing := sorted(expected - found):
        raise TritonHFError(f"{where}: {missing[0]} is missing (recorded in {HASHES}; {len(missing)} missing in all)")
    if unexpected := sorted(found - expected):
        raise TritonHFError(
            f"{where}: {unexpected[0]} is not part of the build (not in {HASHES}; {len(unexpected)} such files)"
        )


def mismatch(where: str, name: str, found: str, expected: str) -> TritonHFError:
    return TritonHFError(
        f"{where}: {name} does not match the build: sha256 {found[:16]}..., recorded {expected[:16]}... in {HASHES}"
        " (changed after the build, or corrupted); refusing to serve it"
    )


def verify(root: Path, build: str | None = None) -> str:
    """Check a local copy of a build against its seal (and, if given, its id): every recorded file there and
    unchanged, no other file. Returns the build id; raises naming the first file that differs."""
    text = (root / HASHES).read_text()
    if build is not None and build_id(text) != build:
        raise TritonHFError(f"{root}: {HASHES} is not build {build}'s record (its id is {build_id(text)})")
    hashes = parse_record(text, str(root))
    check_listing(str(root), hashes, local_files(root))
    for name, expected in hashes.items():
        if (found := sha256(root / name)) != expected:
            raise mismatch(str(root), name, found, expected)
    return build_id(text)
