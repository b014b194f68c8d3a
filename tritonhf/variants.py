"""The served variants, each declared once: every other module reads this registry.

A variant is one way of serving a model's task. Either the generic Python
model serves it itself (:class:`Generic`: batched, streaming, or the tutorial's
one-request-at-a-time pipeline), or an exported network does
(:class:`~tritonhf.backends.onnx_export.exporters.Exporter`: the export
function, the file, how Triton runs it natively and inside the Python backend,
and the parity gate it must pass), served as the ensemble
``<name>_<variant>`` = ``<name>_tokenize`` -> ``<name>_<variant>_model`` ->
``<name>_postprocess``. Each declaration also says which tasks it applies to,
whether ``tritonhf build`` makes it by default, and what the perf suite
measures on it. Adding a variant = one declaration here plus, for an export,
its ``make`` function in backends/onnx_export/exporters.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tritonhf.backends.onnx_export.exporters import Exporter, Gate, export_onnx, export_onnx_int8, export_torchscript
from tritonhf.backends.onnx_export.parity import Agreement, Exact

GENERATION, CLASSIFICATION, EMBEDDING = "text-generation", "text-classification", "feature-extraction"
ENCODERS = (CLASSIFICATION, EMBEDDING)

# How exported variants are served (tritonhf/ensembles.py); ``auto`` picks native where the server has the
# native backends, else the fused model (measured faster than the Python-backend ensemble: perf report).
NATIVE, FUSED, PYTHON_ENSEMBLE = "native", "python", "python-ensemble"
RUNTIMES = {
    NATIVE: "ensemble tokenize -> network -> postprocess, the network on Triton's onnxruntime/libtorch backend",
    FUSED: "one Python-backend model: tokenize, network and head in one process and one batch",
    PYTHON_ENSEMBLE: "the ensemble with every step in the Python backend (for comparison)",
}


@dataclass(frozen=True)
class Generic:
    """Served by the generic Python model itself (backends/python_hf/model.py) as ``<name><suffix>``."""

    suffix: str
    batched: bool  # Triton's dynamic batcher hands it lists of requests; else max_batch_size 0
    decoupled: bool = False  # a stream: many responses to a request, batched by the model's own scheduler
    step: str = "hf"  # backends/python_hf/steps.py
    tutorial_io: bool = False  # the tutorial's interface only: no generation parameters in, no new_tokens out

    @property
    def eager(self) -> bool:
        """Runs the whole Hugging Face model in PyTorch (not the tutorial's pipeline): takes the build's precision."""
        return self.step == "hf"


@dataclass(frozen=True)
class Perf:
    """What the perf suite measures on a variant (perf/suite.py)."""

    sweep: bool = True  # perf_analyzer at the fixed concurrencies
    reference: bool = False  # the base of every ratio: the tutorial's own model
    mixed: bool = False  # the mixed generation workload (perf/generation.py), static against stream


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str  # for --help and the README
    tasks: tuple[str, ...]
    generic: Generic | None = None
    exporter: Exporter | None = None
    default: bool = True  # built unless --variants says otherwise
    perf: Perf = Perf()

    def __post_init__(self) -> None:
        if (self.generic is None) == (self.exporter is None):
            raise ValueError(f"variant {self.name}: served either by the generic model or by an export")

    @property
    def streams(self) -> bool:
        return bool(self.generic and self.generic.decoupled)

    def served_name(self, base: str) -> str:
        return base + self.generic.suffix if self.generic else f"{base}_{self.name}"

    def ensemble(self, runtime: str) -> bool:
        """Served as tokenize -> network -> postprocess (else one model)."""
        return self.exporter is not None and runtime != FUSED

    def network(self, base: str, runtime: str = FUSED) -> str:
        """The Triton model that runs the network: its executed batch size is the one that matters."""
        return f"{base}_{self.name}_model" if self.ensemble(runtime) else self.served_name(base)

    def pipeline(self, base: str, runtime: str = FUSED) -> list[str]:
        """The Triton models a request passes through, in order."""
        network = self.network(base, runtime)
        return [f"{base}_tokenize", network, f"{base}_postprocess"] if self.ensemble(runtime) else [network]


def onnx_file(make: Callable[..., Path], gate: Gate, precision: str = "float32") -> Exporter:
    """An ONNX file: Triton's onnxruntime backend runs it natively, ONNX Runtime inside the Python backend otherwise."""
    return Exporter(
        make=make,
        file="model.onnx",
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        step="onnxruntime",
        gate=gate,
        precision=precision,
        native_threads="intra_op_thread_count",
    )


PYTHON = Variant(
    "python",
    "the model itself (<name>): eager PyTorch in the generic Python model, dynamically batched",
    (GENERATION, *ENCODERS),
    generic=Generic("", batched=True),
    perf=Perf(mixed=True),
)
STREAM = Variant(
    "stream",
    "<name>_stream: token streaming with continuous batching (decoupled)",
    (GENERATION,),
    generic=Generic("_stream", batched=False, decoupled=True),
    perf=Perf(sweep=False, mixed=True),
)
ONNX = Variant(
    "onnx",
    "optimum's ONNX export, graph-optimised by ONNX Runtime (O2)",
    ENCODERS,
    exporter=onnx_file(export_onnx, Exact()),
)
ONNX_INT8 = Variant(
    "onnx-int8",
    "the same export, dynamically quantised to int8 by ONNX Runtime (CPU)",
    ENCODERS,
    exporter=onnx_file(export_onnx_int8, Agreement(), "int8"),
)
TORCHSCRIPT = Variant(
    "torchscript",
    "torch.jit.trace of the model in the build's precision, frozen and optimised for inference",
    ENCODERS,
    exporter=Exporter(
        make=export_torchscript,
        file="model.pt",
        platform="pytorch_libtorch",
        backend="pytorch",
        step="torch_jit",
        gate=Exact(),
        reduced=True,
        native_parameters={"DISABLE_OPTIMIZED_EXECUTION": "true"},
        native_threads="INTRA_OP_THREAD_COUNT",
    ),
    default=False,  # slower than the python model at concurrency 1 and 4 (perf report 2026-11-30): README, "Exported"
)

BASELINE = Variant(
    "baseline",
    "the tutorial's model: transformers.pipeline once per request, unbatched (<name>_baseline), for the perf suite",
    (GENERATION, CLASSIFICATION),
    generic=Generic("_baseline", batched=False, step="pipeline", tutorial_io=True),
    default=False,
    perf=Perf(reference=True),
)
VARIANTS = {variant.name: variant for variant in (PYTHON, STREAM, ONNX, ONNX_INT8, TORCHSCRIPT, BASELINE)}
DEFAULT_VARIANTS = tuple(name for name, variant in VARIANTS.items() if variant.default)


def by_names(names: tuple[str, ...] | list[str]) -> list[Variant]:
    """Variants by name, in the registry's order; ValueError naming any unknown one."""
    if unknown := sorted(set(names) - set(VARIANTS)):
        raise ValueError(f"unknown variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return [variant for name, variant in VARIANTS.items() if name in names]
