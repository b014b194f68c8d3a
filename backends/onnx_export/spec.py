"""Each export declared once: inputs, outputs, dtypes and dynamic axes per architecture and task.

The network's inputs per architecture are optimum's declaration (its ONNX
config: DistilBERT takes input_ids and attention_mask, BERT adds
token_type_ids), so the ONNX export, the TorchScript trace and the tokenize
step agree by construction. To it we add, per task, the outputs with their
fixed sizes and the postprocess step. From the resulting :class:`ExportSpec`
come the dummy inputs (tracing, parity checks), the Triton I/O of every step
(config.pbtxt) and the ensemble's input/output maps. Nothing else names these
tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..python_hf.tensors import SEQUENCE, TensorSpec


class ExportError(Exception):
    """An export that can't be made or fails its parity check; the message names what and why."""


@dataclass(frozen=True)
class ExportSpec:
    """What a task's network takes and gives, and which postprocess step turns it into the answer."""

    task: str
    outputs: tuple[TensorSpec, ...]
    postprocess: str  # the generic model's step: "classify" or "pool"
    postprocess_inputs: tuple[str, ...]  # tensors of the ensemble the postprocess step reads
    inputs: tuple[TensorSpec, ...] = ()  # per architecture, from optimum: see spec_for

    def tensor(self, name: str) -> TensorSpec:
        return {t.name: t for t in (*self.inputs, *self.outputs)}[name]

    @staticmethod
    def sizes(config: object) -> dict[str, int]:
        return {"num_labels": getattr(config, "num_labels", 0), "hidden": config.hidden_size}

    def dummy_inputs(self, batch: int, sequence: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random token ids; every row but the first is padded at the end, as the tokenize step pads."""
        rng = np.random.default_rng(seed)
        lengths = [sequence, *rng.integers(1, sequence + 1, size=batch - 1)]
        mask = (np.arange(sequence)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        ids = rng.integers(5, vocab_size, size=(batch, sequence)).astype(np.int64) * mask
        tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {t.name: tensors[t.name] for t in self.inputs}


TASKS = {
    spec.task: spec
    for spec in (
        ExportSpec("text-classification", (TensorSpec("logits", "float32", ("num_labels",)),), "classify", ("logits",)),
        ExportSpec(
            "feature-extraction",
            (TensorSpec("last_hidden_state", "float32", (SEQUENCE, "hidden")),),
            "pool",
            ("last_hidden_state", "attention_mask"),
        ),
    )
}
OPTIMUM_AXES = {"sequence_length": SEQUENCE}  # optimum's names of the dynamic axes past the batch


def spec_for(config: object, task: str) -> ExportSpec:
    """The export of one model for one task; ExportError if none is declared."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers optimum's ONNX configs
    from optimum.exporters.tasks import TasksManager

    if task not in TASKS:
        raise ExportError(f"no export declared for task {task!r}; declared: {', '.join(TASKS)}")
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model_type=config.model_type, task=task, library_name="transformers"
        )
    except (KeyError, ValueError):
        raise ExportError(
            f"no export declared for architecture {config.model_type!r} and task {task}"
            " (optimum has no ONNX config for it)"
        ) from None
    declared = constructor(config, task=task).inputs
    inputs = tuple(
        TensorSpec(name, "int64", tuple(OPTIMUM_AXES[axes[i]] for i in sorted(axes) if i))
        for name, axes in declared.items()
    )
    return dataclasses.replace(TASKS[task], inputs=inputs)
