"""tritonhf's one generic Python-backend model: Triton glue around the Triton-free steps.

Every model the repository builder writes gets a copy of this directory; what
differs between models is data in its config.pbtxt ``parameters``. ``step``
picks what the model does (default ``hf``: a whole Hugging Face model for its
``task``); the ensembles' steps tokenize, run an exported network, or
postprocess. A step whose input is ``prompt`` (TYPE_STRING) takes texts; the
others take the tensors their config names.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from .batching import Failure, Result, load_step, run_batch, run_tensor_batch


def to_response(result: Result) -> "pb_utils.InferenceResponse":
    if isinstance(result, Failure):
        code = pb_utils.TritonError.INTERNAL if result.internal else pb_utils.TritonError.INVALID_ARG
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(result.message, code))
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, array) for name, array in result.items()])


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        try:
            self.forward, self.context = load_step(config, Path(args["model_repository"]) / args["model_version"], device)
        except Exception as err:  # noqa: BLE001 - any load failure fails the model with its reason
            raise pb_utils.TritonModelException(f"{args['model_name']}: {type(err).__name__}: {err}") from None
        self.text_input = [tensor["data_type"] for tensor in config["input"]] == ["TYPE_STRING"]
        self.batched = config.get("max_batch_size", 0) > 0  # unbatched (the baseline): tensors lack the batch axis
        pb_utils.Logger.log_info(f"{args['model_name']}: step {self.context.parameters.get('step', 'hf')} on {device}")

    def execute(self, requests: list) -> list:
        if self.text_input:
            prompts = [pb_utils.get_input_tensor_by_name(request, "prompt") for request in requests]
            prompts = [None if p is None else p.as_numpy() if self.batched else p.as_numpy().reshape(-1, 1) for p in prompts]
            results = run_batch(self.forward, prompts, pb_utils.Logger.log_error)
        else:
            tensors = [{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.context.input_names} for request in requests]
            results = run_tensor_batch(self.forward, tensors, pb_utils.Logger.log_error)
        if not self.batched:
            results = [r if isinstance(r, Failure) else {name: array[0] for name, array in r.items()} for r in results]
        return [to_response(result) for result in results]
