"""Exported networks inside the Python backend, for servers without Triton's onnxruntime or
libtorch backends (the pip-installed server): the same files those backends would load.

Served either as the ensemble's middle step (``onnxruntime``, ``torch_jit``), or
fused (``fused``): tokenize -> network -> head in one model, one process and one
dynamic batch. The ensemble suits servers with the native backends (the network
runs in C++, beside the Python steps); on the pip-installed server each of its
three steps is a Python stub process, and a request crosses two more process
boundaries and is batched three times.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from .batching import FORWARD_OVERHEAD_TOKENS, BatchFn, TensorFn, merge
from .hardware import execution_providers
from .steps import StepContext, step_factory
from .text import length_groups, load_tokenizer


def onnxruntime_step(context: StepContext) -> TensorFn:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads := context.parameters.get("cpu_threads"):  # set by steps.load_step on a CPU
        options.intra_op_num_threads = int(threads)
    session = onnxruntime.InferenceSession(
        str(context.model_dir / context.parameters["model_file"]),
        options,
        providers=execution_providers(context.device, context.parameters.get("onnx_provider", "cuda")),
    )
    inputs = [tensor.name for tensor in session.get_inputs()]

    def forward(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(
            zip(context.output_names, session.run(list(context.output_names), {name: batch[name] for name in inputs}))
        )

    return forward


def torch_jit_step(context: StepContext) -> TensorFn:
    """Inputs by position in the config's order, outputs by position: libtorch's convention.

    The profiling executor stays off (as libtorch's DISABLE_OPTIMIZED_EXECUTION): the
    module was frozen and optimised at export, and re-specialising it for every new
    input shape only costs time.
    """
    import torch

    module = torch.jit.load(
        str(context.model_dir / context.parameters["model_file"]), map_location=context.device
    ).eval()

    def forward(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            outputs = module(*(torch.from_numpy(batch[name]).to(context.device) for name in context.input_names))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return {name: output.float().cpu().numpy() for name, output in zip(context.output_names, outputs)}

    return forward


def fused_step(context: StepContext) -> BatchFn:
    """Prompts -> tokenize -> the exported network -> the task's head, over rows of similar length.

    Parameters: the tokenizer (``huggingface_model``, ``max_tokens``); the network
    (``network``: its step, ``model_file``, ``network_inputs``, ``network_outputs``
    as the file names them, ``outputs_as``: the names the head reads); the head
    (``postprocess`` and its own parameters). Rows are padded in length buckets
    (batching.length_buckets), as the eager model does.
    """
    parameters = context.parameters
    tokenizer = load_tokenizer(context.source())
    limit = int(parameters["max_tokens"])
    inputs = tuple(parameters["network_inputs"].split(","))
    network = step_factory(parameters["network"])(
        dataclasses.replace(context, input_names=inputs, output_names=tuple(parameters["network_outputs"].split(",")))
    )
    renamed = parameters["outputs_as"].split(",")
    head = step_factory(parameters["postprocess"])(context)
    overhead = float(parameters.get("forward_overhead_tokens") or FORWARD_OVERHEAD_TOKENS[context.device.split(":")[0]])
    options = {"truncation": True, "max_length": limit, "return_token_type_ids": "token_type_ids" in inputs}

    def forward(texts: list[str]) -> dict[str, np.ndarray]:
        encoded = tokenizer(texts, **options)
        parts = []
        for rows, padded in length_groups(tokenizer, encoded, overhead, "np"):
            batch = {name: padded[name].astype(np.int64) for name in inputs}
            outputs = dict(zip(renamed, network(batch).values()))
            parts.append((rows, head({**batch, **outputs})))
        return merge(parts, len(texts))

    return forward
