"""The structure the README promises: every module listed where it lives, no import cycles,
and the Triton-side model code free of the tritonhf package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"tritonhf": ROOT / "tritonhf", "tritonhf.backends": ROOT / "backends", "tritonhf.perf": ROOT / "perf"}
VARIANT_NAMES = ("baseline", "python", "stream", "onnx", "onnx-int8", "torchscript")


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (pyproject's package-dir remapping applied)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module this one imports, at any depth of its code (lazy imports count), resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_every_module_is_listed_in_the_readme_layout() -> None:
    layout = re.search(r"## Layout\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    listed: dict[str, set[str]] = {}
    folder = ""
    for line in layout.splitlines():
        entry = re.split(r"\s{2,}", line.strip())[0]
        if not line.startswith(" "):
            folder = entry if entry.endswith("/") else ""
            listed.setdefault(folder, set()).update([] if folder else [entry])
        else:
            listed.setdefault(folder, set()).update(re.findall(r"[\w.]+\.(?:py|json)", entry))
    for folder in ("backends/python_hf/", "backends/onnx_export/", "tritonhf/", "tritonhf/openai_api/", "perf/"):
        actual = {p.name for p in (ROOT / folder).iterdir() if p.suffix in (".py", ".json") and p.name != "__init__.py"}
        assert listed.get(folder) == actual, (
            f"README Layout, {folder}: lists {sorted(listed.get(folder, ()))}, has {sorted(actual)}"
        )
    top = {p.name for p in ROOT.glob("*.py")} | {"Dockerfile"}
    assert top <= listed[""], f"README Layout misses {sorted(top - listed[''])}"


def test_no_import_cycles() -> None:
    known = modules()
    graph = {
        name: {other for other in imports(name, path) if other in known and other != name}
        for name, path in known.items()
    }
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, "import cycle: " + " -> ".join((*trail[trail.index(name) :], name))
        if name in done:
            return
        for other in graph[name]:
            if not name.startswith(other + "."):  # a module importing its own package's __init__ is no cycle
                visit(other, (*trail, name))
        done.add(name)

    for name in graph:
        visit(name, ())


def test_the_model_code_never_imports_tritonhf() -> None:
    """backends/python_hf is copied into every model: it stands alone, its modules import each other relatively."""
    for path in (ROOT / "backends" / "python_hf").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("tritonhf", "backends", "perf") for n in names), (
                f"{path.name} imports {names}"
            )


OPENAI_SPEAKERS = ("tritonhf.openai_api", "tritonhf.demo", "tritonhf.perf.openai_bench")


def test_each_variant_name_is_declared_once() -> None:
    """A variant's name, as a string literal, appears in the registry's declaration and nowhere else in the code."""
    for name, path in modules().items():
        literals = {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)}
        named = {variant for variant in VARIANT_NAMES if variant in literals}
        if name == "tritonhf.variants":
            assert named == set(VARIANT_NAMES)
        else:
            # also Triton's Python backend (and a runtime); the onnx package (and optimum's exporter); and where a
            # module speaks the OpenAI API, its field "stream"
            words = {"python", "onnx"} | ({"stream"} if name.startswith(OPENAI_SPEAKERS) else set())
            stray = named - words
            assert not stray, f"{path.relative_to(ROOT)} spells variant names {sorted(stray)}"


def test_the_command_starts_without_torch() -> None:
    """`tritonhf client` starts at once: the CLI imports neither torch nor transformers until a command needs them."""
    probe = "import sys, tritonhf.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


# A section named in code or help text: README, "Title" / README 'Title' / README.md, "Title" (a prefix of the title)
SECTION_REFERENCE = re.compile(r"README(?:\.md)?,?\s+([\"'])(.+?)\1", re.S)


def test_every_readme_section_the_code_names_exists() -> None:
    """A newcomer follows `--help` or a docstring to a README section: it must be there (its title, or the start of
    it; a reference may wrap over lines and comments)."""
    titles = [line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines() if line[:1] == "#"]
    named = {
        (path.relative_to(ROOT), " ".join(re.sub(r"\s*#\s*|\s+", " ", title).split()))
        for path in modules().values()
        for _, title in SECTION_REFERENCE.findall(path.read_text())
    }
    assert len(named) >= 8, named  # the pattern still finds the references
    missing = sorted((str(path), title) for path, title in named if not any(t.startswith(title) for t in titles))
    assert not missing, missing
