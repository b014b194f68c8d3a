"""The Dockerfile and the pins: what can be checked without a Docker engine."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from tritonhf import cli

ROOT = Path(__file__).resolve().parent.parent


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(maxsplit=1)[0], line.split(maxsplit=1)[1]) for line in lines if line.split()[0] == name]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", line):
            found[match[1].lower().replace("_", "-")] = match[3]
    return found


def test_every_file_the_dockerfile_copies_exists() -> None:
    copies = instructions("COPY")
    assert copies
    for _, arguments in copies:
        *sources, _ = shlex.split(arguments)
        for source in sources:
            assert (ROOT / source).exists(), source


def test_dockerfile_matches_the_tested_server_version() -> None:
    [(_, image)] = instructions("FROM")
    assert image == "nvcr.io/nvidia/tritonserver:24.10-py3", "24.10 is Triton 2.51.0"
    assert pins(ROOT / "requirements" / "base.txt")["tritonclient"] == "2.51.0"


def test_dockerfile_installs_what_make_setup_installs() -> None:
    runs = [arguments for _, arguments in instructions("RUN")]
    assert 'pip install --no-cache-dir -r "requirements/$([ "$DEVICE" = gpu ] && echo gpu || echo runtime).txt"' in runs
    assert any(run.startswith("pip install --no-cache-dir --no-deps --no-build-isolation ") for run in runs)
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements/dev.txt -c requirements/lock-cpu.txt" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile
    assert "-r runtime.txt" in (ROOT / "requirements" / "dev.txt").read_text()


def test_direct_pins_agree_with_the_lock() -> None:
    lock = pins(ROOT / "requirements" / "lock-cpu.txt")
    for name in ("base.txt", "runtime.txt", "dev.txt"):
        for package, version in pins(ROOT / "requirements" / name).items():
            assert lock.get(package) == version, f"{name}: {package}=={version}, lock has {lock.get(package)}"


def test_cpu_and_gpu_paths_differ_only_in_onnx_runtime() -> None:
    """Both install the shared pins; the GPU path keeps numpy < 2 (the pip server's stub needs it for BYTES)."""
    cpu, gpu = (pins(ROOT / "requirements" / name) for name in ("runtime.txt", "gpu.txt"))
    assert cpu == {"onnxruntime": "1.32.0"} and set(gpu) == {"onnxruntime-gpu"}
    for name in ("runtime.txt", "gpu.txt"):
        assert "-r base.txt" in (ROOT / "requirements" / name).read_text().splitlines()
    assert pins(ROOT / "requirements" / "base.txt")["numpy"].startswith("1.")


def image_path(root: Path, workdir: PurePosixPath, path: str) -> Path:
    """Where a path of the image lands under ``root``: absolute, or relative to the WORKDIR."""
    return root / (workdir / path).relative_to("/")


def docker_context(root: Path) -> tuple[Path, Path]:
    """Lay out under ``root`` exactly what the Dockerfile's COPY lines put in the image.

    Returns (the directory pip installs, the WORKDIR the build's RUN lines run in).
    """
    [(_, workdir)] = instructions("WORKDIR")
    workdir = PurePosixPath(workdir)
    for _, arguments in instructions("COPY"):
        *sources, destination = shlex.split(arguments)
        for source in sources:
            target = image_path(root, workdir, destination)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                if destination.endswith("/"):
                    target = target / Path(source).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, target)
    [install] = [shlex.split(run) for _, run in instructions("RUN") if "--no-deps" in run]
    package = install[: install.index("&&")][-1] if "&&" in install else install[-1]
    return image_path(root, workdir, package), image_path(root, workdir, ".")


@pytest.mark.slow
def test_the_docker_build_context_installs_and_runs(tmp_path: Path) -> None:
    """The image's own steps on exactly its build context: pip installs the package, repo_builder.py runs.

    A COPY line that misses a file the package or the script needs fails here. The
    installed copy must be the one imported (not this checkout, not the editable install).
    """
    package, workdir = docker_context(tmp_path / "image")
    target = tmp_path / "site-packages"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    installed = subprocess.run([*pip, str(package)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "repo_builder.py", "--help"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "--gen-models" in run.stdout, run.stdout + run.stderr
    where = "import tritonhf.backends.python_hf.steps as m, tritonhf.perf.suite as s; print(m.__file__, s.__file__)"
    imported = subprocess.run(
        [sys.executable, "-c", where], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )
    assert imported.returncode == 0, imported.stderr
    assert all(Path(path).is_relative_to(target) for path in imported.stdout.split()), imported.stdout


def test_the_container_runs_the_supervisor() -> None:
    """The image heals and drains as `tritonhf serve` does: it is the entry point, bound to every interface, with
    the OpenAI API on a port the image exposes."""
    [(_, command)] = instructions("CMD")
    assert json.loads(command)[:2] == ["tritonhf", "serve"] and "0.0.0.0" in json.loads(command)
    serve = cli.parser().parse_args(json.loads(command)[1:])
    [(_, exposed)] = instructions("EXPOSE")
    assert serve.openai_port and str(serve.openai_port) in exposed.split()
