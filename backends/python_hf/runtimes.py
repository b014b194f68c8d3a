"""Exported networks inside the Python backend, for servers without Triton's onnxruntime or
libtorch backends (the pip-installed server): the same files those backends would load."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .batching import TensorFn
from .steps import StepContext


def onnxruntime_step(context: StepContext) -> TensorFn:
    import onnxruntime

    gpu = context.device.startswith("cuda")
    providers = [("CUDAExecutionProvider", {"device_id": int(context.device.split(":")[1])})] if gpu else []
    session = onnxruntime.InferenceSession(
        str(context.model_dir / context.parameters["model_file"]), providers=[*providers, "CPUExecutionProvider"]
    )
    inputs = [tensor.name for tensor in session.get_inputs()]

    def forward(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(
            zip(context.output_names, session.run(list(context.output_names), {name: batch[name] for name in inputs}))
        )

    return forward


def torch_jit_step(context: StepContext) -> TensorFn:
    """Inputs by position in the config's order, outputs by position: libtorch's convention."""
    import torch

    module = torch.jit.load(
        str(context.model_dir / context.parameters["model_file"]), map_location=context.device
    ).eval()

    def forward(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = module(*(torch.from_numpy(batch[name]).to(context.device) for name in context.input_names))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return {name: output.float().cpu().numpy() for name, output in zip(context.output_names, outputs)}

    return forward
