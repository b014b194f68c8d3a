"""The OpenAI-compatible HTTP API: an ASGI app (FastAPI) in front of a running tritonserver.

    POST /v1/completions        POST /v1/chat/completions       (generation models, through ``<name>_stream``)
    POST /v1/embeddings         GET /v1/models[/{model}]
    GET  /health                GET /metrics                    (this frontend's own)

Every choice of a completion is one request to the model's ``_stream`` variant,
so streamed and whole answers come from the same continuous batch and decode
alike. A stream starts only once every choice has its first piece (or its
error): a request the model refuses gets its HTTP status, not a broken stream.
An error after that is an ``error`` event, and the stream ends. A client that
goes away cancels its choices on the server (their slots free at the next step).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from tritonhf.backends.python_hf.heads import Piece

from .protocol import MAX_CHOICES, APIError, ChatRequest, CompletionRequest, EmbeddingRequest, Sampling
from .triton import ClientGoneError, Served, Triton

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 << 20
CLIENT_GONE = 499  # nginx's status for a client that closed the connection: logged, never seen by the client
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # the model's reasons, in OpenAI's words
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
T = TypeVar("T")


class Metrics:
    """The frontend's own Prometheus metrics (Triton's are on its metrics port)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tritonhf_openai_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "tritonhf_openai_time_to_first_token_seconds", "Request to the first generated text, per choice",
            buckets=SECONDS, registry=self.registry,
        )  # fmt: skip
        self.itl = Histogram(
            "tritonhf_openai_inter_token_latency_seconds", "Time between generated tokens, per choice",
            buckets=SECONDS, registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "tritonhf_openai_request_duration_seconds", "Whole request, by endpoint", ["endpoint"],
            buckets=SECONDS, registry=self.registry,
        )  # fmt: skip


ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models")


class Counted:
    """Requests by endpoint and status, and how long they took, as plain ASGI (FastAPI's http middleware would sit
    in the way of every streamed chunk). Paths outside the API count as ``other``: no label from a client's whim."""

    def __init__(self, app: Callable, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), 500

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"]
            endpoint = (
                path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
            )
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)


@dataclass
class Choice:
    """One choice as it is generated: its text so far, its tokens, why it ended."""

    index: int
    prompt_index: int
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    finish: str | None = None
    started: float = field(default_factory=time.monotonic)
    last: float | None = None

    def add(self, piece: Piece, metrics: Metrics) -> None:
        now = time.monotonic()
        if piece.new_tokens:
            if self.last is None:
                metrics.ttft.observe(now - self.started)
            else:
                for _ in range(piece.new_tokens):
                    metrics.itl.observe((now - self.last) / piece.new_tokens)
            self.last = now
        self.text += piece.text
        self.tokens += piece.new_tokens
        self.prompt_tokens = piece.prompt_tokens
        self.finish = FINISH.get(piece.finish or "", piece.finish)


def usage(choices: list[Choice]) -> dict[str, int]:
    """Each prompt counted once, however many choices it has; every choice's tokens."""
    prompt = sum({c.prompt_index: c.prompt_tokens for c in choices}.values())
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": f"{err.retry_after:.0f}"} if err.retry_after is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def sse(data: Any, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def read_body(request: Request) -> bytes:
    """The body, refused (413) past MAX_BODY_BYTES, declared or not."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    return bytes(body)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``, cancelled if the client goes away first (then ClientGoneError)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGoneError("the client went away")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class Generation:
    """One completion or chat request: its choices streamed from the model, merged as they come."""

    def __init__(self, triton: Triton, served: Served, request: Sampling, prompts: list[str], metrics: Metrics) -> None:
        self.choices = [Choice(p * request.n + j, p) for p in range(len(prompts)) for j in range(request.n)]
        self.streams = [
            triton.generate(served, prompts[c.prompt_index], request.parameters(c.index), request.stops())
            for c in self.choices
        ]
        self.metrics = metrics
        self.queue: asyncio.Queue[tuple[int, Piece | BaseException | None]] = asyncio.Queue()
        self.tasks: list[asyncio.Future] = []

    async def start(self) -> list[Piece]:
        """Every choice's first piece, or the first error any choice meets (then the caller closes)."""

        async def first(stream: AsyncIterator[Piece]) -> Piece:
            try:
                return await anext(stream)
            except StopAsyncIteration:  # the model always sends a final piece: an empty stream is a fault
                raise APIError(500, "a choice ended without an answer") from None

        self.tasks = [asyncio.ensure_future(first(stream)) for stream in self.streams]
        firsts = await asyncio.gather(*self.tasks)
        self.tasks = [
            asyncio.ensure_future(self.pump(i, stream))
            for i, (stream, piece) in enumerate(zip(self.streams, firsts))
            if not piece.final
        ]
        return firsts

    async def pump(self, index: int, stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                await self.queue.put((index, piece))
        except Exception as err:  # noqa: BLE001 - handed to the reader, who answers with it
            await self.queue.put((index, err))
        await self.queue.put((index, None))

    async def pieces(self, firsts: list[Piece]) -> AsyncIterator[tuple[int, Piece]]:
        """Every piece, the first ones first, then in the order they come; a choice's error raised."""
        for index, piece in enumerate(firsts):
            yield index, piece
        running = len(self.tasks)
        while running:
            index, item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item

    async def whole(self) -> list[Choice]:
        async for index, piece in self.pieces(await self.start()):
            self.choices[index].add(piece, self.metrics)
        return self.choices

    async def close(self) -> None:
        """Every choice stopped: a choice still generating is cancelled on the server."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for stream in self.streams:
            with contextlib.suppress(Exception):
                await stream.aclose()


def create_app(url: str) -> FastAPI:
    """The API in front of the tritonserver whose gRPC endpoint is ``url`` (HOST:PORT)."""
    metrics = Metrics()
    triton = Triton(url)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await triton.connect()  # the gRPC channel belongs to the server's event loop
        yield
        await triton.close()

    app = FastAPI(title="tritonhf OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)

    app.add_middleware(Counted, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(Exception)
    async def fault(request: Request, err: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(
            APIError(500, "internal error; the frontend's log has the details", code="internal_error")
        )

    @app.get("/health")
    async def health() -> Response:
        ok = await triton.ready()
        return JSONResponse({"ok": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def card(served: Served) -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "tritonhf"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(s) for _, s in sorted((await triton.models()).items())]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if (served := (await triton.models()).get(name)) is None:
            raise APIError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return card(served)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = CompletionRequest.parse(await read_body(request))
        assert isinstance(body, CompletionRequest)
        return await generate(request, body, body.prompts(), "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = ChatRequest.parse(await read_body(request))
        assert isinstance(body, ChatRequest)
        return await generate(request, body, [body.chat()], "chat.completion", "chatcmpl")

    async def generate(request: Request, body: Sampling, prompts: list[str], kind: str, prefix: str) -> Response:
        served = await triton.model(body.model, "generation")
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"n x prompts must be at most {MAX_CHOICES}, got {len(prompts) * body.n}", "n")
        run = Generation(triton, served, body, prompts, metrics)
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": body.model}
        chat = kind == "chat.completion"
        if not body.stream:
            try:
                choices = await unless_disconnected(request, run.whole())
            except ClientGoneError:
                return Response(status_code=CLIENT_GONE)
            finally:
                await run.close()
            return JSONResponse({**head, "choices": [answer(c, chat) for c in choices], "usage": usage(choices)})
        try:
            firsts = await unless_disconnected(request, run.start())
        except ClientGoneError:
            await run.close()
            return Response(status_code=CLIENT_GONE)
        except BaseException:
            await run.close()
            raise
        return StreamingResponse(
            events(run, firsts, {**head, "object": f"{kind}.chunk" if chat else kind}, chat, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def events(
        run: Generation, firsts: list[Piece], head: dict, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        extra = {"usage": None} if include_usage else {}
        try:
            if chat:
                for choice in run.choices:
                    role = {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    yield sse({**head, "choices": [{**role, "finish_reason": None}], **extra})
            async for index, piece in run.pieces(firsts):
                choice = run.choices[index]
                choice.add(piece, run.metrics)
                if not piece.text and not piece.final:
                    continue
                yield sse({**head, "choices": [delta(choice, piece, chat)], **extra})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(run.choices)})
            yield "data: [DONE]\n\n"
        except ClientGoneError:
            return
        except APIError as err:
            yield sse(err.body(), event="error")
        except Exception:
            logger.exception("a stream failed")
            yield sse(APIError(500, "internal error; the frontend's log has the details").body(), event="error")
        finally:
            await run.close()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = EmbeddingRequest.parse(await read_body(request))
        assert isinstance(body, EmbeddingRequest)
        served = await triton.model(body.model, "embedding")
        vectors, tokens = await triton.embed(served, body.inputs(), body.parameters())
        if body.dimensions is not None:
            if body.dimensions > vectors.shape[1]:
                raise APIError(400, f"dimensions: at most {vectors.shape[1]} for {body.model}", "dimensions")
            vectors = vectors[:, : body.dimensions]
            vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        data = [
            {"object": "embedding", "index": i, "embedding": encode(v.astype(np.float32), body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return app


def answer(choice: Choice, chat: bool) -> dict[str, Any]:
    text = {"message": {"role": "assistant", "content": choice.text}} if chat else {"text": choice.text}
    return {"index": choice.index, **text, "logprobs": None, "finish_reason": choice.finish}


def delta(choice: Choice, piece: Piece, chat: bool) -> dict[str, Any]:
    text = {"delta": {"content": piece.text} if piece.text else {}} if chat else {"text": piece.text}
    return {"index": choice.index, **text, "logprobs": None, "finish_reason": choice.finish if piece.final else None}


def encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    """float: a JSON list; base64: the little-endian float32 bytes, as OpenAI sends them."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode() if encoding == "base64" else vector.tolist()
