"""Parity at export time: an export enters the cache only if it computes what PyTorch computes.

fp32 variants (onnx, torchscript): on batches 1/3/8 and sequence lengths from
short to the model's maximum, every output within 1e-4 (max abs) of PyTorch and
the same argmax. int8: on a probe set of sentences, argmax agreement >= 99%
(classification) or mean cosine of the pooled embeddings >= 0.99.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tritonhf.backends.python_hf.heads import mean_pool

from .exporters import Variant
from .spec import ExportError, ExportSpec

ATOL = 1e-4
MIN_AGREEMENT = 0.99
MIN_COSINE = 0.99
SUBJECTS = ["The movie", "This phone", "Our new manager", "The weather in Paris", "A small cafe near the station", "The second season of the show"]
VERBS = ["was", "is", "seemed", "turned out to be", "will probably be"]
OBJECTS = ["wonderful", "a complete waste of time", "better than I expected", "boring and far too long", "fine, I guess", "absolutely terrible, do not buy it", "the best thing this year"]
PROBES = [f"{s} {v} {o}." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]  # 210 sentences

Arrays = dict[str, np.ndarray]


def reference_outputs(model: object, spec: ExportSpec, inputs: Arrays) -> Arrays:
    import torch

    with torch.inference_mode():
        out = model(**{name: torch.from_numpy(array) for name, array in inputs.items()})
    return {t.name: getattr(out, t.name).float().numpy() for t in spec.outputs}


def max_abs_error(spec: ExportSpec, got: Arrays, want: Arrays, mask: np.ndarray) -> float:
    """Over real tokens only: what padded positions hold is never read."""
    errors = []
    for name in want:
        diff = np.abs(got[name] - want[name])
        errors.append(float(diff[mask.astype(bool)].max() if diff.ndim == 3 else diff.max()))
    return max(errors)


def shapes(max_tokens: int) -> list[tuple[int, int]]:
    return [(1, 8), (3, 64), (8, max_tokens)]


def exact(variant: Variant, spec: ExportSpec, model: object, path: Path, max_tokens: int) -> list[dict]:
    run = variant.runner(path, spec)
    rows = []
    for batch, sequence in tqdm(shapes(max_tokens), desc=f"parity {variant.name}", unit="shape", leave=False):
        inputs = spec.dummy_inputs(batch, sequence, model.config.vocab_size)
        want, got = reference_outputs(model, spec, inputs), run(inputs)
        error = max_abs_error(spec, got, want, inputs["attention_mask"])
        row = {"variant": variant.name, "check": f"batch {batch} x seq {sequence}", "max_abs_error": error}
        if "logits" in want:
            row["same_argmax"] = bool((got["logits"].argmax(-1) == want["logits"].argmax(-1)).all())
        rows.append(row)
        if error > ATOL or row.get("same_argmax") is False:
            raise ExportError(f"{variant.name} parity failed at batch {batch} x sequence {sequence}: max abs error {error:.2e} (limit {ATOL:.0e}), same argmax: {row.get('same_argmax')}")
    return rows


def agreement(variant: Variant, spec: ExportSpec, model: object, path: Path, tokenize: Callable[[list[str]], Arrays]) -> list[dict]:
    run = variant.runner(path, spec)
    inputs = tokenize(PROBES)
    want, got = reference_outputs(model, spec, inputs), run(inputs)
    row = {"variant": variant.name, "check": f"probe set of {len(PROBES)}", "max_abs_error": max_abs_error(spec, got, want, inputs["attention_mask"])}
    if "logits" in want:
        row["argmax_agreement"] = float((got["logits"].argmax(-1) == want["logits"].argmax(-1)).mean())
        failed = row["argmax_agreement"] < MIN_AGREEMENT
    else:
        cosine = (mean_pool(got["last_hidden_state"], inputs["attention_mask"])["embedding"] * mean_pool(want["last_hidden_state"], inputs["attention_mask"])["embedding"]).sum(-1)
        row["cosine_mean"], row["cosine_min"] = float(cosine.mean()), float(cosine.min())
        failed = row["cosine_mean"] < MIN_COSINE
    if failed:
        raise ExportError(f"{variant.name} parity failed on the probe set: {row}")
    return [row]


def checker(variant: Variant, spec: ExportSpec, model: object, max_tokens: int, tokenize: Callable[[list[str]], Arrays]) -> Callable[[Path], list[dict]]:
    if variant.exact:
        return lambda path: exact(variant, spec, model, path, max_tokens)
    return lambda path: agreement(variant, spec, model, path, tokenize)
