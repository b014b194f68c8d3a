"""Exported variants as served models: fused, or ensembles of three steps.

Each exported variant ``<name>_<variant>`` has the Python model's external
interface (``prompt`` -> ``label`` + ``score``, or ``embedding``), laid out by
the runtime (variants.RUNTIMES):

- ``native`` (servers with Triton's onnxruntime / libtorch backends, the NGC
  containers): the ensemble ``<name>_tokenize`` -> ``<name>_<variant>_model``
  -> ``<name>_postprocess``, the network run by the native backend;
- ``python`` (the pip-installed server, which has neither): one Python model
  that tokenizes, runs the file and applies the head in one process and one
  dynamic batch (backends/python_hf/runtimes.fused_step);
- ``python-ensemble``: the ensemble with the network in the Python backend too,
  kept to measure against the fused model (the perf suite's layout table).

Every tensor name and shape below comes from the model's ExportSpec
(backends/onnx_export/spec.py) and the task's outputs; nothing is typed twice.

Batching: the tokenize step holds requests up to ``--max-queue-delay-us`` to
form a batch and pads it to one shape (see backends/python_hf/text.py), so
the requests of that batch reach the network step together with equal shapes
and are batched again there at once; the network and postprocess steps
therefore batch without a queue delay, which would only add latency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tritonhf import TritonHFError, cache_dir, model_config
from tritonhf.backends.onnx_export.exporters import Export, export
from tritonhf.backends.onnx_export.parity import Agreement
from tritonhf.backends.onnx_export.spec import ExportError, ExportSpec, spec_for
from tritonhf.backends.python_hf.hardware import cpu_threads
from tritonhf.backends.python_hf.steps import StepContext
from tritonhf.backends.python_hf.tensors import PROMPT, TensorSpec
from tritonhf.backends.python_hf.text import tokenize
from tritonhf.repository import LOCAL_WEIGHTS, link_or_copy, write_model
from tritonhf.variants import FUSED, VARIANTS, Variant


@dataclass(frozen=True)
class Exported:
    """A model's exports, ready to be written as ensembles."""

    name: str
    source: str
    task: Any  # the loaded HFTask: reference model, tokenizer, heads, outputs
    spec: ExportSpec
    exports: list[Export]


def export_model(name: str, source: str, task: Any, variants: Sequence[Variant], dtype: str = "float32") -> Exported:
    """Export (or reuse from the cache) each variant of one model; any failure names the variant.

    ``dtype``: the build's precision for this model, taken by exporters that make reduced-precision files;
    such a file passes the Agreement gate against the float32 model, not the Exact one.
    """
    try:
        spec = spec_for(task.model.config, task.task)
    except ExportError as err:
        raise TritonHFError(f"{name}: {err}") from None
    inputs = tuple(t.name for t in spec.inputs)
    context = StepContext(
        {"huggingface_model": source, "max_tokens": str(task.max_tokens)}, Path(), output_names=inputs
    )
    tokens = tokenize(context)
    exports = []
    for variant in tqdm(variants, desc=f"exporting {name}", unit="variant"):
        exporter = variant.exporter

        gate = exporter.gate if dtype == "float32" or not exporter.reduced else Agreement()

        def check(path: Path, label: str = variant.name, exporter: Any = exporter, gate: Any = gate) -> list[dict]:
            return gate(label, exporter.runner(path, spec), spec, task.model, task.max_tokens, tokens)

        try:
            exports.append(export(source, spec, variant.name, exporter, check, cache_dir() / "exports", dtype))
        except ExportError as err:
            raise TritonHFError(f"{name}: {err}") from None
    return Exported(name, source, task, spec, exports)


def native_threads(exporter: Any, options: Any) -> dict[str, str]:
    """A native CPU network's compute threads per instance, as the Python models set theirs where they run
    (hardware.cpu_threads); native backends read a fixed number, so the build host's CPUs decide it."""
    if options.device == "gpu" or not exporter.native_threads:
        return {}
    return {exporter.native_threads: str(cpu_threads("auto", options.instances))}


def network_config(model: Exported, made: Export, runtime: str, options: Any) -> model_config.Config:
    """The network step: natively (NGC containers) or inside the Python backend (the pip-installed server)."""
    spec, exporter = model.spec, made.exporter
    sizes = spec.sizes(model.task.model.config)
    name = VARIANTS[made.label].network(model.name, runtime)
    inputs = model_config.tensors(spec.inputs, sizes)
    outputs = model_config.tensors(
        [TensorSpec(renamed, t.dtype, t.dims) for t, renamed in zip(spec.outputs, exporter.output_names(spec))], sizes
    )
    placement = {"instances": options.instances, "device": options.device, "queue": options.queue}
    if runtime == "native":
        accelerator = (
            options.onnx_accelerator if options.device == "gpu" and exporter.backend == "onnxruntime" else "none"
        )
        return model_config.native_model(
            name,
            exporter.platform,
            inputs,
            outputs,
            max_batch_size=options.max_batch_size,
            accelerator=accelerator,
            parameters={**exporter.native_parameters, **native_threads(exporter, options)},
            **placement,
        )
    parameters = {"step": exporter.step, "model_file": exporter.file}
    return model_config.python_model(
        name, inputs, outputs, parameters, max_batch_size=options.max_batch_size, queue_delay_us=0, **placement
    )


def write_exports(root: Path, model: Exported, runtime: str, options: Any) -> list[str]:
    """Write one served model per export, laid out as ``runtime`` says; returns their names."""
    return (write_fused if runtime == FUSED else write_ensembles)(root, model, runtime, options)


def head_parameters(model: Exported) -> dict[str, str]:
    """The postprocess head's config parameters (a classifier's labels; pooling takes none)."""
    return model.task.head.parameters() if model.spec.postprocess == "classify" else {}


def save_tokenizer(source: str, version: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(version / LOCAL_WEIGHTS)


def write_fused(root: Path, model: Exported, runtime: str, options: Any) -> list[str]:
    """One Python model per export: tokenize -> network -> head in one process (runtimes.fused_step)."""
    spec, task = model.spec, model.task
    head = head_parameters(model)
    names = []
    for made in model.exports:
        name = VARIANTS[made.label].served_name(model.name)
        parameters = {
            "step": "fused",
            "huggingface_model": LOCAL_WEIGHTS,
            "max_tokens": str(task.max_tokens),
            "network": made.exporter.step,
            "model_file": made.exporter.file,
            "network_inputs": ",".join(t.name for t in spec.inputs),
            "network_outputs": ",".join(made.exporter.output_names(spec)),
            "outputs_as": ",".join(t.name for t in spec.outputs),
            "postprocess": spec.postprocess,
            **head,
        }
        config = model_config.python_model(
            name,
            model_config.tensors([PROMPT]),
            model_config.tensors(task.outputs()),
            parameters,
            max_batch_size=options.max_batch_size,
            queue_delay_us=options.max_queue_delay_us,
            queue=options.queue,
            instances=options.instances,
            device=options.device,
        )
        version = write_model(root, config)
        save_tokenizer(model.source, version)
        link_or_copy(str(made.path), str(version / made.exporter.file))
        names.append(name)
    return names


def write_ensembles(root: Path, model: Exported, runtime: str, options: Any) -> list[str]:
    """Write the shared steps and one network + ensemble per export; returns the ensembles' names."""

    spec, task = model.spec, model.task
    sizes = spec.sizes(task.model.config)
    answers = model_config.tensors(task.outputs())
    tokenize_step, _, postprocess_step = VARIANTS[model.exports[0].label].pipeline(model.name, runtime)  # shared
    batching = {"max_batch_size": options.max_batch_size}
    queue = {"queue": options.queue}
    tokenizer_parameters = {"step": "tokenize", "huggingface_model": LOCAL_WEIGHTS, "max_tokens": str(task.max_tokens)}
    head = head_parameters(model)
    tokenize_config = model_config.python_model(
        tokenize_step,
        model_config.tensors([PROMPT]),
        model_config.tensors(spec.inputs, sizes),
        tokenizer_parameters,
        queue_delay_us=options.max_queue_delay_us,
        **batching,
        **queue,
    )
    save_tokenizer(model.source, write_model(root, tokenize_config))
    postprocess_inputs = model_config.tensors([spec.tensor(n) for n in spec.postprocess_inputs], sizes)
    write_model(
        root,
        model_config.python_model(
            postprocess_step,
            postprocess_inputs,
            answers,
            {"step": spec.postprocess, **head},
            queue_delay_us=0,
            **batching,
            **queue,
        ),
    )
    for made in model.exports:
        variant = VARIANTS[made.label]
        network = network_config(model, made, runtime, options)
        link_or_copy(str(made.path), str(write_model(root, network) / made.exporter.file))
        identity = {t.name: t.name for t in spec.inputs}
        steps = [
            (tokenize_step, {"prompt": "prompt"}, identity),
            (network["name"], identity, dict(zip(made.exporter.output_names(spec), (t.name for t in spec.outputs)))),
            (postprocess_step, {n: n for n in spec.postprocess_inputs}, {o["name"]: o["name"] for o in answers}),
        ]
        name = variant.served_name(model.name)
        write_model(root, model_config.ensemble(name, model_config.tensors([PROMPT]), answers, steps, **batching))
    return [VARIANTS[made.label].served_name(model.name) for made in model.exports]


def parity_table(models: Sequence[Exported]) -> str:
    """Markdown: model x variant x check -> max abs error (and agreement for int8)."""
    lines = [
        "| model | variant | dtype | check | max abs error | argmax / cosine | cached |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for made in model.exports:
            for row in made.parity:
                extra = row.get("argmax_agreement", row.get("same_argmax", ""))
                if "cosine_mean" in row:
                    extra = f"cosine mean {row['cosine_mean']:.4f}, min {row['cosine_min']:.4f}"
                elif isinstance(extra, float):
                    extra = f"argmax agreement {extra:.1%}"
                elif extra != "":
                    extra = f"same argmax: {extra}"
                cells = [model.name, made.label, made.dtype, row["check"], f"{row['max_abs_error']:.2e}", extra]
                lines.append(f"| {' | '.join(map(str, cells))} | {made.cached} |")
    return "\n".join(lines)
