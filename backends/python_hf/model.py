"""tritonhf's one generic Python-backend model: Triton glue around batching.py and tasks.py.

Every model the repository builder writes gets a copy of this file; what
differs between models is data in its config.pbtxt ``parameters``:
``huggingface_model`` (a hub id, or a directory relative to this version
directory), ``task``, ``dtype`` and the task's own options (``max_length``).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from .batching import Failure, Result, run_batch
from .tasks import ConfigError, load_task


def task_parameters(model_config: dict) -> dict[str, str]:
    """config.pbtxt parameters, less Triton's own (upper-case, such as EXECUTION_ENV_PATH)."""
    parameters = {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
    return {key: value for key, value in parameters.items() if not key.isupper()}


def read_prompt(request: "pb_utils.InferenceRequest") -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, "prompt")
    return None if tensor is None else tensor.as_numpy()


def to_response(result: Result) -> "pb_utils.InferenceResponse":
    if isinstance(result, Failure):
        code = pb_utils.TritonError.INTERNAL if result.internal else pb_utils.TritonError.INVALID_ARG
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(result.message, code))
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, array) for name, array in result.items()])


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        options = task_parameters(config)
        missing = [key for key in ("huggingface_model", "task") if key not in options]
        if missing:
            raise pb_utils.TritonModelException(f"config.pbtxt parameters lack {', '.join(missing)}")
        source = options.pop("huggingface_model")
        local = Path(args["model_repository"]) / args["model_version"] / source
        model_id = str(local) if local.is_dir() else source
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        try:
            self.task = load_task(model_id, options.pop("task"), device=device, dtype=options.pop("dtype", "auto"), **options)
        except ConfigError as err:
            raise pb_utils.TritonModelException(f"{args['model_name']}: {err}") from None
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.task.task} with {source} on {device}, up to {self.task.max_tokens} input tokens"
        )

    def execute(self, requests: list) -> list:
        results = run_batch(self.task, [read_prompt(request) for request in requests], pb_utils.Logger.log_error)
        return [to_response(result) for result in results]
