"""Task heads over plain arrays: logits -> label + score, hidden states -> sentence embedding, answers -> outputs.

numpy only, so the same code serves the eager PyTorch models (tasks.py) and the
ensembles' postprocess step, which imports neither torch nor transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .batching import TensorFn
from .steps import StepContext
from .tensors import TensorSpec


def as_bytes(strings: Sequence[str]) -> np.ndarray:
    """A [rows, 1] BYTES array, the shape of the ``prompt`` input."""
    return np.array([s.encode("utf-8") for s in strings], dtype=object).reshape(-1, 1)


@dataclass(frozen=True)
class Piece:
    """A generated answer, or one streamed piece of it: its text, the tokens it took, and, when it is the last,
    why the answer ended."""

    text: str
    new_tokens: int
    prompt_tokens: int  # the prompt's length in tokens as the model read it (after any truncation)
    finish: str | None = None  # on the last: length | eos | stop

    @property
    def final(self) -> bool:
        return self.finish is not None


GENERATION_OUTPUTS = (
    TensorSpec("text", "bytes"),
    TensorSpec("new_tokens", "int32"),
    TensorSpec("prompt_tokens", "int32"),
    TensorSpec("finish_reason", "bytes"),  # empty until the last piece of a stream
)


def generation_outputs(pieces: Sequence[Piece]) -> dict[str, np.ndarray]:
    """GENERATION_OUTPUTS, a row per piece."""
    return {
        "text": as_bytes([piece.text for piece in pieces]),
        "new_tokens": np.array([[piece.new_tokens] for piece in pieces], dtype=np.int32),
        "prompt_tokens": np.array([[piece.prompt_tokens] for piece in pieces], dtype=np.int32),
        "finish_reason": as_bytes([piece.finish or "" for piece in pieces]),
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


@dataclass(frozen=True)
class ClassificationHead:
    """The transformers pipeline's rule: sigmoid for one-logit or multi-label models, else softmax."""

    labels: tuple[str, ...]
    multi_label: bool = False

    @classmethod
    def from_config(cls, config: object) -> ClassificationHead:
        labels = tuple(config.id2label[i] for i in range(config.num_labels))
        return cls(labels, config.problem_type == "multi_label_classification" or config.num_labels == 1)

    def parameters(self) -> dict[str, str]:
        """The head as config.pbtxt parameters, for the postprocess step."""
        return {"labels": json.dumps(list(self.labels)), "multi_label": str(self.multi_label).lower()}

    def __call__(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        logits = logits.astype(np.float32)
        probabilities = sigmoid(logits) if self.multi_label else softmax(logits)
        index = probabilities.argmax(axis=-1)
        score = np.take_along_axis(probabilities, index[:, None], axis=-1)
        return {"label": as_bytes([self.labels[i] for i in index]), "score": score.astype(np.float32)}


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Attention-masked mean over tokens, L2-normalised: sentence-transformers' pooling for MiniLM; and the tokens
    each row took (the OpenAI API's usage)."""
    mask = attention_mask[..., None].astype(np.float32)
    pooled = (hidden.astype(np.float32) * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    norms = np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12, None)
    return {"embedding": (pooled / norms).astype(np.float32), "tokens": mask.sum(axis=1).astype(np.int32)}


# The ensembles' postprocess steps: network outputs -> the Python model's outputs.


def classify(context: StepContext) -> TensorFn:
    head = ClassificationHead(
        tuple(json.loads(context.parameters["labels"])), context.parameters.get("multi_label") == "true"
    )
    return lambda batch: head(batch["logits"])


def pool(context: StepContext) -> TensorFn:
    return lambda batch: mean_pool(batch["last_hidden_state"], batch["attention_mask"])
