"""What a generated model does, by name: the step registry, and the context a step is built from.

Every model of a repository runs the same ``model.py``; its config.pbtxt
parameter ``step`` picks the factory here (default ``hf``: a whole Hugging Face
model for its ``task``). The factory gets a :class:`StepContext` and returns
the step's forward: texts -> arrays for a step whose input is ``prompt``,
arrays -> arrays for the ensembles' inner steps. Modules are imported by step,
so a tokenize step never imports torch. The builder runs the same factories
in-process for its parity checks (backends/onnx_export/exporters.Exporter.runner).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .batching import BatchFn, TensorFn
from .hardware import cpu_threads, instance_count, on_a_thread_that_ends


@dataclass(frozen=True)
class StepContext:
    """What a step is built from: its config's parameters and tensor names, where it lives, its device."""

    parameters: dict[str, str]
    model_dir: Path  # the version directory
    device: str = "cpu"
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()

    def source(self, key: str = "huggingface_model") -> str:
        """A hub id, or a directory relative to the version directory (the builder copies local models there)."""
        value = self.parameters[key]
        return str(self.model_dir / value) if (self.model_dir / value).is_dir() else value


STEPS = {  # config parameter ``step`` -> (module of this directory, factory taking a StepContext)
    "hf": ("tasks", "from_context"),
    "pipeline": ("tutorial", "pipeline_step"),
    "tokenize": ("text", "tokenize"),
    "onnxruntime": ("runtimes", "onnxruntime_step"),
    "torch_jit": ("runtimes", "torch_jit_step"),
    "fused": ("runtimes", "fused_step"),
    "classify": ("heads", "classify"),
    "pool": ("heads", "pool"),
}


def step_factory(step: str) -> Callable[[StepContext], BatchFn | TensorFn]:
    """The factory a step name stands for, its module imported only now."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; known: {', '.join(STEPS)}")
    module, factory = STEPS[step]
    return getattr(importlib.import_module(f".{module}", __package__), factory)


def load_step(model_config: Mapping, model_dir: Path, device: str = "cpu") -> tuple[BatchFn | TensorFn, StepContext]:
    """Build what a model's config says it does: the glue's ``initialize``, without Triton.

    Parameters in upper case are Triton's own (EXECUTION_ENV_PATH) and are left out; an empty string
    value is absent from a parsed config (proto3). On a CPU, the instance's compute threads are set
    first (hardware.cpu_threads), and the step is built on a thread that ends with the load, so that the
    thread which computes afterwards (the caller's, or a stream's scheduler) has the cores to itself.
    """
    parameters = {
        key: value.get("string_value", "")
        for key, value in model_config.get("parameters", {}).items()
        if not key.isupper()
    }
    if device == "cpu":  # before torch or ONNX Runtime start their thread pools
        instances = instance_count(model_config)
        parameters["cpu_threads"] = str(cpu_threads(parameters.get("cpu_threads", "auto"), instances))
        os.environ["OMP_NUM_THREADS"] = parameters["cpu_threads"]
    context = StepContext(
        parameters=parameters,
        model_dir=model_dir,
        device=device,
        input_names=tuple(tensor["name"] for tensor in model_config["input"]),
        output_names=tuple(tensor["name"] for tensor in model_config["output"]),
    )
    return on_a_thread_that_ends(lambda: step_factory(parameters.get("step", "hf"))(context)), context
