"""How big a pod a repository needs: its models' processes, weights and instances, read from the repository.

``tritonhf deploy`` (kubernetes.py) sizes memory, /dev/shm, CPUs and the startup
probe's budget from these ``Facts``; the repository is read where it is (a local
directory or S3, storage.Files), from its config.pbtxt files and its files' sizes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import PurePosixPath

from tritonhf import TritonHFError, model_config, placement, storage
from tritonhf.backends.python_hf.hardware import instance_count
from tritonhf.repository import LOCAL_WEIGHTS, MARKER

MiB = 2**20

# Sizing (measured on the pip server, 2026-11-30): a Python-backend model process is about 400 MiB before its
# weights (Python, torch, transformers); tritonserver itself about 40 MiB, tritonhf serve about 60 MiB.
STUB_BASE = 512 * MiB
SERVER_BASE = 256 * MiB
FRONTEND_BASE = 160 * MiB  # the OpenAI API's process (serve --openai-port): 83 MiB idle, measured 2026-12-02
WEIGHT_FACTOR = 1.5  # weights in memory, plus activations and allocator slack at the largest batch
SHM_PER_STUB = 64 * MiB  # each stub's shared-memory region (1 MiB, growing with the largest batch's tensors)
SHM_MIN = 256 * MiB
UNKNOWN_WEIGHTS = 1024 * MiB  # a hub model whose weights live in the image's HF cache, not in the repository
LOAD_BYTES_PER_S = 50 * MiB  # object storage -> local disk -> memory, conservatively
LOAD_PER_STUB_S = 15  # a model process: interpreter, imports, model construction


@dataclass(frozen=True)
class Model:
    """One model of the repository, as its config.pbtxt says."""

    name: str
    backend: str  # python, onnxruntime, pytorch, ensemble
    kind: str  # KIND_CPU, KIND_GPU
    instances: int
    weight_bytes: int | None  # None: not in the repository (a hub model in the image's cache)

    @property
    def processes(self) -> int:
        """Python-backend model processes (stubs): one per instance."""
        return self.instances if self.backend == "python" else 0


@dataclass(frozen=True)
class Facts:
    """What sizing needs to know of a repository."""

    models: tuple[Model, ...]
    total_bytes: int
    served: tuple[str, ...]  # what clients call (the manifest's names): not an ensemble's steps
    host: placement.HostRecord | None = None  # the build's CPU choices and what they need (placement.py)

    @property
    def device(self) -> str:
        return "gpu" if any(m.kind == "KIND_GPU" for m in self.models) else "cpu"

    @property
    def processes(self) -> int:
        return sum(m.processes for m in self.models)

    @property
    def unknown(self) -> list[str]:
        return [m.name for m in self.models if m.weight_bytes is None]

    def memory(self) -> int:
        """Every model process with its weights, the native backends' weights, the server."""
        weights = sum(
            m.instances * (UNKNOWN_WEIGHTS if m.weight_bytes is None else m.weight_bytes)
            for m in self.models
            if m.backend != "ensemble"
        )
        return SERVER_BASE + self.processes * STUB_BASE + int(weights * WEIGHT_FACTOR)

    def shm(self) -> int:
        return max(SHM_MIN, self.processes * SHM_PER_STUB)

    def cpus(self, device: str) -> int:
        """CPU: the instance count the build chose (one single-threaded instance per core); GPU: the Python
        around the GPU (tokenizing, batching), one core per two model processes."""
        if device == "gpu":
            return max(2, math.ceil(self.processes / 2))
        return max([m.instances for m in self.models if m.backend != "ensemble"] or [1])

    def load_estimate_s(self, device: str) -> float:
        """How long the models take to load: copy and read the bytes, start the processes a few at a time."""
        return (
            10 + self.total_bytes / LOAD_BYTES_PER_S + LOAD_PER_STUB_S * math.ceil(self.processes / self.cpus(device))
        )


WEIGHTS = (".safetensors", ".bin", ".onnx", ".onnx.data", ".pt", ".pth")


def read_facts(files: storage.Files) -> Facts:
    """The models of a tritonhf-built repository, from their config.pbtxt and their files' sizes."""
    served = tuple(json.loads(files.read(MARKER)))  # built by tritonhf, and complete (a push writes it last)
    sizes = files.sizes()
    models = []
    for path in sorted(p for p in sizes if PurePosixPath(p).name == "config.pbtxt"):
        name = str(PurePosixPath(path).parent)
        config = model_config.parse(files.read(path))
        groups = config.get("instance_group") or [{}]
        weights = sum(size for file, size in sizes.items() if file.startswith(f"{name}/") and file.endswith(WEIGHTS))
        source = config.get("parameters", {}).get("huggingface_model", {}).get("string_value")
        from_hub = source not in (None, LOCAL_WEIGHTS) and not weights  # in the image's HF cache
        models.append(
            Model(
                name=name,
                backend="ensemble" if config.get("platform") == "ensemble" else config.get("backend", "native"),
                kind=groups[0].get("kind", "KIND_CPU"),
                instances=instance_count(config),
                weight_bytes=None if from_hub else weights,
            )
        )
    if not models:
        raise TritonHFError(f"{files.location.uri}: no models (no config.pbtxt)")
    return Facts(tuple(models), sum(sizes.values()), served, placement.read(files))
