"""config.pbtxt, the one place: declarations in, Triton's protobuf schema out.

The builder (repo_builder.py) and the ensembles (ensembles.py) describe what
each Triton model is (its tensors as backends/python_hf/tensors.TensorSpec,
its parameters, how it batches) and these functions assemble the ModelConfig
dict, which goes through ``model_config_pb2`` so that a misspelt field fails
here, not in the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tritonhf.backends.python_hf.tensors import TensorSpec

Config = dict[str, Any]


@dataclass(frozen=True)
class QueuePolicy:
    """A batched model's bounded queue (Triton's ``default_queue_policy``).

    Beyond ``max_size`` waiting requests a new one is refused at once, and a request
    that waited ``timeout_us`` is refused then (REJECT); both answer UNAVAILABLE, so a
    client or a load balancer can retry elsewhere instead of queueing without end.
    A client may ask for its own timeout (``allow_timeout_override``). 0 switches a bound off.
    """

    max_size: int = 64
    timeout_us: int = 10_000_000

    def config(self) -> Config:
        return {
            "max_queue_size": self.max_size,
            "default_timeout_microseconds": self.timeout_us,
            "allow_timeout_override": True,
            "timeout_action": "REJECT",
        }


def tensors(specs: Sequence[TensorSpec], sizes: Mapping[str, int] | None = None) -> list[Config]:
    """Inputs or outputs; optional inputs of any length (``stop``) batch raggedly."""
    configs = []
    for spec in specs:
        config: Config = {"name": spec.name, "data_type": spec.triton_type, "dims": spec.shape(sizes)}
        if spec.optional:
            config.update(optional=True, allow_ragged_batch=-1 in config["dims"])
        configs.append(config)
    return configs


def instance_group(count: int, device: str) -> list[Config]:
    return [{"count": count, "kind": "KIND_GPU" if device == "gpu" else "KIND_CPU"}]


def string_parameters(parameters: Mapping[str, str]) -> Config:
    return {key: {"string_value": value} for key, value in parameters.items()}


def dynamic_batching(queue_delay_us: int, queue: QueuePolicy | None) -> Config:
    batching: Config = {"max_queue_delay_microseconds": queue_delay_us}
    if queue is not None:
        batching["default_queue_policy"] = queue.config()
    return batching


def python_model(
    name: str,
    inputs: list[Config],
    outputs: list[Config],
    parameters: Mapping[str, str],
    *,
    max_batch_size: int,
    queue_delay_us: int | None = None,
    queue: QueuePolicy | None = None,
    instances: int = 1,
    device: str = "cpu",
    decoupled: bool = False,
) -> Config:
    """A model run by the generic Python model; ``queue_delay_us`` None: no dynamic batching (nor its queue)."""
    config: Config = {
        "name": name,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "instance_group": instance_group(instances, device),
        "parameters": string_parameters(parameters),
    }
    if queue_delay_us is not None:
        config["dynamic_batching"] = dynamic_batching(queue_delay_us, queue)
    if decoupled:
        config["model_transaction_policy"] = {"decoupled": True}
    return config


def native_model(
    name: str,
    platform: str,
    inputs: list[Config],
    outputs: list[Config],
    *,
    max_batch_size: int,
    instances: int,
    device: str,
    accelerator: str = "none",
    queue: QueuePolicy | None = None,
    parameters: Mapping[str, str] | None = None,
) -> Config:
    """A network run by one of Triton's own backends (onnxruntime, libtorch), dynamically batched at once."""
    config: Config = {
        "name": name,
        "platform": platform,
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "dynamic_batching": dynamic_batching(0, queue),
        "instance_group": instance_group(instances, device),
    }
    if accelerator != "none":
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [{"name": accelerator}]}}
    if parameters:
        config["parameters"] = string_parameters(parameters)
    return config


def ensemble(
    name: str,
    inputs: list[Config],
    outputs: list[Config],
    steps: Sequence[tuple[str, Mapping[str, str], Mapping[str, str]]],
    *,
    max_batch_size: int,
) -> Config:
    """Steps as (model, input map, output map): step tensor name -> ensemble tensor name, both ways."""
    return {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": outputs,
        "ensemble_scheduling": {
            "step": [
                {"model_name": model, "model_version": -1, "input_map": dict(ins), "output_map": dict(outs)}
                for model, ins, outs in steps
            ]
        },
    }


def to_pbtxt(config: Config) -> str:
    """Validate a config dict against ModelConfig and render it as config.pbtxt text."""
    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    text = text_format.MessageToString(message)
    if message.max_batch_size == 0:
        # proto3 drops zero scalars; Triton reads a missing max_batch_size as "let the backend decide".
        text = "max_batch_size: 0\n" + text
    return text


def write(config: Config, model_dir: Path) -> Path:
    path = model_dir / "config.pbtxt"
    path.write_text(to_pbtxt(config))
    return path


def read(path: Path) -> Config:
    """Parse a config.pbtxt back into the dict form ``to_pbtxt`` takes."""
    return parse(path.read_text())


def parse(text: str) -> Config:
    message = text_format.Parse(text, model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
