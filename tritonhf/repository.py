"""A model repository on disk: the generic model's files, local weights, the manifest, the atomic swap.

Both writers of a repository (repo_builder.py for the Python-backend models,
ensembles.py for the exported variants) put their models in through these.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from tritonhf import TritonHFError, model_config

MARKER = ".tritonhf.json"  # marks a directory this builder owns (and may replace) and lists its models
LOCAL_WEIGHTS = "hf_model"  # where a local model directory is copied, inside the version dir
Manifest = dict[str, dict[str, str]]  # served name -> source, task, variant[, runtime]


def link_or_copy(src: str, dst: str) -> None:
    """Hard links make a repository of full-size models cheap; copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_backend(version: Path) -> None:
    """The generic model: every module of backends/python_hf, into a version directory."""
    for source in resources.files("tritonhf.backends.python_hf").iterdir():
        if source.name.endswith(".py") and source.name != "__init__.py":
            (version / source.name).write_text(source.read_text())


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
