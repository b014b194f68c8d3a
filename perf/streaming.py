"""``make bench-streaming``: generation at the machine's limit (issue #22), static against stream, in one run.

    python -m tritonhf.perf.streaming

One server with gpt2 (the full-size stand-in) three ways: the static model
(``gpt2``, a dynamic batch decoded together), its stream in a padded running
batch (``gpt2_stream_padded``: the stream model with ``packed: false``, the
batch before packed steps) and its stream in packed steps with chunked
prefill (``gpt2_stream``). The mixed workload of perf/generation.py (each
request its own 8..64 new tokens) drives each of them: open loop, Poisson
arrivals at several rates, and closed loop at concurrency 32. Figures from
perf_analyzer's profile export: output tokens/s, time to first token and
inter-token latency p50 / p99. At concurrency 32 also the tutorial's model
(``gpt2_baseline``: one pipeline call at a time), each answer the workload's
mean length. The concurrency-32 pair the first goal compares, static and
packed, runs ``PAIRS`` times, interleaved (one such cell swung by a fifth
from run to run): the goal is the median of the pairs' ratios. Then, with
the server gone, the same workload through the
model's own scheduler in a process of its own (as a model instance is), at
the same threads and batch bound: what the server's decoding is measured
against.

Goals (issue #22): packed >= 1.5x static tokens/s at concurrency 32;
inter-token p99 <= 1.5x p50 under open-loop arrivals; packed >= 10x the
tutorial's tokens/s at concurrency 32; in-server >= 80% of in-process
tokens/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from tritonhf import model_config
from tritonhf.backends.python_hf.hardware import cpu_count, cpu_model
from tritonhf.backends.python_hf.heads import Piece
from tritonhf.backends.python_hf.packed import PackingModel, SlotCache, packed_step, seconds_of
from tritonhf.backends.python_hf.steps import load_step
from tritonhf.backends.python_hf.tasks import TextGeneration
from tritonhf.perf.analyzer import ANY_WINDOWS, PerfOptions, data_file, measure, prompts
from tritonhf.perf.generation import MIXED_TOKENS, mixed_data, percentile, profile_stats
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import runs_this_backend, seal
from tritonhf.server import TritonServer, find_installation
from tritonhf.standins import write_standins
from tritonhf.variants import BASELINE, PYTHON, STREAM

GENERATOR = "gpt2"
MODELS = {"static": "gpt2", "stream, padded": "gpt2_stream_padded", "stream, packed": "gpt2_stream"}
TUTORIAL, TUTORIAL_MODEL = "tutorial", BASELINE.served_name(GENERATOR)  # at concurrency 32 only: one at a time
TUTORIAL_TOKENS = sum(MIXED_TOKENS) // 2  # each of its answers: the mixed workload's mean
RATES = (1.0, 2.0, 4.0)  # requests/s, Poisson arrivals; about 36 new tokens a request
CONCURRENCY = 32
REQUESTS = 24  # a measurement window, in answers; three windows at least
KEPT, FASTER, STEADY, OVER_TUTORIAL = 0.80, 1.5, 1.5, 10.0
FLOOR_ROWS = 4  # rows of the identical steps timed for reference: about the running batch at 2 requests/s
PAIRS = 3  # static and packed at concurrency 32, interleaved: the first in the sweep, the others after it


def repository(workdir: Path) -> Path:
    """gpt2, its stream, the stream again with packed steps off, and the tutorial's model making the workload's
    mean of new tokens; built into the workdir, again once the generic model has changed."""
    path = workdir / "repo"
    if not runs_this_backend(path):
        standins = write_standins(workdir / "standins", "full")
        entries = plan([str(standins[GENERATOR])], [], [], MIXED_TOKENS[1])
        variants = (PYTHON.name, STREAM.name, BASELINE.name)
        build(entries, BuildOptions(output=path, variants=variants, gate_for="this-host"))
        padded = path / MODELS["stream, padded"]
        shutil.copytree(path / MODELS["stream, packed"], padded, symlinks=True)
        reconfigure(padded, name=padded.name, packed="false")
        reconfigure(path / TUTORIAL_MODEL, max_length=str(TUTORIAL_TOKENS), min_length=str(TUTORIAL_TOKENS))
        seal(path)
    return path


def reconfigure(model: Path, name: str | None = None, **parameters: str) -> None:
    config = model_config.read(model / "config.pbtxt")
    config["name"] = name or config["name"]
    config["parameters"].update({key: {"string_value": value} for key, value in parameters.items()})
    model_config.write(config, model)


@dataclass
class Cell:
    model: str
    load: str  # "c32" or "1 req/s"
    offered: float  # requests/s (open loop), or 0 for closed loop
    figures: dict[str, float | None]
    again: int = 0  # the concurrency-32 pair's repetitions (PAIRS): 0 in the sweep, then 1, 2...


def served(server: TritonServer, workdir: Path, data: Path) -> list[Cell]:
    cells = []
    loads = [(f"{rate:g} req/s", rate) for rate in RATES] + [(f"c{CONCURRENCY}", 0.0)]
    runs = [(name, label, rate, 0) for label, rate in loads for name in MODELS] + [(TUTORIAL, loads[-1][0], 0.0, 0)]
    runs += [(name, loads[-1][0], 0.0, again) for again in range(1, PAIRS) for name in ("static", "stream, packed")]
    plain = data_file(workdir / "prompts.json")  # the tutorial's interface: a prompt, nothing else
    for name, label, rate, again in tqdm(runs, desc="perf_analyzer", unit="cell"):
        model = MODELS.get(name, TUTORIAL_MODEL)
        stem = f"{model}.{label.replace(' ', '').replace('/', '-')}" + (f".again{again}" if again else "")
        whole = name in ("static", TUTORIAL)  # answers come whole; the rest stream
        options = PerfOptions(
            model, server.grpc_url, plain if name == TUTORIAL else data, CONCURRENCY, workdir / f"{stem}.csv",
            request_count=REQUESTS, streaming=not whole, profile_path=workdir / f"{stem}.profile.json",
            control_key=server.control_key, request_rate=rate,
        )  # fmt: skip
        measure(options, find_installation().env, relaxed_percent=ANY_WINDOWS)
        figures = profile_stats(options.profile_path)
        if name == TUTORIAL:  # its answers carry no token count: each is TUTORIAL_TOKENS long
            figures["output_tokens_per_s"] = figures["requests_per_s"] * TUTORIAL_TOKENS
        cells.append(Cell(name, label, rate, figures, again))
    return cells


class Counter:
    """An in-process stream: counts what it is sent."""

    def __init__(self) -> None:
        self.tokens, self.done = 0, threading.Event()

    def send(self, piece: Piece) -> None:
        self.tokens += piece.new_tokens
        if piece.final:
            self.done.set()

    def fail(self, message: str, kind: str) -> None:
        raise RuntimeError(message)

    def cancelled(self) -> bool:
        return False


@dataclass(frozen=True)
class Alone:
    """The stream model in a process of its own: its tokens/s at ``CONCURRENCY``, and the spread of identical
    decoding steps (``FLOOR_ROWS`` rows, back to back, forwards alone): the machine's own p99 / p50 in this run,
    a reference for the inter-token ratios (not a bound: they are measured at other moments)."""

    tokens_per_s: float
    floor: float


def in_process(repo: Path, requests: int = 3 * REQUESTS) -> Alone:
    """The mixed workload through the stream model's own scheduler, ``CONCURRENCY`` at a time, with the threads and
    limits of its config, in a process of its own as a model instance is; then the floor. (This one has built the
    repository: its threads have computed already, and their OpenMP teams would slow the scheduler's;
    hardware.on_a_thread_that_ends.)"""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as alone:
        return alone.submit(decoded, repo, requests).result()


def decoded(repo: Path, requests: int) -> Alone:
    model_dir = repo / MODELS["stream, packed"]
    model, context = load_step(model_config.read(model_dir / "config.pbtxt"), model_dir / "1")  # as the server does
    torch.set_num_threads(int(context.parameters["cpu_threads"]))  # this process's pools are already up
    return Alone(mixed_tokens_per_s(model, requests), step_spread(model))


def step_spread(model: PackingModel, steps: int = 400) -> float:
    """p99 / p50 of ``steps`` identical packed decoding steps of ``FLOOR_ROWS`` rows (the first 20 warm up)."""
    step = packed_step(model, SlotCache.reserve(model.cache_shapes(), FLOOR_ROWS + 1, 65, model.device), FLOOR_ROWS)
    seconds = [seconds_of(step, model.device) for _ in range(steps)][20:]
    return percentile(seconds, 0.99) / percentile(seconds, 0.5)


def mixed_tokens_per_s(model: TextGeneration, requests: int) -> float:
    rng, texts = random.Random(0), prompts()
    scheduler = model.scheduler()
    started, counters, sent = time.monotonic(), [], 0
    try:
        while sent < requests or not all(c.done.is_set() for c in counters):
            running = sum(not c.done.is_set() for c in counters)
            if sent < requests and running < CONCURRENCY:
                n = rng.randint(*MIXED_TOKENS)
                options = model.parse_options({"max_new_tokens": n, "min_new_tokens": n})
                counters.append(Counter())
                scheduler.submit(model.sequence(texts[sent % len(texts)], options, counters[-1]))
                sent += 1
            else:
                time.sleep(0.002)
    finally:
        scheduler.close()
    return sum(c.tokens for c in counters) / (time.monotonic() - started)


def report(cells: list[Cell], alone: Alone, seconds: float) -> str:
    lines = [
        f"# Generation at the machine's limit: static, stream padded, stream packed, one run ({date.today()})",
        "",
        (
            f"The tutorial's model answers {TUTORIAL_TOKENS} new tokens a request (the workload's mean), one request"
            " at a time; its time to first token is its whole answer."
        ),
        "",
        (
            f"CPU: {cpu_model()}, {cpu_count()} cores. gpt2 full-size stand-in, the mixed workload (each request"
            f" {MIXED_TOKENS[0]}..{MIXED_TOKENS[1]} new tokens); `python -m tritonhf.perf.streaming` took"
            f" {seconds:.0f} s."
        ),
        "",
        "| load | model | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | ITL p99 / p50 |",
        "|---|---|---|---|---|---|",
    ]
    for cell in cells:
        if cell.again:
            continue
        f = cell.figures
        itl = f"{f['itl_p50_ms']:.1f} / {f['itl_p99_ms']:.1f}" if f["itl_p50_ms"] else "-"
        spread = f"{f['itl_p99_ms'] / f['itl_p50_ms']:.2f}" if f["itl_p50_ms"] else "-"
        lines.append(
            f"| {cell.load} | {cell.model} | {f['output_tokens_per_s']:.1f} |"
            f" {f['ttft_p50_ms']:.0f} / {f['ttft_p99_ms']:.0f} | {itl} | {spread} |"
        )
    closed = {(cell.model, cell.again): cell.figures["output_tokens_per_s"] for cell in cells if not cell.offered}
    pairs = sorted(again for model, again in closed if model == "static")
    rounds = [(closed["stream, packed", again], closed["static", again]) for again in pairs]
    ratios = [packed / static for packed, static in rounds]
    packed = statistics.median(packed for packed, _ in rounds)
    tutorial = next(cell.figures for cell in cells if cell.model == TUTORIAL)["output_tokens_per_s"]
    faster = statistics.median(ratios)
    each = f", the median of {len(ratios)} interleaved pairs (packed / static tokens/s): " + ", ".join(
        f"{p / s:.2f} ({p:.1f} / {s:.1f})" for p, s in rounds
    )
    median = f" (packed: the median of its {len(rounds)})" if len(rounds) > 1 else ""
    lines += [
        "",
        "Goals:",
        (
            f"- packed / static tokens/s at c{CONCURRENCY}: {faster:.2f}x{each if len(ratios) > 1 else ''}"
            f" ({verdict(faster >= FASTER)}, >= {FASTER})"
        ),
    ]
    lines.append(
        f"- packed / tutorial tokens/s at c{CONCURRENCY}: {packed / tutorial:.1f}x{median}"
        f" ({verdict(packed / tutorial >= OVER_TUTORIAL)}, >= {OVER_TUTORIAL:g})"
    )
    for cell in cells:
        if cell.offered and cell.model == "stream, packed":
            spread = cell.figures["itl_p99_ms"] / cell.figures["itl_p50_ms"]
            lines.append(f"- ITL p99 / p50 at {cell.load}: {spread:.2f} ({verdict(spread <= STEADY)}, <= {STEADY})")
    lines.append(
        f"- for reference, this machine's own spread: identical {FLOOR_ROWS}-row decoding steps, back to back"
        f" in-process, p99 / p50 = {alone.floor:.2f}"
    )
    kept = packed / alone.tokens_per_s
    lines.append(
        f"- in-server / in-process tokens/s at c{CONCURRENCY}: {packed:.1f} / {alone.tokens_per_s:.1f} = {kept:.0%}"
        f"{median} ({verdict(kept >= KEPT)}, >= {KEPT:.0%})"
    )
    return "\n".join(lines) + "\n"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def plot(cells: list[Cell], path: Path) -> None:
    """TTFT and ITL (p50 solid, p99 dashed) against offered load, one line per model."""
    from tritonhf.perf.report import pyplot

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, color in zip(MODELS, ("tab:orange", "tab:blue", "tab:green"), strict=True):
        mine = [cell for cell in cells if cell.model == name and cell.offered]
        rates = [cell.offered for cell in mine]
        for axis, metric in zip(axes, ("ttft", "itl"), strict=True):
            for q, style in (("p50", "-"), ("p99", "--")):
                values = [cell.figures[f"{metric}_{q}_ms"] for cell in mine]
                if all(v is not None for v in values):
                    axis.plot(rates, values, style, color=color, marker="o", label=f"{name} {q}")
    for axis, what in zip(axes, ("time to first token", "inter-token latency"), strict=True):
        axis.set(title=what, xlabel="offered load (requests/s, Poisson)", ylabel="ms", yscale="log")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m tritonhf.perf.streaming")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/streaming-bench"))
    parser.add_argument("--output", type=Path, default=Path(f"perf/reports/{date.today()}-cpu-streaming.md"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    args.workdir.mkdir(parents=True, exist_ok=True)
    repo = repository(args.workdir)
    results = args.workdir / "results"
    results.mkdir(exist_ok=True)
    data = mixed_data(results / "mixed.json", prompts())
    with TritonServer(repo) as server:
        cells = served(server, results, data)
    alone = in_process(repo)
    text = report(cells, alone, time.monotonic() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    plot(cells, args.output.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
