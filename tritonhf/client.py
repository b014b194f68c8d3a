"""Query a served model (``tritonhf client``, ``client.py``): the tutorial's client, batch-aware.

The tutorial's client copied the input shape from the model metadata, which
breaks once ``max_batch_size`` > 0 (the shape then starts with -1). Here the
batch axis is the number of prompts, and every prompt is one row.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import ModuleType

import numpy as np

from tritonhf import TritonHFError

DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}


def client_module(protocol: str) -> ModuleType:
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def infer(model: str, prompts: Sequence[str], url: str | None = None, protocol: str = "http") -> dict[str, np.ndarray]:
    """Send the prompts as one request of shape [rows, 1]; every output, by name."""
    module = client_module(protocol)
    client = module.InferenceServerClient(url or DEFAULT_URLS[protocol])
    try:
        config = client.get_model_config(model, **({"as_json": True} if protocol == "grpc" else {}))
        config = config.get("config", config)
        batched = int(config.get("max_batch_size", 0)) > 0
        if not batched and len(prompts) != 1:
            raise TritonHFError(f"model {model} does not batch: send one prompt at a time")
        data = np.array([p.encode("utf-8") for p in prompts], dtype=object).reshape((-1, 1) if batched else (1,))
        prompt = module.InferInput("prompt", list(data.shape), "BYTES")
        prompt.set_data_from_numpy(data)
        result = client.infer(model, [prompt])
        return {output["name"]: result.as_numpy(output["name"]) for output in config["output"]}
    except module.InferenceServerException as err:
        raise TritonHFError(f"{model}: {err.message()}") from None
    except OSError as err:  # the HTTP client's connection errors
        raise TritonHFError(f"cannot reach the server at {url or DEFAULT_URLS[protocol]}: {err}") from None
    finally:
        client.close()


def show(value: np.ndarray, width: int = 100) -> str:
    text = repr([v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value.tolist()])
    return text if len(text) <= width else text[: width - 3] + "..."


def table(outputs: dict[str, np.ndarray]) -> str:
    """The tutorial's Name | Shape | Data table, one line per output row."""
    rows = [("Name", "Shape", "Data")]
    for name, array in outputs.items():
        rows += [(name, str(list(array.shape)), show(row)) for row in (array if array.ndim > 1 else [array])]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{a:<{widths[0]}} | {b:<{widths[1]}} | {c}" for a, b, c in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", required=True, help="model name in the repository")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several rows in one request")
    parser.add_argument("-i", "--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--url", help="server address (default: localhost:8000 for http, localhost:8001 for grpc)")


def run(args: argparse.Namespace) -> dict[str, np.ndarray]:
    outputs = infer(args.model, args.prompt, args.url, args.protocol)
    print(table(outputs))
    return outputs
