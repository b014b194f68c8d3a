"""config.pbtxt through Triton's protobuf schema: a misspelt field fails here, not in the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2


def to_pbtxt(config: dict[str, Any]) -> str:
    """Validate a config dict against ModelConfig and render it as config.pbtxt text."""
    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    text = text_format.MessageToString(message)
    if message.max_batch_size == 0:
        # proto3 drops zero scalars; Triton reads a missing max_batch_size as "let the backend decide".
        text = "max_batch_size: 0\n" + text
    return text


def write(config: dict[str, Any], model_dir: Path) -> Path:
    path = model_dir / "config.pbtxt"
    path.write_text(to_pbtxt(config))
    return path


def read(path: Path) -> dict[str, Any]:
    """Parse a config.pbtxt back into the dict form ``to_pbtxt`` takes."""
    message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
