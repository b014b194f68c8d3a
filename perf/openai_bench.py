"""``make bench-openai``: aiperf against the OpenAI API, and the same workload straight to Triton over gRPC, in one run.

    python -m tritonhf.perf.openai_bench --aiperf .venv-aiperf/bin/aiperf

aiperf (its own virtual environment: it conflicts with this project's pins) drives
the frontend: streamed chat and completions at concurrency 1, 8 and 32 (the
prompts of perf/prompts.json, 64 new tokens each: ``max_tokens`` and vLLM's
``min_tokens``, so that every answer is as long on both sides), and embeddings at
1 and 32. Then the same payloads (aiperf's own ``inputs.json``), at the same
concurrency, from a light client twice: to the frontend over HTTP (aiohttp), and
straight to Triton over gRPC, each payload read as the frontend reads it (same
model parameters) and sent to ``<name>_stream`` over a gRPC stream
(tritonclient.grpc.aio) or to the embedder's ``infer``. aiperf takes about a core
of its own, which on a small machine is CPU the server does not get, so the goals
compare the two light clients. Figures: time to first token and inter-token
latency (aiperf's definition: the request's time after its first token over its
other tokens), request latency p50 / p99, output tokens/s, requests/s, and each
load generator's CPU time. Goals (issue #21): the frontend keeps >= 90% of the
native tokens/s and adds <= 5 ms to the time to first token at concurrency 1;
embeddings >= 90% of the native requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import resource
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from tritonhf.backends.python_hf.hardware import cpu_count, cpu_model
from tritonhf.demo import minilm
from tritonhf.openai_api.process import Frontend
from tritonhf.openai_api.protocol import ChatRequest, CompletionRequest, EmbeddingRequest
from tritonhf.openai_api.triton import Triton
from tritonhf.perf.analyzer import prompts
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import runs_this_backend
from tritonhf.server import TritonServer, free_port
from tritonhf.standins import write_standins

GENERATOR, EMBEDDER = "gpt2", "all-MiniLM-L6-v2"
NEW_TOKENS = 64
CELLS = [("chat", 1), ("chat", 8), ("chat", 32), ("completions", 1), ("completions", 8), ("completions", 32)]
CELLS += [("embeddings", 1), ("embeddings", 32)]
REQUESTS = {"chat": (16, 3), "completions": (16, 3), "embeddings": (64, 8)}  # at least, and per concurrency slot
TTFT_ADDED_MS, KEPT = 5.0, 0.90


@dataclass
class Figures:
    """One side of one cell."""

    ttft_ms: tuple[float, float] = (0.0, 0.0)  # p50, p99
    itl_ms: tuple[float, float] = (0.0, 0.0)
    latency_ms: tuple[float, float] = (0.0, 0.0)
    tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    client_cpu_s: float = 0.0  # what the load generator itself took of the machine's CPUs


def repository(workdir: Path, size: str) -> Path:
    """gpt2 (its stream) and all-MiniLM-L6-v2, built into the workdir, again once the generic model has changed."""
    path = workdir / f"repo-{size}"
    if not runs_this_backend(path):
        standins = write_standins(workdir / f"standins-{size}", size)
        entries = plan([str(standins[GENERATOR])], [], [str(minilm(workdir / f"standins-{size}"))], NEW_TOKENS)
        build(entries, BuildOptions(output=path, variants=("python", "stream"), gate_for="this-host"))
    return path


def aiperf(binary: str, url: str, endpoint: str, concurrency: int, tokenizer: Path, work: Path) -> Figures:
    """One aiperf run against the frontend; its payloads stay in ``work/inputs.json``."""
    work.mkdir(parents=True, exist_ok=True)
    inputs = work / "prompts.jsonl"
    inputs.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts()))
    least, each = REQUESTS[endpoint]
    command = [
        binary, "profile", "-m", EMBEDDER if endpoint == "embeddings" else GENERATOR, "--url", url,
        "--endpoint-type", endpoint, "--concurrency", str(concurrency),
        "--request-count", str(max(least, each * concurrency)), "--warmup-request-count", str(concurrency),
        "--input-file", str(inputs), "--custom-dataset-type", "single_turn", "--tokenizer", str(tokenizer),
        "--artifact-dir", str(work), "--ui-type", "none", "--random-seed", "0",
        "--workers-max", "1", "--record-processors", "1", "--no-server-metrics", "--no-gpu-telemetry",
    ]  # fmt: skip
    if endpoint != "embeddings":
        command += ["--streaming", "--use-server-token-count", "--output-tokens-mean", str(NEW_TOKENS)]
        command += ["--output-tokens-stddev", "0", "--extra-inputs", f"min_tokens:{NEW_TOKENS}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"aiperf failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    export = json.loads((work / "profile_export_aiperf.json").read_text())

    def pair(name: str) -> tuple[float, float]:
        metric = export.get(name) or {}
        return (metric.get("p50", 0.0), metric.get("p99", 0.0))

    return Figures(
        ttft_ms=pair("time_to_first_token"),
        itl_ms=pair("inter_token_latency"),
        latency_ms=pair("request_latency"),
        tokens_per_s=(export.get("output_token_throughput") or {}).get("avg", 0.0),
        requests_per_s=(export.get("request_throughput") or {}).get("avg", 0.0),
        client_cpu_s=after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    )


def payloads(work: Path) -> list[dict[str, Any]]:
    return [turn for session in json.loads((work / "inputs.json").read_text())["data"] for turn in session["payloads"]]


Record = tuple[float, float | None, float, int]  # start, first text, end, new tokens
Send = Callable[[dict], Awaitable[Record]]


async def native(url: str, endpoint: str, concurrency: int, work: Path) -> Figures:
    """aiperf's payloads straight to Triton over gRPC: each read as the frontend reads it, sent as it sends it."""
    triton = Triton(url)
    await triton.connect()

    async def send(payload: dict) -> Record:
        start = time.perf_counter()
        if endpoint == "embeddings":
            request = EmbeddingRequest.parse(json.dumps(payload).encode())
            await triton.embed(await triton.model(request.model, "embedding"), request.inputs(), request.parameters())
            return start, None, time.perf_counter(), 0
        if endpoint == "chat":
            request = ChatRequest.parse(json.dumps(payload).encode())
            prompt = request.chat()
        else:
            request = CompletionRequest.parse(json.dumps(payload).encode())
            [prompt] = request.prompts()
        served = await triton.model(request.model, "generation")
        first, tokens = None, 0
        async for piece in triton.generate(served, prompt, request.parameters(0), request.stops()):
            if piece.text and first is None:  # aiperf's first token: the first piece with text
                first = time.perf_counter()
            tokens += piece.new_tokens
        return start, first, time.perf_counter(), tokens

    try:
        return await timed(send, endpoint, payloads(work), concurrency)
    finally:
        await triton.close()


async def over_http(url: str, endpoint: str, concurrency: int, work: Path) -> Figures:
    """aiperf's payloads to the frontend from a client as light as the native one (aiohttp, one session): the
    frontend's own cost, apart from aiperf's, which on a small machine takes CPU from the server."""
    path = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}[endpoint]
    async with aiohttp.ClientSession() as session:

        async def send(payload: dict) -> Record:
            start, first, tokens = time.perf_counter(), None, 0
            async with session.post(url + path, json=payload) as response:
                response.raise_for_status()
                if endpoint == "embeddings":
                    await response.read()
                    return start, None, time.perf_counter(), 0
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[len(b"data: ") :])
                    for choice in chunk.get("choices") or ():
                        if first is None and (choice.get("text") or choice.get("delta", {}).get("content")):
                            first = time.perf_counter()
                    tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            return start, first, time.perf_counter(), tokens

        return await timed(send, endpoint, payloads(work), concurrency)


async def timed(send: Send, endpoint: str, requests: list[dict], concurrency: int) -> Figures:
    """The payloads at ``concurrency``, a warm-up of one round first (as aiperf's); this process's CPU time too."""
    await run_all(send, endpoint, requests[:concurrency], concurrency)
    cpu = time.process_time()
    figures = await run_all(send, endpoint, requests, concurrency)
    return dataclasses.replace(figures, client_cpu_s=time.process_time() - cpu)


async def run_all(send: Send, endpoint: str, requests: list[dict], concurrency: int) -> Figures:
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    records: list[Record] = []

    async def worker() -> None:
        while not queue.empty():
            records.append(await send(queue.get_nowait()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latency = [1e3 * (end - start) for start, _, end, _ in records]
    if endpoint == "embeddings":
        return Figures(latency_ms=percentiles(latency), requests_per_s=len(records) / wall)
    ttft = [1e3 * (first - start) for start, first, _, _ in records if first is not None]
    itl = [1e3 * (end - first) / (n - 1) for _, first, end, n in records if first is not None and n > 1]
    tokens_per_s = sum(record[3] for record in records) / wall
    return Figures(percentiles(ttft), percentiles(itl), percentiles(latency), tokens_per_s, len(records) / wall)


def percentiles(values: list[float]) -> tuple[float, float]:
    return (float(np.percentile(values, 50)), float(np.percentile(values, 99))) if values else (0.0, 0.0)


SIDES = {
    "aiperf": "aiperf -> the OpenAI API",
    "http": "a light client (aiohttp) -> the OpenAI API",
    "native": "the same light client over gRPC -> Triton",
}


def report(rows: list[tuple[str, int, dict[str, Figures]]], size: str, seconds: float) -> str:
    lines = [
        f"# The OpenAI API against Triton's gRPC, one run ({date.today()})",
        "",
        (
            f"CPU: {cpu_model()}, {cpu_count()} cores ({platform.machine()}); {size} stand-ins: {GENERATOR}"
            f" ({NEW_TOKENS} new tokens a request, the prompts of perf/prompts.json) and {EMBEDDER}."
        ),
        (
            f"`python -m tritonhf.perf.openai_bench` took {seconds:.0f} s. Each cell, one after the other, the same"
            " payloads (aiperf's) at the same concurrency:"
        ),
        "",
        *(f"- {side}: {what}" for side, what in SIDES.items()),
        "",
        "Every load generator runs on the same CPUs as the server; `client CPU s` is what it took of them (aiperf:",
        "its whole process tree, warm-up included). The goals compare the two light clients, so that they measure",
        "the frontend and not the load generator.",
        "",
        (
            "| endpoint | c | side | TTFT p50 / p99 ms | ITL p50 / p99 ms | latency p50 / p99 ms | tokens/s | req/s"
            " | client CPU s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for endpoint, concurrency, sides in rows:
        streamed = endpoint != "embeddings"  # an embedding has no first token, no token stream
        for side, f in sides.items():
            cells = [
                f"{f.ttft_ms[0]:.1f} / {f.ttft_ms[1]:.1f}" if streamed else "-",
                f"{f.itl_ms[0]:.1f} / {f.itl_ms[1]:.1f}" if streamed else "-",
                f"{f.latency_ms[0]:.1f} / {f.latency_ms[1]:.1f}",
                f"{f.tokens_per_s:.1f}" if streamed else "-",
                f"{f.requests_per_s:.1f}",
                f"{f.client_cpu_s:.1f}",
            ]
            lines.append(f"| {endpoint} | {concurrency} | {side} | " + " | ".join(cells) + " |")
    lines += ["", "Goals (http against native):"]
    for endpoint, concurrency, sides in rows:
        front, back = sides["http"], sides["native"]
        if endpoint == "embeddings":
            kept = front.requests_per_s / max(back.requests_per_s, 1e-9)
            lines.append(f"- embeddings c{concurrency}: {kept:.0%} of native req/s ({verdict(kept >= KEPT)}, >= 90%)")
            continue
        kept = front.tokens_per_s / max(back.tokens_per_s, 1e-9)
        line = f"- {endpoint} c{concurrency}: {kept:.0%} of native tokens/s ({verdict(kept >= KEPT)}, >= 90%)"
        if concurrency == 1:
            added = front.ttft_ms[0] - back.ttft_ms[0]
            line += f"; TTFT p50 {added:+.1f} ms ({verdict(added <= TTFT_ADDED_MS)}, <= +{TTFT_ADDED_MS:.0f} ms)"
        lines.append(line)
    return "\n".join(lines) + "\n"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m tritonhf.perf.openai_bench")
    parser.add_argument("--aiperf", default=".venv-aiperf/bin/aiperf", help="aiperf, in its own venv")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="the stand-ins (default: full)")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/openai-bench"))
    parser.add_argument("--output", type=Path, default=Path(f"perf/reports/{date.today()}-cpu-openai.md"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    args.workdir.mkdir(parents=True, exist_ok=True)
    repo = repository(args.workdir, args.size)
    tokenizer = next((args.workdir / f"standins-{args.size}").glob(f"**/{GENERATOR}/tokenizer.json")).parent
    rows = []
    with TritonServer(repo) as server:
        frontend = Frontend(server.grpc_url, "127.0.0.1", free_port(), grace=5.0).start()
        try:
            if not frontend.wait_ready(60):
                raise RuntimeError("the OpenAI API did not start")
            for endpoint, concurrency in tqdm(CELLS, desc="aiperf, http, native", unit="cell"):
                work = args.workdir / f"{endpoint}-c{concurrency}"
                sides = {
                    "aiperf": aiperf(
                        args.aiperf, frontend.url.removesuffix("/v1"), endpoint, concurrency, tokenizer, work
                    )
                }
                sides["http"] = asyncio.run(over_http(frontend.url, endpoint, concurrency, work))
                sides["native"] = asyncio.run(native(server.grpc_url, endpoint, concurrency, work))
                rows.append((endpoint, concurrency, sides))
        finally:
            frontend.stop(timeout=10)
    text = report(rows, args.size, time.monotonic() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
