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
the server gone, the same pair in processes of their own, as the models'
instances are, at their threads and bounds, in interleaved rounds: the
static model's instances each taking closed-loop batches of their share of
the 32, the stream's scheduler keeping 32 streams. The stream's figure is
what the server's decoding is measured against; the pair's ratio says how
far continuous batching itself goes on this machine, the server aside.

Goals (issue #22): packed >= 1.5x static tokens/s at concurrency 32;
inter-token p99 <= 1.5x p50 under open-loop arrivals; packed >= 10x the
tutorial's tokens/s at concurrency 32; in-server >= 80% of in-process
tokens/s.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import random
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from tritonhf import model_config
from tritonhf.backends.python_hf.hardware import cpu_count, cpu_model, instance_count
from tritonhf.backends.python_hf.heads import Piece
from tritonhf.backends.python_hf.packed import PackingModel, SlotCache, packed_step, seconds_of
from tritonhf.backends.python_hf.parameters import GenerationParams
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
    if not (runs_this_backend(path) and all((path / name).is_dir() for name in MODELS.values())):
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
    """An in-process stream: when its tokens came; a slot of the closed loop, given back with its last piece."""

    def __init__(self, slots: threading.Semaphore) -> None:
        self.slots, self.sent, self.failed = slots, list[tuple[float, int]](), list[tuple[float, str]]()

    def send(self, piece: Piece) -> None:
        self.sent.append((time.monotonic(), piece.new_tokens))
        if piece.final:
            self.slots.release()

    def fail(self, message: str, kind: str) -> None:
        self.failed.append((time.monotonic(), message))
        self.slots.release()

    def cancelled(self) -> bool:
        return False


@dataclass(frozen=True)
class Window:
    """When an in-process closed loop is measured: for ``span`` seconds after ``warm``."""

    warm: float = 5.0
    span: float = 20.0

    def around(self, started: float) -> tuple[float, float]:
        return started + self.warm, started + self.warm + self.span


@dataclass(frozen=True)
class Alone:
    """The concurrency-32 pair without the server, each side in processes of its own as its model instances are,
    with the threads and bounds of its config: tokens/s over a Window of a closed loop (the medians of interleaved
    rounds); and the spread of identical decoding steps (``FLOOR_ROWS`` rows, back to back, forwards alone): the
    machine's own p99 / p50 in this run, a reference for the inter-token ratios (not a bound: they are measured at
    other moments)."""

    static: float
    packed: float
    floor: float


def in_process(repo: Path, rounds: int = PAIRS, window: Window = Window()) -> Alone:
    """The pair in processes of its own, interleaved rounds. (This one has built the repository: its threads have
    computed already, and their OpenMP teams would slow a scheduler's; hardware.on_a_thread_that_ends.)"""
    spawn = multiprocessing.get_context("spawn")
    measured = []
    for _ in tqdm(range(rounds), desc="in-process pairs", unit="pair"):
        static = static_alone(repo, spawn, window)
        with ProcessPoolExecutor(1, mp_context=spawn) as alone:
            measured.append((static, *alone.submit(packed_alone, repo, window).result()))
    static, packed, floor = (statistics.median(side) for side in zip(*measured, strict=True))
    return Alone(static, packed, floor)


def loaded(repo: Path, name: str) -> TextGeneration:
    """One of the repository's models, as its instance loads it; on a CPU at its config's threads (this process's
    pools are up already: the environment that load_step sets comes too late for them)."""
    config = model_config.read(repo / MODELS[name] / "config.pbtxt")
    on_gpu = config["instance_group"][0].get("kind") == "KIND_GPU"
    model, context = load_step(config, repo / MODELS[name] / "1", "cuda:0" if on_gpu else "cpu")
    if not on_gpu:
        torch.set_num_threads(int(context.parameters["cpu_threads"]))
    return model


def workload(model: TextGeneration, seed: int) -> Iterator[tuple[str, GenerationParams]]:
    """The mixed workload, endless: the prompts in turn, each its own 8..64 new tokens."""
    rng = random.Random(seed)
    for text in itertools.cycle(prompts()):
        n = rng.randint(*MIXED_TOKENS)
        yield text, model.parse_options({"max_new_tokens": n, "min_new_tokens": n})


def static_alone(repo: Path, spawn: multiprocessing.context.SpawnContext, window: Window) -> float:
    """The static model's instances, a process each, started together, each taking closed-loop batches of its
    share of ``CONCURRENCY`` (as the dynamic batcher hands them out at concurrency 32): their tokens/s summed."""
    instances = instance_count(model_config.read(repo / MODELS["static"] / "config.pbtxt"))
    with spawn.Manager() as manager, ProcessPoolExecutor(instances, mp_context=spawn) as pool:
        ready = manager.Barrier(instances, timeout=600)
        rows = [CONCURRENCY // instances + (seed < CONCURRENCY % instances) for seed in range(instances)]
        work = [pool.submit(static_instance, repo, ready, seed, rows[seed], window) for seed in range(instances)]
        return sum(job.result() for job in work)


def static_instance(repo: Path, ready: threading.Barrier, seed: int, rows: int, window: Window) -> float:
    """One instance's tokens/s: the batches begun within the window (one at least), from the first's start to the
    last's end. An instance that fails to load breaks the others' wait."""
    try:
        model = loaded(repo, "static")
    except BaseException:
        ready.abort()
        raise
    jobs = workload(model, seed)
    ready.wait()
    (start, end), batches = window.around(time.monotonic()), []
    while (begun := time.monotonic()) < end or not batches:
        texts, options = zip(*itertools.islice(jobs, rows), strict=True)
        tokens = int(model(list(texts), list(options))["new_tokens"].sum())
        if begun >= start:
            batches.append((begun, time.monotonic(), tokens))
    return sum(tokens for *_, tokens in batches) / (batches[-1][1] - batches[0][0])


def packed_alone(repo: Path, window: Window) -> tuple[float, float]:
    """The stream model's scheduler keeping ``CONCURRENCY`` streams: the tokens sent within the window, a second;
    then the floor (step_spread)."""
    model = loaded(repo, "stream, packed")
    jobs, slots, streams = workload(model, 0), threading.Semaphore(CONCURRENCY), []
    scheduler = model.scheduler()
    start, end = window.around(time.monotonic())
    try:
        while slots.acquire(timeout=max(0.0, end - time.monotonic())):
            text, options = next(jobs)
            streams.append(Counter(slots))
            scheduler.submit(model.sequence(text, options, streams[-1]))
    finally:
        scheduler.close()
    if failed := [message for stream in streams for at, message in stream.failed if at < end]:
        raise RuntimeError(f"{len(failed)} in-process streams failed: {failed[0]}")  # not the close's
    if not (tokens := sum(n for stream in streams for at, n in stream.sent if start <= at < end)):
        raise RuntimeError(f"the stream model sent no token in {window.span:g} s")
    return tokens / window.span, step_spread(model)


def step_spread(model: PackingModel, steps: int = 400) -> float:
    """p99 / p50 of ``steps`` identical packed decoding steps of ``FLOOR_ROWS`` rows (the first 20 warm up)."""
    step = packed_step(model, SlotCache.reserve(model.cache_shapes(), FLOOR_ROWS + 1, 65, model.device), FLOOR_ROWS)
    seconds = [seconds_of(step, model.device) for _ in range(steps)][20:]
    return percentile(seconds, 0.99) / percentile(seconds, 0.5)


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
        f"- for reference, the same pair without the server (in-process, each side in processes as its instances"
        f" run, a closed loop's steady {Window().span:g} s; the medians of {PAIRS} interleaved rounds): packed / static"
        f" = {alone.packed / alone.static:.2f}x ({alone.packed:.1f} / {alone.static:.1f} tokens/s)"
    )
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
    kept = packed / alone.packed
    lines.append(
        f"- in-server / in-process tokens/s at c{CONCURRENCY}: {packed:.1f} / {alone.packed:.1f} = {kept:.0%}"
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
