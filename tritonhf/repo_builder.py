"""Build a Triton model repository of batched Hugging Face models (``tritonhf build``).

The flags follow the Triton tutorial's ``create_repository.py`` (``--gen-models``,
``--class-models``, ``--gen-max-len``) plus ``--embed-models`` and the batching
and placement knobs. Which models each source becomes is the variant registry's
business (variants.py): the generic Python model serves some variants itself
(written here), exported ones are ensembles (ensembles.py). Every model is
loaded before anything is written, so a model that can't be loaded fails the
build with a clear message; the new repository is written beside the old one
and swapped in whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tritonhf import TritonHFError, cache_dir, model_config, placement, precision, storage
from tritonhf.backends.python_hf.hardware import MAX_CPU_INSTANCES, cpu_count, cpu_threads, default_instances
from tritonhf.backends.python_hf.parameters import GenerationParams, Limits
from tritonhf.backends.python_hf.tensors import PROMPT
from tritonhf.backends.python_hf.tutorial import OUTPUTS as TUTORIAL_OUTPUTS
from tritonhf.buildlog import libraries_to
from tritonhf.repository import (
    LOCAL_WEIGHTS,
    Manifest,
    read_manifest,
    seal,
    sealed_id,
    staged,
    write_manifest,
    write_model,
)
from tritonhf.tuning import add_goal_arguments, goal_arguments
from tritonhf.variants import (
    CLASSIFICATION,
    DEFAULT_VARIANTS,
    EMBEDDING,
    FUSED,
    GENERATION,
    NATIVE,
    PYTHON,
    RUNTIMES,
    VARIANTS,
    Variant,
    by_names,
)

TUTORIAL_GEN_MODELS = ("facebook/opt-125m", "gpt2")
TUTORIAL_CLASS_MODELS = ("distilbert-base-uncased-finetuned-sst-2-english",)


@dataclass(frozen=True)
class BuildOptions:
    output: Path = Path("model_repository")
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    instances: int = 0  # per model; 0: hardware.default_instances (one single-threaded instance per CPU core)
    device: str = "cpu"
    dtype: str = "auto"
    gate_for: str = "any-host"  # precision.GATE_FOR
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    runtime: str = "auto"  # exported variants: variants.RUNTIMES, or auto (native if the server has the backends)
    onnx_accelerator: str = "none"  # tensorrt: ONNX Runtime's TensorRT accelerator, native runtime on GPU
    limits: Limits = field(default_factory=Limits)  # streaming models: the running batch's bounds and admission
    queue: model_config.QueuePolicy = field(default_factory=model_config.QueuePolicy)  # every batched model


@dataclass(frozen=True)
class ModelEntry:
    """One model to serve: where it comes from, its task, and the variant served."""

    source: str
    task: str
    options: dict[str, str] = field(default_factory=dict)
    variant: Variant = PYTHON

    @property
    def base(self) -> str:
        """The tutorial's rule: the last component of the hub id or path."""
        return Path(self.source.rstrip("/")).name

    @property
    def name(self) -> str:
        return self.variant.served_name(self.base)

    @property
    def local(self) -> bool:
        return Path(self.source).is_dir()

    @property
    def looks_local(self) -> bool:
        """Meant as a path: ./x, ../x, /x, or under a directory that exists (a hub id is owner/name)."""
        path = Path(self.source)
        return self.source.startswith((".", "/")) or (len(path.parts) > 1 and path.parent.is_dir())


def plan(
    gen: Sequence[str], classify: Sequence[str], embed: Sequence[str], gen_max_len: int, gen_min_len: int = 0
) -> list[ModelEntry]:
    defaults = dataclasses.replace(
        GenerationParams(), max_new_tokens=gen_max_len, min_new_tokens=gen_min_len
    ).as_config()
    entries = [ModelEntry(s, GENERATION, defaults) for s in gen]
    entries += [ModelEntry(s, CLASSIFICATION) for s in classify]
    entries += [ModelEntry(s, EMBEDDING) for s in embed]
    names = [entry.name for entry in entries]
    if clashes := sorted({name for name in names if names.count(name) > 1}):
        raise TritonHFError(
            f"two models would share the name {', '.join(clashes)}; serve them from differently named paths"
        )
    if not entries:
        raise TritonHFError("no models to build: give --gen-models, --class-models or --embed-models")
    return entries


def triton_config(
    entry: ModelEntry, task: Any, options: BuildOptions, verified: Sequence[str] = ()
) -> model_config.Config:
    """The config.pbtxt of a model the generic model.py serves itself.

    Generation models also take their parameters as optional input tensors. The
    baseline has the tutorial's interface only. A stream is unbatched for Triton
    (one prompt a request, as Triton's generate endpoints send it) and
    decoupled; its scheduler does the batching. The model picks its dtype where it
    runs, among the ones the precision gate passed (precision.py); the baseline
    is the tutorial's float32 pipeline.
    """
    generic = entry.variant.generic
    precision = {"dtype": options.dtype, "verified_dtypes": ",".join(verified)} if generic.eager else {}
    parameters = {
        "huggingface_model": LOCAL_WEIGHTS if entry.local else entry.source,
        "task": entry.task,
        **precision,
        **task.parameters(),
        **({"step": generic.step} if generic.step != "hf" else {}),
        **(options.limits.as_config() if generic.decoupled else {}),
    }
    optional = [] if generic.tutorial_io or not hasattr(task, "optional_inputs") else task.optional_inputs()
    outputs = [s for s in task.outputs() if not generic.tutorial_io or s.name in TUTORIAL_OUTPUTS[entry.task]]
    return model_config.python_model(
        entry.name,
        model_config.tensors([PROMPT, *optional]),
        model_config.tensors(outputs),
        parameters,
        max_batch_size=options.max_batch_size if generic.batched else 0,
        queue_delay_us=options.max_queue_delay_us if generic.batched else None,
        queue=options.queue,
        # the tutorial's model: one instance; a stream on CPUs: one running batch over all of them (README, Perf)
        instances=1 if generic.tutorial_io or (generic.decoupled and options.device == "cpu") else options.instances,
        device=options.device,
        decoupled=generic.decoupled,
    )


def load(entries: Sequence[ModelEntry], dtype: str) -> list[Any]:
    """Load every model on the CPU: proves it loads and gives its output shapes."""
    from tritonhf.backends.python_hf.tasks import ConfigError, load_task, resolve_dtype

    try:
        resolve_dtype(dtype, "cpu")
    except ConfigError as err:
        raise TritonHFError(str(err)) from None
    for entry in entries:  # before any load: a mistyped path fails at once, not after the hub's retries
        if entry.looks_local and not entry.local:
            raise TritonHFError(f"{entry.source}: no such directory (a path to a local model; a hub id is owner/name)")
    if (needed := [e.source for e in entries if not e.local and not in_hub_cache(e.source)]) and not hub_reachable():
        raise TritonHFError(f"{', '.join(needed)}: not in the local Hugging Face cache{OFFLINE_HINT}")
    tasks = []
    for entry in tqdm(entries, desc="loading models", unit="model"):
        try:
            tasks.append(load_task(entry.source, entry.task, device="cpu", dtype="float32", **entry.options))
        except Exception as err:
            hint = OFFLINE_HINT if not entry.local and unreachable(err) else ""
            raise TritonHFError(f"cannot load {entry.source!r} for {entry.task}: {err}{hint}") from err
    return tasks


OFFLINE_HINT = (
    "\nthe Hugging Face Hub cannot be reached from here: build from local directories instead, e.g. the offline"
    " stand-ins that `tritonhf standins` writes (README, 'Offline stand-ins')"
)


def in_hub_cache(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def hub_reachable(timeout: float = 5.0) -> bool:
    """One request to the hub (HF_ENDPOINT) before loading: unreachable, a build fails at once, not after the
    download's retries (53 s)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False
    return True


def unreachable(err: BaseException) -> bool:
    """The hub could not be reached (no network, or HF_HUB_OFFLINE): huggingface_hub's and requests' errors."""
    text = f"{type(err).__name__}: {err}"
    return any(
        sign in text
        for sign in ("ConnectionError", "couldn't connect", "offline mode", "Max retries", "LocalEntryNotFound")
    )


def variants_for(entry: ModelEntry, variants: Sequence[Variant]) -> list[Variant]:
    """The requested variants that apply to a model's task."""
    applicable = [variant for variant in variants if entry.task in variant.tasks]
    if not applicable:
        offered = ", ".join(variant.name for variant in VARIANTS.values() if entry.task in variant.tasks)
        names = ", ".join(variant.name for variant in variants)
        raise TritonHFError(
            f"{entry.name} ({entry.task}) has none of the variants {names}: {entry.task} is served as {offered}"
        )
    return applicable


def choose_runtime(requested: str, variants: Sequence[Variant]) -> str:
    """native where the server has the native backend of every exported variant, else the fused Python model."""
    if requested != "auto":
        return requested
    from tritonhf.server import available_backends

    return NATIVE if {v.exporter.backend for v in variants if v.exporter} <= available_backends() else FUSED


def build(entries: Sequence[ModelEntry], options: BuildOptions) -> Path:
    """Load and export everything, then write the whole repository; returns its path.

    The libraries' own messages go to ``<output>.build.log`` beside the repository (buildlog.py).
    """
    target = options.output.resolve()
    log = target.with_name(f"{target.name}.build.log")
    try:
        with libraries_to(log):
            return assemble(entries, options)
    finally:
        print(f"library messages: {log}")


def assemble(entries: Sequence[ModelEntry], options: BuildOptions) -> Path:
    from tritonhf.ensembles import export_model, parity_table, write_exports

    try:
        requested = by_names(options.variants)
    except ValueError as err:
        raise TritonHFError(str(err)) from None
    sized = None if options.instances else default_instances(options.device)  # from this host's CPUs
    if sized:
        options = dataclasses.replace(options, instances=sized)
    plans = [(entry, variants_for(entry, requested)) for entry in entries]
    tasks = load(entries, options.dtype)
    in_torch = [  # served by PyTorch in the build's precision: eager, or a reduced-precision export
        (entry.name, entry.source, task)
        for (entry, variants), task in zip(plans, tasks)
        if any((v.generic and v.generic.eager) or (v.exporter and v.exporter.reduced) for v in variants)
    ]
    verdicts = precision.verify(in_torch, options.dtype, options.device, options.gate_for)
    verified = {entry.name: [] for entry in entries}  # a model with float32 or int8 exports only: none gated
    verified.update({name: [v.dtype for v in found if v.passed] for name, found in verdicts.items()})
    exported = [
        export_model(entry.name, entry.source, task, exports, precision.export_dtype(options, verified[entry.name]))
        for (entry, variants), task in zip(plans, tasks)
        if (exports := [v for v in variants if v.exporter])
    ]
    runtime = choose_runtime(options.runtime, requested) if exported else options.runtime
    manifest: Manifest = {}
    target = options.output.resolve()
    with staged(target) as staging:
        for (entry, variants), task in zip(tqdm(plans, desc="writing models", unit="model"), tasks):
            for variant in [v for v in variants if v.generic]:
                served = dataclasses.replace(entry, variant=variant)
                config = triton_config(served, task, options, verified[entry.name])
                write_model(staging, config, entry.source if entry.local else None)
                manifest[served.name] = {
                    "source": entry.source,
                    "task": entry.task,
                    "variant": variant.name,
                    "dtype": precision.served_dtype(options.dtype, options.device, verified[entry.name])
                    if variant.generic.eager
                    else "float32",
                }
        for model in exported:
            for made, name in zip(model.exports, write_exports(staging, model, runtime, options)):
                manifest[name] = {
                    "source": model.source,
                    "task": model.task.task,
                    "variant": made.label,
                    "runtime": runtime,
                    "dtype": made.dtype,
                }
        placement.write(staging, placement.record(manifest, options.dtype, options.device, sized))
        write_manifest(staging, manifest)
        seal(staging)  # last: every file's sha256, checked wherever the build is copied and served
    if exported:
        why = (
            " (auto: this server lacks their native backends)" if options.runtime == "auto" and runtime == FUSED else ""
        )
        print(f"exported variants: runtime {runtime}{why}: {RUNTIMES[runtime]}")
        print(parity_table(exported))
    print(precision.summary(verdicts, options.dtype, options.device, options.gate_for))
    print(layout(options))
    return target


def layout(options: BuildOptions) -> str:
    """The process layout, said once at the end of a build."""
    if options.device == "gpu":
        return f"layout: {options.instances} instance(s) per model on the GPU"
    threads = cpu_threads("auto", options.instances)
    return (
        f"layout: {options.instances} instance(s) per model x {threads} compute thread(s) on this host's"
        f" {cpu_count()} CPUs (the thread count is set where the model runs: its CPUs / its instances)"
    )


def model_list(value: str) -> list[str]:
    """Comma- or space-separated; an empty value means none."""
    return [item for item in value.replace(",", " ").split() if item]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def models(flag: str, default: Sequence[str], what: str) -> None:
        shown = ", ".join(default) or "none"
        help_text = f"{what}: hub ids or local directories, comma-separated; '' for none (default: {shown})"
        parser.add_argument(flag, type=model_list, default=list(default), help=help_text)

    models("--gen-models", TUTORIAL_GEN_MODELS, "text-generation models")
    models("--class-models", TUTORIAL_CLASS_MODELS, "text-classification models")
    models("--embed-models", (), "feature-extraction models (mean-pooled, L2-normalised sentence embeddings)")
    defaults, generation, limits = BuildOptions(), GenerationParams(), Limits()
    variants = "; ".join(f"{v.name}: {v.summary}" for v in VARIANTS.values())
    add = parser.add_argument
    add(
        "--gen-max-len",
        type=int,
        default=generation.max_new_tokens,
        help="new tokens per generated answer, prompt not counted (default: %(default)s)",
    )
    add(
        "--gen-min-len",
        type=int,
        default=generation.min_new_tokens,
        help="new tokens before EOS may end an answer; = --gen-max-len for speed tests with random weights"
        " (default: %(default)s)",
    )
    add(
        "--output",
        default=str(defaults.output),
        help="repository directory, or s3://[host:port/]bucket/prefix: built in the cache, then pushed there"
        " (default: %(default)s)",
    )
    add("--max-batch-size", type=int, default=defaults.max_batch_size, help="default: %(default)s")
    add(
        "--max-queue-delay-us",
        type=int,
        default=defaults.max_queue_delay_us,
        help="how long the dynamic batcher may wait to fill a batch (default: %(default)s)",
    )
    add(
        "--max-queue-size",
        type=int,
        default=defaults.queue.max_size,
        help="batched models: requests that may wait; more are refused at once with UNAVAILABLE; 0: unbounded"
        " (default: %(default)s)",
    )
    add(
        "--queue-timeout-ms",
        type=int,
        default=defaults.queue.timeout_us // 1000,
        help="batched models: a request waiting longer is refused with UNAVAILABLE (a client may ask for its own"
        " timeout); 0: none (default: %(default)s)",
    )
    add(
        "--instances",
        type=int,
        default=defaults.instances,
        help="instances per model; 0: one single-threaded instance per CPU core of the build host (up to"
        f" {MAX_CPU_INSTANCES}), one on a GPU (default: %(default)s)",
    )
    add("--device", choices=("cpu", "gpu"), default=defaults.device, help="instance_group kind (default: %(default)s)")
    add(
        "--dtype",
        default=defaults.dtype,
        help="auto: chosen where the model runs, among the precisions that pass the build's parity gate"
        " (bfloat16 on CPUs with native bf16, float16 on GPUs, else float32); or float32, float16, bfloat16"
        " (default: %(default)s)",
    )
    gate_for = "; ".join(f"{name}: {what}" for name, what in precision.GATE_FOR.items())
    add(
        "--gate-for",
        choices=tuple(precision.GATE_FOR),
        default=defaults.gate_for,
        help=f"the precision gate, for --dtype auto: {gate_for} (default: %(default)s)",
    )
    add(
        "--variants",
        type=lambda v: tuple(model_list(v)),
        default=defaults.variants,
        help=f"{variants} (default: {','.join(DEFAULT_VARIANTS)})",
    )
    runtimes = "; ".join(f"{name}: {what}" for name, what in RUNTIMES.items())
    add(
        "--runtime",
        choices=("auto", *RUNTIMES),
        default=defaults.runtime,
        help=f"exported variants: {runtimes}; auto: native where the server has the backends, else python"
        " (default: %(default)s)",
    )
    add(
        "--gen-max-running",
        type=int,
        default=limits.max_running_sequences,
        help="streaming models: most sequences in each instance's running batch; more wait (default: %(default)s)",
    )
    add(
        "--gen-max-running-tokens",
        type=int,
        default=limits.max_running_tokens,
        help="streaming models: bound on rows x longest (prompt + max_new_tokens) in each instance's running batch,"
        " i.e. KV-cache size in tokens per instance (default: %(default)s)",
    )
    add(
        "--gen-max-prefill-tokens",
        type=int,
        default=limits.max_prefill_tokens,
        help="streaming models: prompt tokens one packed step carries at most (chunked prefill: more let newcomers"
        " in sooner, fewer keep steps short) (default: %(default)s)",
    )
    add(
        "--gen-prefill-step-slack",
        type=float,
        default=limits.prefill_step_slack,
        help="streaming models: a packed step that carries prompt tokens beside decoding rows takes at most this x"
        " the rows' own step, timed as the model starts; 0: --gen-max-prefill-tokens a step (default: %(default)s)",
    )
    add(
        "--gen-max-waiting-steps",
        type=int,
        default=limits.max_waiting_steps,
        help="streaming models: decoding steps a request may wait before it is admitted; 0 admits at every step"
        " (default: %(default)s)",
    )
    add(
        "--gen-max-waiting",
        type=int,
        default=limits.max_waiting_sequences,
        help="streaming models: requests that may wait for a slot, per instance; more are refused at once with"
        " UNAVAILABLE (default: %(default)s)",
    )
    add(
        "--gen-stream-interval",
        type=int,
        default=limits.stream_interval,
        help="streaming models: new tokens a response carries, after the first token, which goes at once; more"
        " cost the server fewer responses under load, and make the stream coarser (default: %(default)s)",
    )
    add(
        "--onnx-accelerator",
        choices=("none", "tensorrt"),
        default=defaults.onnx_accelerator,
        help="ONNX Runtime accelerator for native GPU instances (default: %(default)s)",
    )
    add(
        "--tune",
        action="store_true",
        help="then tritonhf tune the classifiers and embedders on this machine, in place (README, 'Tune')",
    )
    add_goal_arguments(add, prefix="--tune: ")


def options_from(args: argparse.Namespace) -> BuildOptions:
    if args.max_batch_size < 1 or min(args.instances, args.max_queue_delay_us, args.max_queue_size) < 0:
        raise TritonHFError("--max-batch-size must be >= 1; --instances, --max-queue-delay-us, --max-queue-size >= 0")
    if args.queue_timeout_ms < 0:
        raise TritonHFError("--queue-timeout-ms must be >= 0")
    limits = dataclasses.replace(
        Limits(),
        max_running_sequences=args.gen_max_running,
        max_running_tokens=args.gen_max_running_tokens,
        max_waiting_steps=args.gen_max_waiting_steps,
        max_waiting_sequences=args.gen_max_waiting,
        max_prefill_tokens=args.gen_max_prefill_tokens,
        prefill_step_slack=args.gen_prefill_step_slack,
        stream_interval=args.gen_stream_interval,
    )
    try:
        limits.check()
    except ValueError as err:
        raise TritonHFError(f"the --gen- streaming limits: {err}") from None
    return BuildOptions(
        output=staging_for(args.output),
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances,
        device=args.device,
        dtype=args.dtype,
        gate_for=args.gate_for,
        variants=args.variants,
        runtime=args.runtime,
        onnx_accelerator=args.onnx_accelerator,
        limits=limits,
        queue=model_config.QueuePolicy(args.max_queue_size, args.queue_timeout_ms * 1000),
    )


def staging_for(output: str) -> Path:
    """Where a build is written: ``--output`` itself, or for object storage a directory in the cache, pushed after."""
    location = storage.parse(output)
    if location.local:
        return Path(output)
    if location.scheme != "s3":  # before the build, not after it
        raise TritonHFError(f"{output}: build into a directory, then copy it there (tritonhf push: s3:// only)")
    return cache_dir() / "builds" / re.sub(r"[^A-Za-z0-9._-]+", "_", output)


def run(args: argparse.Namespace) -> Path:
    options = options_from(args)
    entries = plan(args.gen_models, args.class_models, args.embed_models, args.gen_max_len, args.gen_min_len)
    path = build(entries, options)
    manifest = read_manifest(path)
    width = max(map(len, manifest)) + 2
    for name, served in manifest.items():
        print(f"  {name:<{width}} {served['task']:<20} {served['variant']:<12} {served['dtype']:<9} {served['source']}")
    print(f"wrote {len(manifest)} served models to {path} (build {sealed_id(path)})")
    if args.tune:  # measured here, written over the build: every variant stays, the plain names serve the winners
        from tritonhf.tune import TuneOptions, tune

        tune(TuneOptions(path, path, **goal_arguments(args)))
        print(f"tuned: build {sealed_id(path)}")
    if not storage.parse(args.output).local:
        print(storage.push(path, args.output))
    return path
