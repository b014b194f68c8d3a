"""The Dockerfile and the pins: what can be checked without a Docker engine."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

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
    assert pins(ROOT / "requirements" / "runtime.txt")["tritonclient"] == "2.51.0"


def test_dockerfile_installs_what_make_setup_installs() -> None:
    runs = [arguments for _, arguments in instructions("RUN")]
    assert "pip install --no-cache-dir -r requirements/runtime.txt" in runs
    assert "pip install --no-cache-dir --no-deps --no-build-isolation ." in runs
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements/dev.txt -c requirements/lock-cpu.txt" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile
    assert "-r runtime.txt" in (ROOT / "requirements" / "dev.txt").read_text()


def test_direct_pins_agree_with_the_lock() -> None:
    lock = pins(ROOT / "requirements" / "lock-cpu.txt")
    for name in ("runtime.txt", "dev.txt"):
        for package, version in pins(ROOT / "requirements" / name).items():
            assert lock.get(package) == version, f"{name}: {package}=={version}, lock has {lock.get(package)}"
