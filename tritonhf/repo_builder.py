"""Build a Triton model repository of batched Hugging Face models (``tritonhf build``).

The flags follow the Triton tutorial's ``create_repository.py`` (``--gen-models``,
``--class-models``, ``--gen-max-len``) plus ``--embed-models`` and the batching
and placement knobs. Every model is loaded before anything is written, so a
model that can't be loaded fails the build with a clear message; the new
repository is written beside the old one and swapped in whole.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tritonhf import TritonHFError, model_config

TUTORIAL_GEN_MODELS = ("facebook/opt-125m", "gpt2")
TUTORIAL_CLASS_MODELS = ("distilbert-base-uncased-finetuned-sst-2-english",)
BACKEND_FILES = ("model.py", "batching.py", "tasks.py")  # the generic model, copied into every version dir
MARKER = ".tritonhf.json"  # marks a directory this builder owns (and may replace) and lists its models
LOCAL_WEIGHTS = "hf_model"  # where a local model directory is copied, inside the version dir


@dataclass(frozen=True)
class BuildOptions:
    output: Path = Path("model_repository")
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    instances: int = 1
    device: str = "cpu"
    dtype: str = "auto"
    gen_max_len: int = 16


@dataclass(frozen=True)
class ModelEntry:
    """One model to serve: where it comes from, its task, and its Triton name."""

    source: str
    task: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The tutorial's rule: the last component of the hub id or path."""
        return Path(self.source.rstrip("/")).name

    @property
    def local(self) -> bool:
        return Path(self.source).is_dir()


def plan(gen: Sequence[str], classify: Sequence[str], embed: Sequence[str], gen_max_len: int) -> list[ModelEntry]:
    entries = [ModelEntry(s, "text-generation", {"max_length": str(gen_max_len)}) for s in gen]
    entries += [ModelEntry(s, "text-classification") for s in classify]
    entries += [ModelEntry(s, "feature-extraction") for s in embed]
    names = [entry.name for entry in entries]
    if clashes := sorted({name for name in names if names.count(name) > 1}):
        raise TritonHFError(f"two models would share the name {', '.join(clashes)}; serve them from differently named paths")
    if not entries:
        raise TritonHFError("no models to build: give --gen-models, --class-models or --embed-models")
    return entries


def triton_config(entry: ModelEntry, task: Any, options: BuildOptions) -> dict[str, Any]:
    """The config.pbtxt of one batched model, as a ModelConfig dict."""
    parameters = {
        "huggingface_model": LOCAL_WEIGHTS if entry.local else entry.source,
        "task": entry.task,
        "dtype": options.dtype,
        **task.parameters(),
    }
    return {
        "name": entry.name,
        "backend": "python",
        "max_batch_size": options.max_batch_size,
        "input": [{"name": "prompt", "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": s.name, "data_type": s.data_type, "dims": list(s.dims)} for s in task.outputs()],
        "dynamic_batching": {"max_queue_delay_microseconds": options.max_queue_delay_us},
        "instance_group": [{"count": options.instances, "kind": "KIND_GPU" if options.device == "gpu" else "KIND_CPU"}],
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }


def load(entries: Sequence[ModelEntry], dtype: str) -> list[Any]:
    """Load every model on the CPU: proves it loads and gives its output shapes."""
    from tritonhf.backends.python_hf.tasks import ConfigError, load_task, resolve_dtype

    try:
        resolve_dtype(dtype, "cpu")
    except ConfigError as err:
        raise TritonHFError(str(err)) from None
    tasks = []
    for entry in tqdm(entries, desc="loading models", unit="model"):
        try:
            tasks.append(load_task(entry.source, entry.task, device="cpu", dtype="float32", **entry.options))
        except Exception as err:  # noqa: BLE001 - any load failure stops the build with the model's name
            raise TritonHFError(f"cannot load {entry.source!r} for {entry.task}: {err}") from err
    return tasks


def link_or_copy(src: str, dst: str) -> None:
    """Hard links make a repository of full-size models cheap; copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_model(root: Path, entry: ModelEntry, task: Any, options: BuildOptions) -> None:
    version = root / entry.name / "1"
    version.mkdir(parents=True)
    backend = resources.files("tritonhf.backends.python_hf")
    for name in BACKEND_FILES:
        (version / name).write_text(backend.joinpath(name).read_text())
    if entry.local:
        shutil.copytree(entry.source, version / LOCAL_WEIGHTS, copy_function=link_or_copy)
    model_config.write(triton_config(entry, task, options), root / entry.name)


def replace_dir(new: Path, target: Path) -> None:
    """Swap a finished directory in for the old one; refuse to replace what we did not build."""
    if target.exists() and any(target.iterdir()) and not (target / MARKER).exists():
        raise TritonHFError(f"{target} exists and was not built by tritonhf; choose another --output or remove it")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def build(entries: Sequence[ModelEntry], options: BuildOptions) -> Path:
    """Load, then write the whole repository; returns its path."""
    tasks = load(entries, options.dtype)
    target = options.output.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for entry, task in zip(tqdm(entries, desc="writing models", unit="model"), tasks):
            write_model(staging, entry, task, options)
        manifest = {entry.name: {"source": entry.source, "task": entry.task} for entry in entries}
        (staging / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_manifest(repository: Path) -> dict[str, dict[str, str]]:
    """The models a tritonhf-built repository holds: name -> {source, task}."""
    return json.loads((repository / MARKER).read_text())


def model_list(value: str) -> list[str]:
    """Comma- or space-separated; an empty value means none."""
    return [item for item in value.replace(",", " ").split() if item]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def models(flag: str, default: Sequence[str], what: str) -> None:
        parser.add_argument(flag, type=model_list, default=list(default), help=f"{what}: hub ids or local directories, comma-separated; '' for none (default: {', '.join(default) or 'none'})")

    models("--gen-models", TUTORIAL_GEN_MODELS, "text-generation models")
    models("--class-models", TUTORIAL_CLASS_MODELS, "text-classification models")
    models("--embed-models", (), "feature-extraction models (mean-pooled, L2-normalised sentence embeddings)")
    defaults = BuildOptions()
    parser.add_argument("--gen-max-len", type=int, default=defaults.gen_max_len, help="new tokens per generated answer, prompt not counted (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=defaults.output, help="repository directory (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="default: %(default)s")
    parser.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us, help="how long the dynamic batcher may wait to fill a batch (default: %(default)s)")
    parser.add_argument("--instances", type=int, default=defaults.instances, help="model instances (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default=defaults.device, help="instance_group kind (default: %(default)s)")
    parser.add_argument("--dtype", default=defaults.dtype, help="auto (float16 on GPU, float32 on CPU), float32, float16 or bfloat16 (default: %(default)s)")


def run(args: argparse.Namespace) -> Path:
    if args.max_batch_size < 1 or args.instances < 1 or args.max_queue_delay_us < 0:
        raise TritonHFError("--max-batch-size and --instances must be >= 1, --max-queue-delay-us >= 0")
    entries = plan(args.gen_models, args.class_models, args.embed_models, args.gen_max_len)
    options = BuildOptions(args.output, args.max_batch_size, args.max_queue_delay_us, args.instances, args.device, args.dtype, args.gen_max_len)
    path = build(entries, options)
    for entry in entries:
        print(f"  {entry.name:<50} {entry.task:<20} {entry.source}")
    print(f"wrote {len(entries)} models to {path}")
    return path
