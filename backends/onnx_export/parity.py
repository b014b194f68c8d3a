"""Parity at export time: an export enters the cache only if it computes what PyTorch computes.

Two gates; the variant registry (tritonhf/variants.py) says which an export passes.
:class:`Exact` (fp32 exports): on batches 1/3/8 and sequence lengths from short
to the model's maximum, every output within 1e-4 (max abs) of PyTorch and the
same argmax. :class:`Agreement` (int8): on a probe set of sentences, argmax
agreement >= 99% (classification) or mean cosine of the pooled embeddings >= 0.99.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from ..python_hf.heads import mean_pool
from .spec import ExportError, ExportSpec

SUBJECTS = [
    "The movie",
    "This phone",
    "Our new manager",
    "The weather in Paris",
    "A small cafe near the station",
    "The second season of the show",
]
VERBS = ["was", "is", "seemed", "turned out to be", "will probably be"]
OBJECTS = [
    "wonderful",
    "a complete waste of time",
    "better than I expected",
    "boring and far too long",
    "fine, I guess",
    "absolutely terrible, do not buy it",
    "the best thing this year",
]
PROBES = [f"{s} {v} {o}." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]  # 210 sentences

Arrays = dict[str, np.ndarray]
Runner = Callable[[Arrays], Arrays]


def reference_outputs(model: object, spec: ExportSpec, inputs: Arrays) -> Arrays:
    import torch

    with torch.inference_mode():
        out = model(**{name: torch.from_numpy(array) for name, array in inputs.items()})
    return {t.name: getattr(out, t.name).float().numpy() for t in spec.outputs}


def max_abs_error(got: Arrays, want: Arrays, mask: np.ndarray) -> float:
    """Over real tokens only: what padded positions hold is never read."""
    errors = []
    for name in want:
        diff = np.abs(got[name] - want[name])
        errors.append(float(diff[mask.astype(bool)].max() if diff.ndim == 3 else diff.max()))
    return max(errors)


def shapes(max_tokens: int) -> list[tuple[int, int]]:
    return [(1, 8), (3, 64), (8, max_tokens)]


@dataclass(frozen=True)
class Exact:
    """Within ``atol`` of PyTorch on every output, same argmax, over batches and lengths up to the model's maximum."""

    atol: float = 1e-4

    def __call__(
        self, label: str, run: Runner, spec: ExportSpec, model: Any, max_tokens: int, tokenize: Any
    ) -> list[dict]:
        rows = []
        for batch, sequence in tqdm(shapes(max_tokens), desc=f"parity {label}", unit="shape", leave=False):
            inputs = spec.dummy_inputs(batch, sequence, model.config.vocab_size)
            want, got = reference_outputs(model, spec, inputs), run(inputs)
            error = max_abs_error(got, want, inputs["attention_mask"])
            row = {"variant": label, "check": f"batch {batch} x seq {sequence}", "max_abs_error": error}
            if "logits" in want:
                row["same_argmax"] = bool((got["logits"].argmax(-1) == want["logits"].argmax(-1)).all())
            rows.append(row)
            if error > self.atol or row.get("same_argmax") is False:
                raise ExportError(
                    f"{label} parity failed at batch {batch} x sequence {sequence}: max abs error {error:.2e}"
                    f" (limit {self.atol:.0e}), same argmax: {row.get('same_argmax')}"
                )
        return rows


@dataclass(frozen=True)
class Agreement:
    """On a probe set of real sentences: argmax agreement (classifiers) or mean embedding cosine (encoders)."""

    min_agreement: float = 0.99
    min_cosine: float = 0.99

    def __call__(
        self,
        label: str,
        run: Runner,
        spec: ExportSpec,
        model: Any,
        max_tokens: int,
        tokenize: Callable[[list[str]], Arrays],
    ) -> list[dict]:
        inputs = tokenize(PROBES)
        want, got = reference_outputs(model, spec, inputs), run(inputs)
        mask = inputs["attention_mask"]
        row = {
            "variant": label,
            "check": f"probe set of {len(PROBES)}",
            "max_abs_error": max_abs_error(got, want, mask),
        }
        if "logits" in want:
            row["argmax_agreement"] = float((got["logits"].argmax(-1) == want["logits"].argmax(-1)).mean())
            failed = row["argmax_agreement"] < self.min_agreement
        else:
            pooled = [mean_pool(out["last_hidden_state"], mask)["embedding"] for out in (got, want)]
            cosine = (pooled[0] * pooled[1]).sum(-1)
            row["cosine_mean"], row["cosine_min"] = float(cosine.mean()), float(cosine.min())
            failed = row["cosine_mean"] < self.min_cosine
        if failed:
            raise ExportError(f"{label} parity failed on the probe set: {row}")
        return [row]
