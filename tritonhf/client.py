"""Query a served model (``tritonhf client``, ``client.py``): the tutorial's client, batch-aware.

The tutorial's client copied the input shape from the model metadata, which
breaks once ``max_batch_size`` > 0 (the shape then starts with -1). Here the
batch axis (the -1) is the number of prompts, and every prompt is one row. ``--param``
sends request parameters (generation: ``max_new_tokens=32``, ``do_sample=true``);
``--stream`` reads a ``<name>_stream`` model over gRPC streaming and prints its
pieces as they arrive.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import queue
import sys
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, Literal

import numpy as np

from tritonhf import TritonHFError
from tritonhf.variants import VARIANTS

DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}


def client_module(protocol: str) -> ModuleType:
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def infer(
    model: str,
    prompts: Sequence[str],
    url: str | None = None,
    protocol: str = "http",
    parameters: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Send the prompts as one request of shape [rows, 1]; every output, by name.

    The shapes come from the model's metadata (open to every client; its config is an admin API): a batched
    model's ``prompt`` is [-1, 1], one prompt per row; an unbatched one's is [1].
    """
    module = client_module(protocol)
    client = module.InferenceServerClient(url or DEFAULT_URLS[protocol])
    try:
        meta = metadata(client, model, protocol)
        if kind(meta) == "streaming":
            instead = alternative(client, model, protocol)
            raise TritonHFError(f"{model} is a stream model (it answers piece by piece): add --stream{instead}")
        shape = [len(prompts) if d == -1 else d for d in prompt_shape(meta)]
        if math.prod(shape) != len(prompts):
            raise TritonHFError(f"model {model} does not batch: send one prompt at a time")
        data = np.array([p.encode("utf-8") for p in prompts], dtype=object).reshape(shape)
        prompt = module.InferInput("prompt", shape, "BYTES")
        prompt.set_data_from_numpy(data)
        result = client.infer(model, [prompt], parameters=dict(parameters or {}) or None)
        return {output["name"]: result.as_numpy(output["name"]) for output in meta["outputs"]}
    except module.InferenceServerException as err:
        raise TritonHFError(f"{model}: {err.message()}") from None
    except OSError as err:  # the HTTP client's connection errors
        raise TritonHFError(f"cannot reach the server at {url or DEFAULT_URLS[protocol]}: {err}") from None
    finally:
        client.close()


def stream(
    model: str, prompt: str, url: str | None = None, parameters: Mapping[str, Any] | None = None, timeout: float = 300
) -> Iterator[tuple[str, int]]:
    """One prompt to a decoupled (streaming) model over gRPC: (piece of text, new tokens in it) as they arrive.

    Leaving the loop early cancels the request on the server, which frees its slot. A model that does not stream
    is refused here, before anything is sent: Triton 2.51 refuses such a request on a gRPC stream, but then holds
    the model until its exit timeout runs out at the next stop.
    """
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url or DEFAULT_URLS["grpc"])
    try:
        if kind(metadata(client, model, "grpc")) != "streaming":
            raise TritonHFError(f"{model} is not a stream model: drop --stream{alternative(client, model, 'grpc')}")
    except grpc.InferenceServerException as err:
        client.close()
        raise TritonHFError(f"{model}: {err.message()}") from None
    except BaseException:
        client.close()
        raise
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    finished = False
    try:
        tensor = grpc.InferInput("prompt", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=object))
        client.async_stream_infer(model, [tensor], parameters=dict(parameters or {}) or None)
        while not finished:
            try:
                result, error = answers.get(timeout=timeout)
            except queue.Empty:
                raise TritonHFError(f"{model}: no answer within {timeout:.0f} s") from None
            if error:
                raise TritonHFError(f"{model}: {error.message() if hasattr(error, 'message') else error}")
            finished = result.get_response().parameters["triton_final_response"].bool_param
            yield result.as_numpy("text")[0].decode("utf-8"), int(result.as_numpy("new_tokens")[0])
    except grpc.InferenceServerException as err:
        raise TritonHFError(f"cannot stream from {model} at {url or DEFAULT_URLS['grpc']}: {err.message()}") from None
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()


Kind = Literal["batched", "streaming", "one at a time"]
ANSWERS = {"text", "label", "embedding"}  # the tutorial's outputs, and the embedders'
HOW = {
    "batched": "--prompt, repeated for more rows in one request",
    "streaming": "--stream (gRPC), one --prompt at a time",
    "one at a time": "one --prompt per request",
}


def metadata(client: Any, model: str, protocol: str) -> dict[str, Any]:
    """The model's metadata (open to every client); an unknown name is answered with the served names close to it."""
    module = client_module(protocol)
    try:
        return client.get_model_metadata(model, **({"as_json": True} if protocol == "grpc" else {}))
    except module.InferenceServerException as err:
        if "unknown model" not in err.message():
            raise
        names = served(client, protocol)
        close = list(dict.fromkeys([*(n for n in names if model in n), *difflib.get_close_matches(model, names)]))[:4]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TritonHFError(f"no model named {model} is served{hint} (tritonhf client --list names them all)") from None


def prompt_shape(meta: Mapping[str, Any]) -> list[int]:
    return next([int(d) for d in tensor["shape"]] for tensor in meta["inputs"] if tensor["name"] == "prompt")


def kind(meta: Mapping[str, Any]) -> Kind:
    """How a model is called, from its metadata: a batched model's ``prompt`` has the batch axis (-1); of the
    unbatched ones, tritonhf's stream models answer ``new_tokens`` too (the tutorial's baseline answers ``text``)."""
    if prompt_shape(meta)[0] == -1:
        return "batched"
    return "streaming" if any(output["name"] == "new_tokens" for output in meta["outputs"]) else "one at a time"


def served(client: Any, protocol: str) -> list[str]:
    """Every loaded model's name, from the statistics API (open, read-only, unlike the repository index)."""
    stats = client.get_inference_statistics(**({"as_json": True} if protocol == "grpc" else {}))
    return sorted({entry["name"] for entry in stats.get("model_stats", [])})


def alternative(client: Any, model: str, protocol: str) -> str:
    """', or use <the other variant>' where the server has it: gpt2 <-> gpt2_stream."""
    stream = next(variant for variant in VARIANTS.values() if variant.streams).served_name("")  # the suffix
    other = model.removesuffix(stream) if model.endswith(stream) else model + stream
    return f", or use {other}" if other in served(client, protocol) else ""


def listing(url: str | None = None, protocol: str = "http") -> list[tuple[str, Kind, list[str]]]:
    """Every model a client calls, i.e. that answers a ``prompt`` with text, a label or an embedding (an ensemble's
    inner steps answer tensors): (name, how it is called, its outputs)."""
    client = client_module(protocol).InferenceServerClient(url or DEFAULT_URLS[protocol])
    try:
        rows = []
        for name in served(client, protocol):
            meta = metadata(client, name, protocol)
            outputs = [output["name"] for output in meta["outputs"]]
            if ANSWERS & set(outputs) and any(tensor["name"] == "prompt" for tensor in meta["inputs"]):
                rows.append((name, kind(meta), outputs))
        return rows
    except OSError as err:
        raise TritonHFError(f"cannot reach the server at {url or DEFAULT_URLS[protocol]}: {err}") from None
    finally:
        client.close()


def parameter(value: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as JSON where it is JSON (16, 0.7, true) and as a string otherwise."""
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


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
    parser.add_argument("-m", "--model", help="model name in the repository (--list names them)")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for several rows in one request")
    parser.add_argument("--list", action="store_true", help="list the served models and how each is called")
    parser.add_argument("-i", "--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--url", help="server address (default: localhost:8000 for http, localhost:8001 for grpc)")
    parser.add_argument(
        "--param",
        type=parameter,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a request parameter, e.g. max_new_tokens=32; repeat for more",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="stream from a <name>_stream model, printing text as it arrives; always gRPC (--url: the gRPC address)",
    )


def run(args: argparse.Namespace) -> dict[str, np.ndarray] | None:
    if args.list:
        rows = listing(args.url, args.protocol)
        width = max((len(name) for name, _, _ in rows), default=0)
        for name, how, outputs in rows:
            print(f"{name:<{width}}  {how:<13}  {', '.join(outputs):<16}  {HOW[how]}")
        return None
    if not args.model or not args.prompt:
        raise TritonHFError("give a model (-m NAME) and --prompt TEXT, or --list to see the served models")
    parameters = dict(args.param)
    if not args.stream:
        outputs = infer(args.model, args.prompt, args.url, args.protocol, parameters)
        print(table(outputs))
        return outputs
    for prompt in args.prompt:
        tokens = 0
        for piece, new_tokens in stream(args.model, prompt, args.url, parameters):
            print(piece, end="", flush=True)
            tokens += new_tokens
        print()
        print(f"[{tokens} new tokens]", file=sys.stderr)
    return None
