"""Exported variants as ensembles: ``<name>_tokenize`` -> ``<name>_<variant>_model`` -> ``<name>_postprocess``.

Each ensemble ``<name>_<variant>`` has the Python model's external interface
(``prompt`` -> ``label`` + ``score``, or ``embedding``). Every tensor name and
shape below comes from the model's :class:`ExportSpec`; nothing is typed twice.

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

from tritonhf import TritonHFError, model_config
from tritonhf.backends.onnx_export.exporters import VARIANTS, Export, Variant, export
from tritonhf.backends.onnx_export.parity import checker
from tritonhf.backends.onnx_export.spec import ExportError, ExportSpec, TensorDecl, spec_for
from tritonhf.backends.python_hf.batching import StepContext
from tritonhf.backends.python_hf.text import tokenize

PROMPT = {"name": "prompt", "data_type": "TYPE_STRING", "dims": [1]}


@dataclass(frozen=True)
class Exported:
    """A model's exports, ready to be written as ensembles."""

    name: str
    source: str
    task: Any  # the loaded HFTask: reference model, tokenizer, heads, outputs
    spec: ExportSpec
    exports: list[Export]


def export_model(name: str, source: str, task: Any, variants: Sequence[str]) -> Exported:
    """Export (or reuse from the cache) each variant of one model; any failure names the variant."""
    try:
        spec = spec_for(task.model.config, task.task)
    except ExportError as err:
        raise TritonHFError(f"{name}: {err}") from None
    context = StepContext({"huggingface_model": source, "max_tokens": str(task.max_tokens)}, Path("."), output_names=tuple(t.name for t in spec.inputs))
    tokens = tokenize(context)
    exports = []
    for variant in tqdm([VARIANTS[v] for v in variants], desc=f"exporting {name}", unit="variant"):
        try:
            exports.append(export(source, spec, variant, checker(variant, spec, task.model, task.max_tokens, tokens)))
        except ExportError as err:
            raise TritonHFError(f"{name}: {err}") from None
    return Exported(name, source, task, spec, exports)


def io(tensors: Sequence[TensorDecl], sizes: dict[str, int], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return [{"name": n, "data_type": t.triton_type, "dims": t.dims(sizes)} for t, n in zip(tensors, names or [t.name for t in tensors])]


def cpu_step(name: str, max_batch_size: int, inputs: list, outputs: list, parameters: dict[str, str], delay_us: int = 0) -> dict[str, Any]:
    """A light Python-backend step (tokenize, postprocess): one CPU instance."""
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "dynamic_batching": {"max_queue_delay_microseconds": delay_us},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }


def network_config(model: Exported, variant: Variant, runtime: str, options: Any) -> dict[str, Any]:
    sizes = model.spec.sizes(model.task.model.config)
    config: dict[str, Any] = {
        "name": f"{model.name}_{variant.name}_model",
        "max_batch_size": options.max_batch_size,
        "input": io(model.spec.inputs, sizes),
        "output": io(model.spec.outputs, sizes, [variant.output_name(t, i) for i, t in enumerate(model.spec.outputs)]),
        "dynamic_batching": {},
        "instance_group": [{"count": options.instances, "kind": "KIND_GPU" if options.device == "gpu" else "KIND_CPU"}],
    }
    if runtime == "native":
        config["platform"] = variant.platform
        if options.device == "gpu" and options.onnx_accelerator != "none" and variant.platform == "onnxruntime_onnx":
            config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [{"name": options.onnx_accelerator}]}}
    else:
        config["backend"] = "python"
        config["parameters"] = {"step": {"string_value": variant.step}, "model_file": {"string_value": variant.file}}
    return config


def ensemble_config(model: Exported, variant: Variant, options: Any) -> dict[str, Any]:
    spec, outputs = model.spec, [o.name for o in model.task.outputs()]
    return {
        "name": f"{model.name}_{variant.name}",
        "platform": "ensemble",
        "max_batch_size": options.max_batch_size,
        "input": [PROMPT],
        "output": [{"name": o.name, "data_type": o.data_type, "dims": list(o.dims)} for o in model.task.outputs()],
        "ensemble_scheduling": {
            "step": [
                {"model_name": f"{model.name}_tokenize", "model_version": -1, "input_map": {"prompt": "prompt"}, "output_map": {t.name: t.name for t in spec.inputs}},
                {
                    "model_name": f"{model.name}_{variant.name}_model",
                    "model_version": -1,
                    "input_map": {t.name: t.name for t in spec.inputs},
                    "output_map": {variant.output_name(t, i): t.name for i, t in enumerate(spec.outputs)},
                },
                {"model_name": f"{model.name}_postprocess", "model_version": -1, "input_map": {n: n for n in spec.postprocess_inputs}, "output_map": {o: o for o in outputs}},
            ]
        },
    }


def write_ensembles(root: Path, model: Exported, runtime: str, options: Any) -> list[str]:
    """Write the shared steps and one network + ensemble per export; returns the ensembles' names."""
    from transformers import AutoTokenizer

    from tritonhf.repo_builder import copy_backend, link_or_copy

    spec, task = model.spec, model.task
    sizes = spec.sizes(task.model.config)
    tokenizer_dir = root / f"{model.name}_tokenize" / "1" / "hf_model"
    AutoTokenizer.from_pretrained(model.source).save_pretrained(tokenizer_dir)
    steps = [
        cpu_step(f"{model.name}_tokenize", options.max_batch_size, [PROMPT], io(spec.inputs, sizes), {"step": "tokenize", "huggingface_model": "hf_model", "max_tokens": str(task.max_tokens)}, options.max_queue_delay_us),
        cpu_step(
            f"{model.name}_postprocess",
            options.max_batch_size,
            io([spec.tensor(n) for n in spec.postprocess_inputs], sizes),
            [{"name": o.name, "data_type": o.data_type, "dims": list(o.dims)} for o in task.outputs()],
            {"step": spec.postprocess, **(task.head.parameters() if spec.postprocess == "classify" else {})},
        ),
    ]
    for made in model.exports:
        network = network_config(model, made.variant, runtime, options)
        (root / network["name"] / "1").mkdir(parents=True)
        link_or_copy(str(made.path), str(root / network["name"] / "1" / made.variant.file))
        steps += [network, ensemble_config(model, made.variant, options)]
    for config in steps:
        version = root / config["name"] / "1"
        version.mkdir(parents=True, exist_ok=True)  # ensembles need an (empty) version directory too
        if config.get("backend") == "python":
            copy_backend(version)
        model_config.write(config, root / config["name"])
    return [f"{model.name}_{made.variant.name}" for made in model.exports]


def parity_table(models: Sequence[Exported]) -> str:
    """Markdown: model x variant x check -> max abs error (and agreement for int8)."""
    lines = ["| model | variant | check | max abs error | argmax / cosine | cached |", "|---|---|---|---|---|---|"]
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
                lines.append(f"| {model.name} | {made.variant.name} | {row['check']} | {row['max_abs_error']:.2e} | {extra} | {made.cached} |")
    return "\n".join(lines)
