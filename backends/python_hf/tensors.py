"""The one tensor type: a Triton input or output, declared once.

The tasks declare their outputs with it, the generation parameters their
optional inputs, and the export declarations (backends/onnx_export/spec.py)
their network's inputs and outputs. The builder turns it into config.pbtxt
(tritonhf/model_config.py); nothing else spells a tensor's type or shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

TRITON_TYPES = {
    "bytes": "TYPE_STRING",
    "bool": "TYPE_BOOL",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float32": "TYPE_FP32",
}
SEQUENCE = "sequence"  # the dynamic axis of token tensors


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type (numpy's name; ``bytes`` for strings) and dims without the batch axis.

    A dim is a size, -1 (any length), ``sequence`` (dynamic, named for ONNX), or
    another name: a size read from the model config (``hidden``, ``num_labels``).
    """

    name: str
    dtype: str
    dims: tuple[int | str, ...] = (1,)
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_TYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(TRITON_TYPES)}")

    @property
    def triton_type(self) -> str:
        return TRITON_TYPES[self.dtype]

    def shape(self, sizes: Mapping[str, int] | None = None) -> list[int]:
        """Triton dims: -1 where dynamic, named sizes looked up in ``sizes``."""
        sizes = sizes or {}
        return [-1 if dim == SEQUENCE else sizes[dim] if isinstance(dim, str) else dim for dim in self.dims]


PROMPT = TensorSpec("prompt", "bytes")  # the tutorial's input: one text a row
