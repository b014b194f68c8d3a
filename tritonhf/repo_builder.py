"""Build a Triton model repository of batched Hugging Face models (``tritonhf build``).

The flags follow the Triton tutorial's ``create_repository.py`` (``--gen-models``,
``--class-models``, ``--gen-max-len``) plus ``--embed-models`` and the batching
and placement knobs. Every model is loaded before anything is written, so a
model that can't be loaded fails the build with a clear message; the new
repository is written beside the old one and swapped in whole.
"""

from __future__ import annotations

import argparse
import dataclasses
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
EXPORT_VARIANTS = ("onnx", "onnx-int8", "torchscript")  # classification and embedding models only
DEFAULT_VARIANTS = ("python", "stream", *EXPORT_VARIANTS)  # stream: <name>_stream, continuous batching, generation only
VARIANTS = (*DEFAULT_VARIANTS, "baseline")  # baseline: the tutorial's one-request-at-a-time model, for the perf suite
BASELINE_TASKS = ("text-generation", "text-classification")
TUTORIAL_OUTPUTS = ("text", "label", "score")  # what the baseline (the tutorial's pipeline) answers
SUFFIXES = {"python": "", "stream": "_stream", "baseline": "_baseline"}  # the variants served by the generic model
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
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    runtime: str = "auto"  # for the exported networks: native, python, or auto (native if the server has the backend)
    onnx_accelerator: str = "none"  # tensorrt: ONNX Runtime's TensorRT accelerator, native runtime on GPU
    max_running_sequences: int = 32  # streaming models: rows in the running batch
    max_running_tokens: int = 16384  # streaming models: rows x longest (prompt + max_new_tokens) in it
    max_waiting_steps: int = 10  # streaming models: admit waiting requests after at most this many steps


@dataclass(frozen=True)
class ModelEntry:
    """One model to serve: where it comes from, its task, and its Triton name."""

    source: str
    task: str
    options: dict[str, str] = field(default_factory=dict)
    variant: str = "python"  # or stream, or baseline (the tutorial's unbatched model, beside ours)

    @property
    def name(self) -> str:
        """The tutorial's rule: the last component of the hub id or path."""
        return Path(self.source.rstrip("/")).name + SUFFIXES[self.variant]

    @property
    def baseline(self) -> bool:
        return self.variant == "baseline"

    @property
    def streaming(self) -> bool:
        return self.variant == "stream"

    @property
    def local(self) -> bool:
        return Path(self.source).is_dir()


def plan(gen: Sequence[str], classify: Sequence[str], embed: Sequence[str], gen_max_len: int, gen_min_len: int = 0) -> list[ModelEntry]:
    entries = [ModelEntry(s, "text-generation", {"max_length": str(gen_max_len), "min_length": str(gen_min_len)}) for s in gen]
    entries += [ModelEntry(s, "text-classification") for s in classify]
    entries += [ModelEntry(s, "feature-extraction") for s in embed]
    names = [entry.name for entry in entries]
    if clashes := sorted({name for name in names if names.count(name) > 1}):
        raise TritonHFError(f"two models would share the name {', '.join(clashes)}; serve them from differently named paths")
    if not entries:
        raise TritonHFError("no models to build: give --gen-models, --class-models or --embed-models")
    return entries


def triton_config(entry: ModelEntry, task: Any, options: BuildOptions) -> dict[str, Any]:
    """The config.pbtxt of one model served by the generic model.py, as a ModelConfig dict.

    Generation models also take their parameters as optional input tensors
    (``stop`` may hold any number of strings, so it batches raggedly). The
    baseline is the tutorial's: unbatched, prompt only. A stream is unbatched
    for Triton (one prompt a request, as Triton's generate endpoints send it)
    and decoupled; its scheduler does the batching.
    """
    parameters = {
        "huggingface_model": LOCAL_WEIGHTS if entry.local else entry.source,
        "task": entry.task,
        "dtype": options.dtype,
        **task.parameters(),
        **({"step": "baseline"} if entry.baseline else {}),
        **({"max_running_sequences": str(options.max_running_sequences), "max_running_tokens": str(options.max_running_tokens), "max_waiting_steps": str(options.max_waiting_steps)} if entry.streaming else {}),
    }
    optional = [] if entry.baseline or not hasattr(task, "optional_inputs") else task.optional_inputs()
    config = {
        "name": entry.name,
        "backend": "python",
        "max_batch_size": options.max_batch_size if entry.variant == "python" else 0,
        "input": [{"name": "prompt", "data_type": "TYPE_STRING", "dims": [1]}]
        + [{"name": s.name, "data_type": s.data_type, "dims": list(s.dims), "optional": True, "allow_ragged_batch": -1 in s.dims} for s in optional],
        "output": [{"name": s.name, "data_type": s.data_type, "dims": list(s.dims)} for s in task.outputs() if not entry.baseline or s.name in TUTORIAL_OUTPUTS],
        "instance_group": [{"count": options.instances, "kind": "KIND_GPU" if options.device == "gpu" else "KIND_CPU"}],
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }
    if entry.variant == "python":
        config["dynamic_batching"] = {"max_queue_delay_microseconds": options.max_queue_delay_us}
    if entry.streaming:
        config["model_transaction_policy"] = {"decoupled": True}
    return config


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


def copy_backend(version: Path) -> None:
    """The generic model: every module of backends/python_hf, into a version directory."""
    for source in resources.files("tritonhf.backends.python_hf").iterdir():
        if source.name.endswith(".py") and source.name != "__init__.py":
            (version / source.name).write_text(source.read_text())


def write_model(root: Path, entry: ModelEntry, task: Any, options: BuildOptions) -> None:
    version = root / entry.name / "1"
    version.mkdir(parents=True)
    copy_backend(version)
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


def variants_for(entry: ModelEntry, variants: Sequence[str]) -> list[str]:
    """The requested variants that apply to a model: exports exist for classification and embeddings."""
    generation = entry.task == "text-generation"
    applicable = [v for v in variants if v == "python" or (v == "baseline" and entry.task in BASELINE_TASKS) or (v == "stream" and generation) or (v in EXPORT_VARIANTS and not generation)]
    if not applicable:
        raise TritonHFError(f"{entry.name} ({entry.task}) has none of the variants {', '.join(variants)}: generation models are served as python, stream or baseline")
    return applicable


def choose_runtime(requested: str, variants: Sequence[str]) -> str:
    """native where the server has the native backend of every exported variant, else the Python backend."""
    if requested != "auto":
        return requested
    from tritonhf.backends.onnx_export.exporters import VARIANTS as EXPORTS
    from tritonhf.server import available_backends

    return "native" if {EXPORTS[v].backend for v in variants if v in EXPORTS} <= available_backends() else "python"


def build(entries: Sequence[ModelEntry], options: BuildOptions) -> Path:
    """Load and export everything, then write the whole repository; returns its path."""
    from tritonhf.ensembles import export_model, parity_table, write_ensembles

    unknown = set(options.variants) - set(VARIANTS)
    if unknown:
        raise TritonHFError(f"unknown variants {', '.join(sorted(unknown))}; known: {', '.join(VARIANTS)}")
    plans = [(entry, variants_for(entry, options.variants)) for entry in entries]
    tasks = load(entries, options.dtype)
    exported = [
        export_model(entry.name, entry.source, task, [v for v in variants if v in EXPORT_VARIANTS])
        for (entry, variants), task in zip(plans, tasks)
        if set(variants) & set(EXPORT_VARIANTS)
    ]
    runtime = choose_runtime(options.runtime, options.variants) if exported else options.runtime
    manifest: dict[str, dict[str, str]] = {}
    target = options.output.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for (entry, variants), task in zip(tqdm(plans, desc="writing models", unit="model"), tasks):
            for variant in [v for v in variants if v in SUFFIXES]:
                served = dataclasses.replace(entry, variant=variant)
                write_model(staging, served, task, options)
                manifest[served.name] = {"source": entry.source, "task": entry.task, "variant": variant}
        for model in exported:
            for made, name in zip(model.exports, write_ensembles(staging, model, runtime, options)):
                manifest[name] = {"source": model.source, "task": model.task.task, "variant": made.variant.name, "runtime": runtime}
        (staging / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if exported:
        print(f"exported networks run on the {runtime} runtime" + (" (auto: this server lacks their native backends)" if options.runtime == "auto" and runtime == "python" else ""))
        print(parity_table(exported))
    return target


def read_manifest(repository: Path) -> dict[str, dict[str, str]]:
    """The models a tritonhf-built repository serves: name -> {source, task, variant[, runtime]}."""
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
    parser.add_argument("--gen-max-len", type=int, default=16, help="new tokens per generated answer, prompt not counted (default: %(default)s)")
    parser.add_argument("--gen-min-len", type=int, default=0, help="new tokens before EOS may end an answer; = --gen-max-len for speed tests with random weights (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=defaults.output, help="repository directory (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="default: %(default)s")
    parser.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us, help="how long the dynamic batcher may wait to fill a batch (default: %(default)s)")
    parser.add_argument("--instances", type=int, default=defaults.instances, help="model instances (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default=defaults.device, help="instance_group kind (default: %(default)s)")
    parser.add_argument("--dtype", default=defaults.dtype, help="auto (float16 on GPU, float32 on CPU), float32, float16 or bfloat16 (default: %(default)s)")
    parser.add_argument("--variants", type=lambda v: tuple(model_list(v)), default=defaults.variants, help=f"of {', '.join(VARIANTS)}; exports apply to classification and embedding models (ensembles <name>_<variant>), baseline to generation and classification (<name>_baseline) (default: {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--runtime", choices=("auto", "native", "python"), default=defaults.runtime, help="for exported networks: native onnxruntime/libtorch backends (NGC containers), the python backend, or auto (default: %(default)s)")
    parser.add_argument("--gen-max-running", type=int, default=defaults.max_running_sequences, help="streaming models: most sequences in the running batch; more wait (default: %(default)s)")
    parser.add_argument("--gen-max-running-tokens", type=int, default=defaults.max_running_tokens, help="streaming models: bound on rows x longest (prompt + max_new_tokens) in the running batch, i.e. KV-cache size in tokens (default: %(default)s)")
    parser.add_argument("--gen-max-waiting-steps", type=int, default=defaults.max_waiting_steps, help="streaming models: decoding steps a request may wait before it is admitted; 0 admits at every step (default: %(default)s)")
    parser.add_argument("--onnx-accelerator", choices=("none", "tensorrt"), default=defaults.onnx_accelerator, help="ONNX Runtime accelerator for native GPU instances (default: %(default)s)")


def run(args: argparse.Namespace) -> Path:
    if min(args.max_batch_size, args.instances, args.gen_max_running, args.gen_max_running_tokens) < 1 or args.max_queue_delay_us < 0:
        raise TritonHFError("--max-batch-size, --instances, --gen-max-running and --gen-max-running-tokens must be >= 1, --max-queue-delay-us >= 0")
    if args.gen_max_waiting_steps < 0:
        raise TritonHFError("--gen-max-waiting-steps must be >= 0")
    entries = plan(args.gen_models, args.class_models, args.embed_models, args.gen_max_len, args.gen_min_len)
    options = BuildOptions(args.output, args.max_batch_size, args.max_queue_delay_us, args.instances, args.device, args.dtype, args.variants, args.runtime, args.onnx_accelerator, args.gen_max_running, args.gen_max_running_tokens, args.gen_max_waiting_steps)
    path = build(entries, options)
    manifest = read_manifest(path)
    for name, served in manifest.items():
        print(f"  {name:<50} {served['task']:<20} {served['variant']:<12} {served['source']}")
    print(f"wrote {len(manifest)} served models to {path}")
    return path
