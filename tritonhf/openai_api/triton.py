"""The frontend's one way to the server: Triton's gRPC API (``tritonclient.grpc.aio``), asynchronous.

The frontend holds no key to Triton's admin APIs (server.RESTRICTED), so it
reads what the server serves from what every client may read: the loaded
models from the statistics API, what each is from its metadata, kept for a few
seconds. A generation model is ``<name>_stream`` with the generation outputs,
served as ``<name>``; an embedding model is a batched model with an
``embedding`` output. Every choice of a completion is one request on a gRPC
stream of its own to the ``_stream`` model, so that it joins the continuous
batch; leaving its iterator early cancels it on the server, which frees its
slot at the next step.

Errors: a response on a gRPC stream carries a message and no status code, so
the server's refusals are told apart by their words (the model's:
backends/python_hf/scheduler.py; Triton's: its queue and model lifecycle); a
plain ``infer`` has the status code too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from tritonhf.backends.python_hf.heads import Piece

from .protocol import APIError

logger = logging.getLogger(__name__)
STREAM_SUFFIX = "_stream"
MODELS_TTL_S = 2.0
WATCH_S = 0.5  # how long a choice waits for its next piece before it asks whether its model is still up
RETRY_AFTER_S = 1.0
# What the server writes when it refuses for a while (429: the same request may succeed later), when a model is
# not being served at the moment (503: its process died, or it is unloaded or loading: supervisor.py heals it), and
# when the model failed (500).
BUSY = ("overloaded:", "Exceeds maximum queue size", "Max queue size exceeded")
GONE = (
    "the model is unloading", "has no available versions", "is not found", "unknown model", "is not ready",
    "is not healthy",
)  # fmt: skip
FAULTS = ("generation failed:", "could not start:", "could not send:", "inference failed:")
CANCELLED = "request cancelled"
BATCH_LIMIT = re.compile(r"batch-size must be <= (\d+)")


@dataclass(frozen=True)
class Served:
    """A model the OpenAI API serves: what clients call, what it is, and the Triton model behind it."""

    name: str
    kind: Literal["generation", "embedding"]
    target: str
    created: int


class ClientGoneError(Exception):
    """The request's client went away (the model says it was cancelled, or the connection closed)."""


class TooBigError(Exception):
    """More rows in one request than the model's max_batch_size, ``most``."""

    def __init__(self, most: int) -> None:
        super().__init__(most)
        self.most = most


def error_for(message: str, status: str | None, model: str) -> Exception:
    """An error from the server, as the API reports it (status: the gRPC status, where there is one)."""
    if message.startswith(CANCELLED):
        return ClientGoneError(message)
    gone = any(word in message for word in GONE)
    if any(word in message for word in BUSY) or (status == "StatusCode.UNAVAILABLE" and not gone):
        return APIError(429, f"{model} is at capacity: {message}", code="model_overloaded", retry_after=RETRY_AFTER_S)
    if gone or status == "StatusCode.NOT_FOUND":
        return APIError(503, f"{model} is not being served at the moment; try again shortly", code="model_unavailable")
    if status == "StatusCode.INVALID_ARGUMENT" or (status is None and not any(word in message for word in FAULTS)):
        return APIError(400, message)
    logger.error("%s failed: %s (%s)", model, message, status)
    return APIError(500, f"{model} failed to answer; the server's log has the details", code="internal_error")


class Triton:
    """The server behind the frontend. ``connect`` in the event loop that will use it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.served: dict[str, Served] = {}  # every model seen, by the name clients call
        self.loaded: set[str] = set()  # the Triton models loaded at the last look
        self.read_at = -MODELS_TTL_S
        self.batch_sizes: dict[str, int] = {}  # embedders' max_batch_size, once learnt
        self.ids = itertools.count()

    async def connect(self) -> None:
        self.client = grpcclient.InferenceServerClient(self.url)
        self.lock = asyncio.Lock()

    async def close(self) -> None:
        await self.client.close()

    async def ready(self) -> bool:
        try:
            return await self.client.is_server_ready(client_timeout=1.0)
        except InferenceServerException:
            return False

    async def models(self) -> dict[str, Served]:
        """The served models, read again when older than MODELS_TTL_S; a model seen once keeps its place while it
        is reloaded."""
        async with self.lock:
            if time.monotonic() - self.read_at > MODELS_TTL_S:
                try:
                    stats = await self.client.get_inference_statistics(as_json=True, client_timeout=5.0)
                except InferenceServerException as err:
                    message = f"the server does not answer: {err.message()}"
                    raise APIError(503, message, code="server_unavailable") from None
                self.loaded = {entry["name"] for entry in stats.get("model_stats", [])}
                for target in sorted(self.loaded - {served.target for served in self.served.values()}):
                    if served := await self.classify(target):
                        self.served[served.name] = served
                self.read_at = time.monotonic()
            return dict(self.served)

    async def classify(self, target: str) -> Served | None:
        try:
            metadata = await self.client.get_model_metadata(target, as_json=True, client_timeout=5.0)
        except InferenceServerException:
            return None  # unloaded in between: read at the next look
        outputs = {output["name"] for output in metadata.get("outputs", [])}
        shapes = {entry["name"]: entry["shape"] for entry in metadata.get("inputs", [])}
        created = int(time.time())
        if {"text", "new_tokens", "finish_reason"} <= outputs and target.endswith(STREAM_SUFFIX):
            return Served(target.removesuffix(STREAM_SUFFIX), "generation", target, created)
        if {"embedding", "tokens"} <= outputs and shapes.get("prompt", [])[:1] == ["-1"]:  # batched: rows
            return Served(target, "embedding", target, created)
        return None

    async def model(self, name: str, kind: str) -> Served:
        """The served model a request names, of the kind its endpoint needs: 404 otherwise, 503 while it is down."""
        served = (await self.models()).get(name)
        if served is None or served.kind != kind:
            raise APIError(
                404, f"the model {name!r} does not exist or is not a {kind} model", "model", "model_not_found"
            )
        if served.target not in self.loaded:
            raise error_for("is not ready", None, name)
        return served

    async def generate(
        self, served: Served, prompt: str, parameters: Mapping[str, Any], stop: list[str]
    ) -> AsyncIterator[Piece]:
        """One choice, streamed: its pieces as the model sends them. Leaving early cancels it on the server.
        Stop strings go as the model's ``stop`` input tensor (a request parameter holds one value only)."""
        inputs = [text_input("prompt", [prompt])]
        if stop:
            inputs.append(text_input("stop", stop))

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": served.target,
                "inputs": inputs,
                "parameters": dict(parameters),
                "request_id": str(next(self.ids)),
            }

        responses = self.client.stream_infer(requests())
        try:
            while True:
                result, error = await self.next_answer(responses, served)
                if error is not None:
                    raise error_for(error.message(), None, served.name)
                final = result.get_response().parameters["triton_final_response"].bool_param
                finish = result.as_numpy("finish_reason")[0].decode()
                text = result.as_numpy("text")[0].decode("utf-8")
                tokens, prompt_tokens = (int(result.as_numpy(name)[0]) for name in ("new_tokens", "prompt_tokens"))
                yield Piece(text, tokens, prompt_tokens, finish or None)
                if final:
                    return
        except InferenceServerException as err:
            raise error_for(err.message(), err.status(), served.name) from None
        finally:
            responses.cancel()

    async def next_answer(self, responses: Any, served: Served) -> tuple[Any, Any]:
        """The stream's next response. While none comes, the model is asked every WATCH_S whether it is still
        loaded: a request in flight when its model's process dies is never answered (Triton 2.51), so a model
        found down (being healed) ends the choice with a 503 instead of leaving its client waiting."""
        reading = asyncio.ensure_future(anext(responses))
        try:
            while not (await asyncio.wait({reading}, timeout=WATCH_S))[0]:
                try:
                    alive = await self.client.is_model_ready(served.target, client_timeout=WATCH_S)
                except InferenceServerException:
                    alive = False
                if not alive:
                    raise error_for("is not ready", None, served.name)
            return reading.result()
        except StopAsyncIteration:
            raise APIError(500, f"{served.name}'s stream ended without its last answer") from None
        finally:
            if not reading.done():
                reading.cancel()

    async def embed(
        self, served: Served, texts: list[str], parameters: Mapping[str, Any] | None = None
    ) -> tuple[np.ndarray, int]:
        """The texts' embeddings, as the rows of one request, or of several where they pass the model's batch size
        (learnt from the server's refusal, once: model configs are an admin API); and the tokens they took."""
        size = self.batch_sizes.get(served.target) or len(texts)
        parts = (self.infer(served, texts[i : i + size], parameters) for i in range(0, len(texts), size))
        try:
            answers = await asyncio.gather(*parts)
        except TooBigError as err:
            self.batch_sizes[served.target] = err.most
            return await self.embed(served, texts, parameters)
        return np.concatenate([embedding for embedding, _ in answers]), sum(tokens for _, tokens in answers)

    async def infer(
        self, served: Served, texts: list[str], parameters: Mapping[str, Any] | None = None
    ) -> tuple[np.ndarray, int]:
        try:
            inputs = [text_input("prompt", texts, rows=True)]
            result = await self.client.infer(served.target, inputs, parameters=dict(parameters or {}) or None)
        except InferenceServerException as err:
            if (most := BATCH_LIMIT.search(err.message() or "")) and int(most[1]) < len(texts):
                raise TooBigError(int(most[1])) from None
            raise error_for(err.message(), err.status(), served.name) from None
        return result.as_numpy("embedding"), int(result.as_numpy("tokens").sum())


def text_input(name: str, texts: list[str], rows: bool = False) -> grpcclient.InferInput:
    """A BYTES input: [n] (a stream's unbatched prompt, stop strings), or [n, 1] (``rows``: a batched prompt)."""
    array = np.array([text.encode("utf-8") for text in texts], dtype=object)
    array = array.reshape(-1, 1) if rows else array
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor
