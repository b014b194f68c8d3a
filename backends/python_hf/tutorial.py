"""The Triton tutorial's model, kept as the baseline that every speed claim is a ratio against.

What users of "Deploying Hugging Face Transformer Models in Triton" ran: one
``transformers.pipeline`` call per request, no ``max_batch_size``, no dynamic
batching. One change for a fair comparison: generation is greedy and makes the
same number of new tokens as the batched model (the tutorial sampled, and its
``max_length=15`` was overridden by the pipeline's 256 new tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .batching import BatchFn
from .heads import as_bytes
from .parameters import GenerationParams
from .steps import StepContext

UNLIMITED = 1 << 30  # the pipeline truncates nothing: whatever the config asks for

ANSWERS: dict[str, Callable[[list[dict]], dict[str, np.ndarray]]] = {  # pipeline outputs -> the batched model's outputs
    "text-generation": lambda rows: {"text": as_bytes([row["generated_text"] for row in rows])},
    "text-classification": lambda rows: {
        "label": as_bytes([row["label"] for row in rows]),
        "score": np.array([[row["score"]] for row in rows], dtype=np.float32),
    },
}
OUTPUTS = {"text-generation": ("text",), "text-classification": ("label", "score")}  # the tutorial's interface


def pipeline_step(context: StepContext) -> BatchFn:
    from transformers import pipeline

    task = context.parameters["task"]
    if task not in ANSWERS:
        raise ValueError(f"the tutorial's baseline covers {', '.join(ANSWERS)}, not {task}")
    pipe = pipeline(task, model=context.source(), device=context.device)
    options = {}
    if task == "text-generation":  # greedy, as many new tokens as the batched model makes
        defaults = GenerationParams.from_config(context.parameters, UNLIMITED)
        options = {
            "max_new_tokens": defaults.max_new_tokens,
            "min_new_tokens": defaults.min_new_tokens,
            "do_sample": False,
        }

    def forward(texts: list[str]) -> dict[str, np.ndarray]:
        return ANSWERS[task]([pipe(text, **options)[0] for text in texts])  # one call per text, as the tutorial

    return forward
