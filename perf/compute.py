"""The machine's compute limit, measured in the same run as the figures it is compared with, and a served model's
throughput as a share of it: a figure that means the same on a 2-core laptop and on a 64-core server.

The probe multiplies matrices of a transformer layer's shape (``TOKENS`` x hidden by hidden x 4 hidden, BERT-base's
feed-forward) for a while, over every CPU the server may use, in each precision this host computes natively, with the
kernels the variants run on: PyTorch's (oneDNN) for float32 and bfloat16, ONNX Runtime's MatMulInteger (MLAS) for
int8, u8 x s8 where the CPU multiplies those natively (VNNI, AMX, Arm's dot product) and u8 x u8 otherwise, as the
int8 export's quantisation preset does (hardware.int8_target).

A request's work is counted, not estimated: ``torch.utils.flop_counter`` over one forward of the PyTorch model per
prompt, unpadded (what the answer needs, not what padding to a batch's longest costs). The share is then served
requests/s x FLOPs per request / the probe's FLOP/s in the variant's precision.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tritonhf.backends.python_hf.hardware import cpu_bf16, cpu_count, int8_target

TOKENS, HIDDEN = 256, 768
SECONDS = 1.0  # per precision, per repeat; the best of REPEATS counts (the limit: interference only lowers it)
REPEATS = 3


def precisions() -> list[str]:
    """The precisions this host computes natively (bfloat16 only with a CPU feature for it; int8 always: AVX2 at
    least, or Arm's dot product)."""
    return ["float32", *(["bfloat16"] if cpu_bf16() else []), "int8"]


def rate(step: object, flops: float, seconds: float = SECONDS) -> float:
    """FLOP/s of ``step()``: the best of ``REPEATS`` runs of about ``seconds`` each."""
    step()  # warm-up: kernel choice, packing
    best = 0.0
    for _ in range(REPEATS):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            step()
            done += 1
        best = max(best, done * flops / elapsed)
    return best


def torch_probe(dtype: str, threads: int) -> float:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(TOKENS, HIDDEN, dtype=getattr(torch, dtype))
        b = torch.randn(HIDDEN, 4 * HIDDEN, dtype=getattr(torch, dtype))
        with torch.inference_mode():
            return rate(lambda: a @ b, 2.0 * TOKENS * HIDDEN * 4 * HIDDEN)
    finally:
        torch.set_num_threads(before)


def int8_probe(threads: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    signed = int8_target() != "avx2"  # the preset's weights: s8 where the CPU multiplies u8 x s8 natively
    weight_type, weight_dtype = (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 127, (HIDDEN, 4 * HIDDEN)).astype(weight_dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [TOKENS, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [TOKENS, 4 * HIDDEN])],
        [helper.make_tensor("b", weight_type, weights.shape, weights.tobytes(), raw=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 255, (TOKENS, HIDDEN)).astype(np.uint8)
    return rate(lambda: session.run(None, {"a": a}), 2.0 * TOKENS * HIDDEN * 4 * HIDDEN)


def limits(threads: int | None = None) -> dict[str, float]:
    """FLOP/s per precision this host computes natively, over ``threads`` (default: every CPU this process may use)."""
    threads = threads or cpu_count()
    return {p: int8_probe(threads) if p == "int8" else torch_probe(p, threads) for p in precisions()}


def request_flops(source: Path, prompts: Sequence[str]) -> float:
    """The mean FLOPs of one request: one unpadded forward of the model at ``source`` per prompt, counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    # the encoder (a classifier's head is a rounding error); attention as plain matmuls, which the counter counts (it
    # has no formula for CPU's fused attention kernels: they would count as nothing)
    model = AutoModel.from_pretrained(source, attn_implementation="eager").eval()
    total = 0
    with torch.inference_mode():
        for prompt in prompts:
            with FlopCounterMode(display=False) as counter:
                model(**tokenizer(prompt, return_tensors="pt", truncation=True))
            total += counter.get_total_flops()
    return total / len(prompts)


def share(throughput_rps: float, flops_per_request: float, limit: float) -> float:
    return throughput_rps * flops_per_request / limit
