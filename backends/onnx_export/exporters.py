"""How exports are made (fp32 ONNX, graph-optimised; int8 ONNX; TorchScript), cached and gated.

- :func:`export_onnx`: optimum's exporter (torch's legacy ONNX exporter
  underneath), opset 18 (optimum's recommended minimum for BERT-family models;
  ONNX Runtime >= 1.14 runs it), dynamic batch and sequence axes, then ONNX
  Runtime's graph optimiser at optimum's O2 level (fused attention, GELU and
  layer norm; exact fp32).
- :func:`export_onnx_int8`: the un-optimised export, dynamically quantised by
  ONNX Runtime's quantizer (int8 weights, activations quantised at run time; CPU),
  with the preset for the build host's CPU (hardware.int8_target: VNNI or not).
- :func:`export_torchscript`: ``torch.jit.trace`` of the model loaded with
  ``torchscript=True`` in the build's precision (bfloat16 where ``auto`` picks it
  on the build host), on dummy inputs from the same declaration, then frozen and
  optimised for inference. It runs with TorchScript's profiling executor off
  (runtimes.torch_jit_step; ``DISABLE_OPTIMIZED_EXECUTION`` natively): the
  profiling executor re-specialises the graph for every new input shape, which
  made served throughput swing from window to window.

Which exports exist is declared once, in the variant registry
(tritonhf/variants.py): each names its ``make`` function here, the file, how
Triton runs it and its parity gate (parity.py). An export is cached (the
builder passes ``~/.cache/tritonhf/exports``) by a key over the model's files,
the variant, the declaration and the library versions: a second build with the
same model and options reuses the file and its parity report.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..python_hf.hardware import int8_target
from ..python_hf.steps import StepContext, step_factory
from .parity import Runner
from .spec import ExportError, ExportSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel


OPSET = 18
AUTO_MODELS = {"text-classification": "AutoModelForSequenceClassification", "feature-extraction": "AutoModel"}


def load_reference(source: str, task: str, torchscript: bool = False, dtype: str = "float32") -> PreTrainedModel:
    import torch
    import transformers

    auto = getattr(transformers, AUTO_MODELS[task])
    return auto.from_pretrained(source, torchscript=torchscript, dtype=getattr(torch, dtype)).eval()


def onnx_plain(source: str, spec: ExportSpec, workdir: Path) -> Path:
    from optimum.exporters.onnx import main_export

    main_export(
        source, workdir, task=spec.task, opset=OPSET, library_name="transformers", do_validation=False, device="cpu"
    )
    exported = workdir / "model.onnx"
    names = [t.name for t in spec.inputs]
    import onnx

    graph = onnx.load(str(exported), load_external_data=False).graph
    if [i.name for i in graph.input] != names:
        raise ExportError(f"optimum exported inputs {[i.name for i in graph.input]}, declared {names}")
    return exported


def export_onnx(source: str, spec: ExportSpec, workdir: Path) -> Path:
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    plain = onnx_plain(source, spec, workdir / "plain")
    optimizer = ORTOptimizer.from_pretrained(plain.parent, file_names=[plain.name])
    optimizer.optimize(AutoOptimizationConfig.O2(), save_dir=workdir / "optimized")
    return workdir / "optimized" / "model_optimized.onnx"


def export_onnx_int8(source: str, spec: ExportSpec, workdir: Path) -> Path:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    plain = onnx_plain(source, spec, workdir / "plain")
    quantizer = ORTQuantizer.from_pretrained(plain.parent, file_name=plain.name)
    preset = getattr(AutoQuantizationConfig, int8_target())  # for the CPU it is built on (and cached by)
    quantizer.quantize(preset(is_static=False, per_channel=True), save_dir=workdir / "int8")
    return workdir / "int8" / "model_quantized.onnx"


TRACEABLE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # optimum's order for the encoders


def export_torchscript(source: str, spec: ExportSpec, workdir: Path, dtype: str = "float32") -> Path:
    """Trace a wrapper that takes the declared inputs by name and returns only the declared outputs; freeze it."""
    import torch

    names = [t.name for t in spec.inputs]
    if names != list(TRACEABLE_INPUTS[: len(names)]):
        raise ExportError(f"torchscript: can't trace inputs {names}; traceable: a prefix of {TRACEABLE_INPUTS}")

    class Declared(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
        ) -> tuple:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)[: len(spec.outputs)]
            return tuple(output.float() for output in outputs)  # the declared TYPE_FP32, whatever the precision

    model = load_reference(source, spec.task, torchscript=True, dtype=dtype)
    dummy = spec.dummy_inputs(2, 16, model.config.vocab_size)
    with torch.no_grad():
        traced = torch.jit.trace(Declared(model).eval(), tuple(torch.from_numpy(dummy[name]) for name in names))
    path = workdir / "model.pt"
    torch.jit.optimize_for_inference(torch.jit.freeze(traced)).save(str(path))
    return path


class Gate(Protocol):
    """A parity check (parity.py): raises ExportError unless the export computes what PyTorch computes."""

    def __call__(
        self, label: str, run: Runner, spec: ExportSpec, model: Any, max_tokens: int, tokenize: Any
    ) -> list[dict]: ...


@dataclass(frozen=True)
class Exporter:
    """How one export is made, how Triton runs the file natively and inside the Python backend, and its gate."""

    make: Callable[[str, ExportSpec, Path], Path]
    file: str  # the file name in the model's version directory (the native backends' default)
    platform: str  # native Triton platform
    backend: str  # the native backend's directory name under /opt/tritonserver/backends
    step: str  # the generic Python model's step (backends/python_hf/steps.py) that runs the same file
    gate: Gate
    precision: str = "float32"  # of the network's weights and compute, for the build's summary and the perf report
    reduced: bool = False  # made in the build's precision (make takes ``dtype``); gated by Agreement when reduced
    native_parameters: dict[str, str] = field(default_factory=dict)  # the native backend's config parameters
    native_threads: str = ""  # the native backend's parameter for an instance's compute threads

    def output_names(self, spec: ExportSpec) -> list[str]:
        """libtorch names outputs by position (``logits__0``); ONNX by graph name."""
        libtorch = self.platform == "pytorch_libtorch"
        return [f"{t.name}__{index}" if libtorch else t.name for index, t in enumerate(spec.outputs)]

    def runner(self, path: Path, spec: ExportSpec) -> Runner:
        """The file run in-process exactly as the Python-runtime step runs it."""
        context = StepContext(
            parameters={"model_file": path.name},
            model_dir=path.parent,
            input_names=tuple(t.name for t in spec.inputs),
            output_names=tuple(self.output_names(spec)),
        )
        run = step_factory(self.step)(context)
        return lambda batch: {t.name: out for t, out in zip(spec.outputs, run(batch).values())}


def files_digest(source: str) -> str:
    """The model's identity: its files (name, size, mtime) for a directory, else the hub id."""
    root = Path(source)
    if not root.is_dir():
        return source
    entries = sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    )
    return json.dumps(entries)


def cache_key(source: str, label: str, exporter: Exporter, spec: ExportSpec, dtype: str) -> str:
    """Over the model's files, the variant's declaration, this module's code and the library versions."""
    libraries = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")
    versions = {name: metadata.version(name) for name in libraries}
    declared = [
        label,
        exporter.make.__qualname__,
        exporter.file,
        exporter.step,
        repr(exporter.gate),
        int8_target(),
        dtype,
    ]
    material = json.dumps([files_digest(source), declared, OPSET, asdict(spec), versions, Path(__file__).read_text()])
    return hashlib.sha256(material.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Export:
    label: str  # the variant's name
    exporter: Exporter
    path: Path  # the exported file, named exporter.file
    parity: list[dict]  # one row per checked shape or probe set
    cached: bool
    dtype: str = "float32"  # the file's precision


def export(
    source: str,
    spec: ExportSpec,
    label: str,
    exporter: Exporter,
    check: Callable[[Path], list[dict]],
    cache: Path,
    dtype: str = "float32",
) -> Export:
    """Export (or reuse from ``cache``) one variant, named ``label``; ``check`` gates it before it enters the cache.

    ``dtype``: the build's precision, for exporters that make reduced-precision files (``reduced``).
    """
    dtype = dtype if exporter.reduced else exporter.precision
    entry = cache / f"{Path(source.rstrip('/')).name}-{label}-{cache_key(source, label, exporter, spec, dtype)}"
    if (entry / "parity.json").exists():
        parity = json.loads((entry / "parity.json").read_text())
        return Export(label, exporter, entry / exporter.file, parity, cached=True, dtype=dtype)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        (Path(work) / "export").mkdir()
        try:
            produced = exporter.make(
                source, spec, Path(work) / "export", **({"dtype": dtype} if exporter.reduced else {})
            )
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(f"{label} export of {source} failed: {type(err).__name__}: {err}") from err
        staged = Path(work) / "entry"
        staged.mkdir()
        shutil.move(str(produced), staged / exporter.file)
        parity = check(staged / exporter.file)
        (staged / "parity.json").write_text(json.dumps(parity, indent=1))
        shutil.rmtree(entry, ignore_errors=True)
        staged.rename(entry)
    return Export(label, exporter, entry / exporter.file, parity, cached=False, dtype=dtype)
