"""Reduced precision earns its place at build time: a parity gate per model and dtype.

``--dtype auto`` is decided where the model runs (backends/python_hf/hardware.py:
bfloat16 on CPUs with native bf16, float16 then bfloat16 on CUDA, else
float32), but only among the precisions that passed this gate for that model;
the builder writes them into the config parameter ``verified_dtypes``. A model
that fails the gate serves float32, and the build says so.

The gate runs the model's own serving path (the task's tokenisation, padding and
heads; for generation the running batch) in float32 and in the reduced
precision on the probe set, and compares:

- text-classification: argmax agreement >= 99% (the int8 export's gate);
- feature-extraction: mean cosine of the sentence embeddings >= 0.99;
- text-generation: next-token agreement at prefill >= 95%, and the greedy
  answers' first ``GREEDY_TOKENS`` tokens: on average >= 50% of them agree up
  to the first divergence (greedy decoding amplifies a near-tie into a
  different continuation, so the first figure is the strict one).

Which dtypes are gated depends on the instance kind, not on the build host: a
repository built on one machine is served on another, whose hardware picks.
Results are cached by the model's files, the dtype and this module's code.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tritonhf import TritonHFError, cache_dir
from tritonhf.backends.onnx_export.exporters import files_digest
from tritonhf.backends.onnx_export.parity import PROBES
from tritonhf.backends.python_hf.hardware import REDUCED, choose, cpu_bf16

MIN_AGREEMENT, MIN_COSINE = 0.99, 0.99
MIN_NEXT_TOKEN, MIN_GREEDY, GREEDY_TOKENS = 0.95, 0.5, 16
GENERATION_PROBES = PROBES[::7]  # 30 prompts: generation costs a forward per token


GATE_FOR = {
    "any-host": "gate every precision --dtype auto may pick where the repository is served",
    "this-host": "CPU instances: gate only what this CPU picks (no native bf16: nothing, and the repository serves"
    " float32 on any host); for a build served here, it skips a slow bf16 gate on a CPU that emulates bf16",
}


def gated(requested: str, device: str, gate_for: str = "any-host", flags: Collection[str] | None = None) -> list[str]:
    """The reduced precisions to gate: the one asked for, or every one ``auto`` may pick on ``device`` (cpu/gpu)
    where it is served, or on this host's CPU only (``gate_for`` this-host; ``flags``: its CPU flags, read if None)."""
    if requested != "auto":
        return [requested] if requested in REDUCED else []
    if device == "gpu":
        return list(REDUCED)  # float16, then bfloat16 where the GPU has it: decided at load
    if gate_for == "this-host" and not cpu_bf16(flags):
        return []  # this CPU serves float32: its emulated bf16 is slower, and its gate takes minutes
    return ["bfloat16"]  # a CPU with native bf16 takes it; decided at load, on the serving host


@dataclass(frozen=True)
class Verdict:
    model: str
    dtype: str
    checks: dict[str, float]  # figure -> measured
    limits: dict[str, float]  # figure -> minimum
    cached: bool = False

    @property
    def passed(self) -> bool:
        return all(self.checks[name] >= limit for name, limit in self.limits.items())


def reduced_copy(task: Any, dtype: str) -> Any:
    """The same task (tokenizer, heads, limits) over a copy of its model in ``dtype``."""
    import torch

    clone = copy.copy(task)
    clone.model = copy.deepcopy(task.model).to(getattr(torch, dtype))
    return clone


def limits(task: str) -> dict[str, float]:
    """The gate's minimum per figure (read when judging, so a cached measurement meets today's limits)."""
    if task == "text-generation":
        return {"next-token agreement": MIN_NEXT_TOKEN, "greedy prefix": MIN_GREEDY}
    return {"argmax agreement": MIN_AGREEMENT} if task == "text-classification" else {"cosine mean": MIN_COSINE}


def encoder_checks(task: Any, reduced: Any) -> dict[str, float]:
    want, got = task(PROBES), reduced(PROBES)
    if "label" in want:
        return {"argmax agreement": float((want["label"] == got["label"]).mean())}
    cosine = (want["embedding"] * got["embedding"]).sum(-1)
    return {"cosine mean": float(cosine.mean()), "cosine min": float(cosine.min())}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def generation_checks(task: Any, reduced: Any) -> dict[str, float]:
    """Greedy answers of GREEDY_TOKENS tokens through the running batch; the first token is the prefill's argmax."""
    from tritonhf.backends.python_hf.running_batch import generate_all

    params = dataclasses.replace(
        task.defaults, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False, stop=()
    )
    answers = []
    for model in (task, reduced):
        rows = [model.sequence(text, params) for text in GENERATION_PROBES]
        generate_all(model, rows)
        answers.append([row.tokens for row in rows])
    pairs = list(zip(*answers))
    return {
        "next-token agreement": float(np.mean([a[0] == b[0] for a, b in pairs])),
        "greedy prefix": float(np.mean([common_prefix(a, b) / GREEDY_TOKENS for a, b in pairs])),
    }


def cache_key(source: str, task: str, dtype: str) -> str:
    versions = [metadata.version(name) for name in ("torch", "transformers")]
    material = json.dumps([files_digest(source), task, dtype, versions, Path(__file__).read_text()])
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def gate(name: str, source: str, task: Any, dtype: str) -> Verdict:
    """One model in one reduced precision against its float32 self (or the cached verdict)."""
    entry = cache_dir() / "precision" / f"{name}-{dtype}-{cache_key(source, task.task, dtype)}.json"
    if entry.exists():
        return Verdict(name, dtype, json.loads(entry.read_text()), limits(task.task), cached=True)
    checks = generation_checks if task.task == "text-generation" else encoder_checks
    try:
        measured = checks(task, reduced_copy(task, dtype))
    except Exception as err:  # the model can't answer the probe set: it would fail its requests too
        raise TritonHFError(f"{name}: the precision gate can't run it: {type(err).__name__}: {err}") from err
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(json.dumps(measured))
    return Verdict(name, dtype, measured, limits(task.task))


def verify(
    models: Sequence[tuple[str, str, Any]], requested: str, device: str, gate_for: str = "any-host"
) -> dict[str, list[Verdict]]:
    """Gate each (name, source, float32 task) in the dtypes ``requested`` may use on ``device``."""
    dtypes = gated(requested, device, gate_for)
    work = [(model, dtype) for model in models for dtype in dtypes]
    verdicts: dict[str, list[Verdict]] = {name: [] for name, _, _ in models}
    for (name, source, task), dtype in tqdm(work, desc="precision gate", unit="check", disable=not work):
        verdicts[name].append(gate(name, source, task, dtype))
    return verdicts


def summary(verdicts: dict[str, list[Verdict]], requested: str, device: str, gate_for: str = "any-host") -> str:
    """What the build chose and why, then the gate's table."""
    if not any(verdicts.values()):
        skipped = requested == "auto" and not gated(requested, device, gate_for)  # only this-host gates nothing
        why = " (--gate-for this-host: this CPU lacks native bf16, so bfloat16 was not gated)" if skipped else ""
        return f"dtype {requested}: float32 everywhere{why}"
    if requested != "auto":
        head = f"dtype {requested} where it passes the gate, float32 where not"
    elif device == "gpu":
        head = "dtype auto on GPU instances: float16, or bfloat16 where float16 fails and the GPU has it"
    else:
        here = cpu_bf16()
        host = f"this CPU has {here}: bfloat16 here" if here else "this CPU lacks native bf16: float32 here"
        head = f"dtype auto on CPU instances: bfloat16 on CPUs with native bf16, else float32 ({host})"
    lines = [head, "", "| model | dtype | check | measured | minimum | |", "|---|---|---|---|---|---|"]
    failed = []
    for name, found in verdicts.items():
        for verdict in found:
            cached = " (cached)" if verdict.cached else ""
            for check, value in verdict.checks.items():
                limit = verdict.limits.get(check)
                mark = "" if limit is None else ("pass" if value >= limit else "FAIL")
                shown = "" if limit is None else f"{limit:.2f}"
                lines.append(f"| {name} | {verdict.dtype} | {check} | {value:.4f} | {shown} | {mark}{cached} |")
            if not verdict.passed:
                failed.append(f"{name}: {verdict.dtype} failed the parity gate; it serves float32 instead")
    return "\n".join([*lines, *failed])


def served_dtype(requested: str, device: str, verified: Sequence[str]) -> str:
    """What a model serves in on this host's CPU (cpu instances), or what was asked for (gpu: decided there)."""
    return choose(requested, "cpu", verified).dtype if device == "cpu" else requested


def export_dtype(options: Any, verified: Sequence[str]) -> str:
    """The precision of reduced-precision exports (TorchScript): a file is compiled once, for the build host's
    CPU, like the int8 export's preset; float32 for GPU instances, whose precision is chosen at load."""
    return served_dtype(options.dtype, options.device, verified) if options.device == "cpu" else "float32"
