"""``tritonhf tune``: the search (tuning.py) run live on the machine that serves, and a repository that serves what
won.

One tritonserver runs for the whole tune, on a copy of the repository, with only the model under trial loaded: a
candidate is switched in by loading its variant with the candidate's configuration (Triton's load API with a config
override), never by restarting the server; perf_analyzer measures (perf/analyzer.py). A server that dies during a
trial costs that trial, which is reported; the server is started again and the tune goes on.

The output is a complete repository, written whole or not at all: every variant keeps its own name, and its
measured best layout; the plain ``<name>`` serves the winner with the same interface (the PyTorch model, if it lost,
stays reachable as ``<name>_python``). Beside it, ``<output>.tune/``: every trial (CSV, also the checkpoint an
interrupted tune resumes from), a report (default against tuned, the machine) and a plot.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import platform
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil
from tqdm import tqdm

from tritonhf import TritonHFError, model_config, placement
from tritonhf.backends.python_hf.hardware import (
    MAX_CPU_INSTANCES,
    TENSORRT,
    cpu_count,
    cpu_flags,
    cpu_model,
    memory_limit,
)
from tritonhf.backends.python_hf.parameters import Limits
from tritonhf.client import infer, stream
from tritonhf.perf.analyzer import ANY_WINDOWS, PerfAnalyzerError, PerfOptions, data_file, measure, prompts
from tritonhf.perf.generation import measure_mixed, mixed_data
from tritonhf.prescreen import KEEP as PRESCREEN_KEEP
from tritonhf.prescreen import Timing, prescreen
from tritonhf.repository import Manifest, read_manifest, seal, staged, write_manifest
from tritonhf.server import TritonServer, find_installation
from tritonhf.tuning import BUDGET_MINUTES, Candidate, Outcome, Point, Search, Serves, Space, estimate, majority_pass
from tritonhf.variants import ENCODERS, GENERATION, ONNX, PYTHON, STREAM, VARIANTS

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
GPU_BATCH_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)  # a GPU's forward costs about the same up to far larger batches
GPU_INSTANCES = (1, 2, 3)  # instances share the GPU: more than a few only split its memory and its streams
DELAYS_US = (0, 500, 2000, 8000)
STREAM_ROWS = (4, 8, 16, 32, 64)  # a stream's running batch (max_running_sequences): its "max_batch_size"
STREAM_PREFILL = (8, 16, 32, 64, 128)  # caps on a packed step's prompt tokens (max_prefill_tokens), under its slack
GPU_STREAM_PREFILL = (128, 256, 512, 1024, 2048)  # a GPU's step costs about the same up to far more tokens
MEMORY_SHARE = 0.8  # of the host's (or the cgroup's) memory: what one model's processes may hold while tuned
WINDOW_MS = 2000  # perf_analyzer's measurement window in a tune
SECONDS_PER_POINT = 12.0  # a measurement's windows, a reload now and then: what a budget in minutes buys
TRIAL_FIELDS = (
    "model", "variant", "dtype", "instances", "max_batch_size", "queue_delay_us", "prefill_tokens", "concurrency"
)  # fmt: skip
MEASURED_FIELDS = ("throughput", "p99_ms", "errors", "phase", "ttft_p99_ms")  # ttft: generation's, after the rest


@dataclass(frozen=True)
class TuneOptions:
    repository: Path
    output: Path
    models: tuple[str, ...] = ()  # the names to tune; none: every classifier, embedder, generation model and stream
    p99_ms: float | None = None  # classifiers' and embedders' request latency
    budget_minutes: float = BUDGET_MINUTES
    window_ms: int = WINDOW_MS
    prescreen: bool = True  # time the variants in-process first: drop clear losers, fit the length-bucket overhead
    ttft_p99_ms: float | None = None  # generation models' time to first token (a static model's: its answer's)
    itl_p99_ms: float | None = None  # streams' latency between tokens

    def bounds(self, serves: Serves) -> tuple[float | None, float | None]:
        return serves.bounds(self.p99_ms, self.ttft_p99_ms, self.itl_p99_ms)

    @property
    def workdir(self) -> Path:
        return self.output.with_name(self.output.name + ".tune")


def spaces(repository: Path, names: Sequence[str] = ()) -> dict[str, Space]:
    """Per tuned name: the variants that may serve it and the layouts to try. A classifier's or embedder's plain
    name may be served by any of its variants (python and the fused exports); a generation model and its stream are
    each tuned as themselves (a stream's layout: instances, precision, its running batch's rows and the prompt
    tokens a packed step carries besides them)."""
    manifest = read_manifest(repository)
    tunable = {
        n: e
        for n, e in manifest.items()
        if (e["variant"] == PYTHON.name and e["task"] in (*ENCODERS, GENERATION)) or e["variant"] == STREAM.name
    }
    unknown = [n for n in names if n not in tunable]
    if unknown:
        known = ", ".join(sorted(tunable)) or "none"
        raise TritonHFError(f"cannot tune {', '.join(unknown)}: not a served model here (tunable: {known})")
    found = {}
    for name in names or sorted(tunable):
        source, task = tunable[name]["source"], tunable[name]["task"]
        family = {n: e for n, e in manifest.items() if e["source"] == source and e["task"] == task}
        if any(e.get("runtime", "python") != "python" for e in family.values()):
            raise TritonHFError(f"{name}: its exports are ensembles (--runtime native): tune a --runtime python build")
        serves = serving(tunable[name])
        if serves is Serves.REQUESTS:  # any variant but the tutorial's may serve the plain name
            served = {n: e for n, e in family.items() if not VARIANTS[e["variant"]].perf.reference}
        else:
            served = {name: tunable[name]}
        config = model_config.read(repository / name / "config.pbtxt")
        gpu = config["instance_group"][0].get("kind") == "KIND_GPU"
        variants = {n: precisions(repository, n, e, gpu) for n, e in served.items()}
        parameters = config["parameters"]
        streams = serves is Serves.STREAM
        # a stream's running batch, as its scheduler reads it (a repository built before a limit: its default)
        limits = Limits.from_config({key: value.get("string_value", "") for key, value in parameters.items()})
        default = Candidate(
            name,
            parameters.get("dtype", {}).get("string_value", "float32"),
            int(config["instance_group"][0]["count"]),
            limits.max_running_sequences if streams else int(config["max_batch_size"]),
            int(config.get("dynamic_batching", {}).get("max_queue_delay_microseconds", 0)),
            limits.max_prefill_tokens if streams else 0,
        )
        instances = GPU_INSTANCES if gpu else range(1, min(cpu_count(), MAX_CPU_INSTANCES) + 1)
        batch_sizes = GPU_BATCH_SIZES if gpu else STREAM_ROWS if streams else BATCH_SIZES  # a GPU: rows as batches
        packs = streams and parameters.get("packed", {}).get("string_value") != "false"  # else its steps are padded
        prefill = (GPU_STREAM_PREFILL if gpu else STREAM_PREFILL) if packs else ()
        found[name] = Space(
            default,
            variants,
            tuple(sorted({*instances, default.instances})),
            tuple(sorted({*batch_sizes, default.max_batch_size})),
            (0,) if streams else tuple(sorted({*DELAYS_US, default.queue_delay_us})),
            serves,
            tuple(sorted({*prefill, default.prefill_tokens})),
        )
    return found


def serving(entry: dict) -> Serves:
    """What a built model's throughput counts, and which bounds hold it, from its manifest entry."""
    if entry["task"] in ENCODERS:
        return Serves.REQUESTS
    return Serves.STREAM if VARIANTS[entry["variant"]].streams else Serves.TOKENS


def precisions(repository: Path, name: str, entry: dict, gpu: bool = False) -> tuple[str, ...]:
    """What a variant may load in: the generic model's float32 and verified precisions; an export, its own (on a
    GPU, a float export also through TensorRT: "tensorrt", config parameter onnx_provider)."""
    if "runtime" in entry:
        return ("export", TENSORRT) if gpu and entry["variant"] == ONNX.name else ("export",)
    parameters = model_config.read(repository / name / "config.pbtxt")["parameters"]
    verified = parameters.get("verified_dtypes", {}).get("string_value", "")
    return ("float32", *(d for d in verified.split(",") if d))


Overheads = dict[tuple[str, str], float]  # (variant, dtype) -> forward_overhead_tokens fitted here (prescreen.py)


def configured(
    repository: Path, candidate: Candidate, name: str | None = None, overheads: Overheads | None = None
) -> dict:
    """The variant's config with the candidate's layout (and ``name``, where it is served under another one), and
    the length-bucket overhead fitted for it on this machine, if it was."""
    config = model_config.read(repository / candidate.variant / "config.pbtxt")
    if (overhead := (overheads or {}).get((candidate.variant, candidate.dtype))) is not None:
        config["parameters"]["forward_overhead_tokens"] = {"string_value": f"{overhead:.1f}"}
    config["name"] = name or candidate.variant
    config["instance_group"][0]["count"] = candidate.instances
    if "max_running_sequences" in config["parameters"]:  # a stream: its own scheduler batches, Triton doesn't
        config["parameters"]["max_running_sequences"] = {"string_value": str(candidate.max_batch_size)}
        config["parameters"]["max_prefill_tokens"] = {"string_value": str(candidate.prefill_tokens)}
    else:
        config["max_batch_size"] = candidate.max_batch_size
        config.setdefault("dynamic_batching", {})["max_queue_delay_microseconds"] = candidate.queue_delay_us
    if candidate.dtype == TENSORRT:
        config["parameters"]["onnx_provider"] = {"string_value": TENSORRT}
    elif candidate.dtype != "export":
        config["parameters"]["dtype"] = {"string_value": candidate.dtype}
    return config


class Live:
    """``tuning.Measure`` on this machine: the candidate loaded in the running server, then perf_analyzer (generation:
    the mixed workload of perf/generation.py, streamed for a stream)."""

    STABILITY_PERCENT = 20

    def __init__(
        self,
        server: TritonServer,
        repository: Path,
        workdir: Path,
        window_ms: int,
        stability_percent: int = STABILITY_PERCENT,
    ) -> None:
        self.server, self.repository, self.workdir, self.window_ms = server, repository, workdir, window_ms
        self.stability_percent = stability_percent  # three windows within this of their mean (perf/analyzer.py)
        self.loaded: dict[str, Candidate] = {}
        self.data = workdir / "prompts.json"
        data_file(self.data)
        self.prompts = prompts()
        self.mixed = mixed_data(workdir / "mixed.json", self.prompts)
        self.manifest = read_manifest(repository)
        self.lost: list[str] = []  # trials a dead server cost
        self.env = find_installation().env  # perf_analyzer's, once
        self.memory: dict[Candidate, int] = {}  # bytes the server held with the candidate loaded and warm
        self.overheads: Overheads = {}  # filled by the pre-screen

    def warm(self, candidate: Candidate) -> None:
        """Full batches to every instance (a stream: a few prompts at once, which its scheduler batches) before any
        window counts: a first inference (lazy session set-up, kernel choice) would otherwise land in the first
        window, or leave a short one without a single answer."""
        requests = 2 * candidate.instances
        if serving(self.manifest[candidate.variant]) is Serves.STREAM:
            url, few = self.server.grpc_url, {"max_new_tokens": 4}
            with ThreadPoolExecutor(requests) as pool:  # all at once: its scheduler batches them
                list(pool.map(lambda p: list(stream(candidate.variant, p, url, few)), self.prompts[:requests]))
            return
        batch = list(itertools.islice(itertools.cycle(self.prompts), candidate.max_batch_size))
        with ThreadPoolExecutor(candidate.instances) as pool:
            list(pool.map(lambda _: infer(candidate.variant, batch, self.server.http_url), range(requests)))

    def __call__(self, candidate: Candidate, concurrency: int) -> Point:
        try:
            if self.loaded.get(candidate.variant) != candidate:
                for other in [v for v in self.loaded if v != candidate.variant]:  # one model's processes at a time
                    self.server.control("unload", other)
                    del self.loaded[other]
                self.server.control(
                    "load", candidate.variant, config=configured(self.repository, candidate, overheads=self.overheads)
                )
                self.warm(candidate)
                self.memory[candidate] = resident(self.server)
                self.loaded[candidate.variant] = candidate
            if self.memory[candidate] > MEMORY_SHARE * memory_limit():  # a layout that would crowd the host out
                raise TritonHFError(
                    f"needs {self.memory[candidate] / 2**20:.0f} MiB, over {MEMORY_SHARE:.0%} of this host's"
                    f" {memory_limit() / 2**20:.0f} MiB"
                )
            return self.measured(candidate, concurrency)
        except (PerfAnalyzerError, TritonHFError) as err:
            if self.server.process is None or self.server.process.poll() is not None:
                self.lost.append(f"{candidate.label} at concurrency {concurrency}: the server died; started again")
                self.server.stop()
                self.server.start()
                self.loaded.clear()
            last = (str(err).strip().splitlines() or ["?"])[-1]
            with (self.workdir / "errors.log").open("a") as log:
                log.write(f"{candidate.label} c{concurrency}: {last}\n")
            return Point(candidate, concurrency, 0.0, float("inf"), errors=1)

    def measured(self, candidate: Candidate, concurrency: int) -> Point:
        """The loaded candidate at ``concurrency``: answers/s and p99; generation, output tokens/s of the mixed
        workload, p99 of the answers' latency (of a stream's, between its tokens) and of the time to first token."""
        serves = serving(self.manifest[candidate.variant])
        if serves is not Serves.REQUESTS:
            streams = serves is Serves.STREAM
            found = measure_mixed(
                candidate.variant, streams, self.server.grpc_url, self.mixed, concurrency, self.workdir, self.env,
                self.server.control_key,
            )  # fmt: skip
            latency = found["itl_p99_ms"] if streams else found["e2e_p99_ms"]
            return Point(
                candidate, concurrency, found["output_tokens_per_s"], latency or 0.0, ttft_p99_ms=found["ttft_p99_ms"]
            )
        options = PerfOptions(
            candidate.variant,
            self.server.grpc_url,
            self.data,
            concurrency,
            self.workdir / "last.csv",
            self.window_ms,
            stability_percent=self.stability_percent,
            control_key=self.server.control_key,
        )
        # a window that won't settle on a busy machine is measured once more and taken: the finals weigh noise
        measured = measure(options, self.env, relaxed_percent=ANY_WINDOWS)
        return Point(candidate, concurrency, measured["throughput_rps"], measured["p99_ms"])


def resident(server: TritonServer) -> int:
    """Bytes resident in the server and its model processes."""
    processes = [root := psutil.Process(server.process.pid), *root.children(recursive=True)]
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):  # gone between listing and reading
            total += process.memory_info().rss
    return total


def read_points(path: Path, model: str, phase: str) -> list[Point]:
    """Every trial of ``model`` in ``phase`` recorded at ``path``, in order."""
    if not path.exists():
        return []
    with path.open() as handle:
        return [
            Point(
                Candidate(
                    row["variant"],
                    row["dtype"],
                    *(int(row[k]) for k in TRIAL_FIELDS[3:6]),
                    int(row.get("prefill_tokens") or 0),  # recorded before streams' prefill was tuned: none
                ),
                int(row["concurrency"]),
                float(row["throughput"]),
                float(row["p99_ms"]),
                int(row["errors"]),
                float(row.get("ttft_p99_ms") or 0.0),  # recorded before generation was tuned: none
            )
            for row in csv.DictReader(handle)
            if row["model"] == model and row["phase"] == phase
        ]


def read_trials(path: Path, model: str, phase: str = "search") -> dict[tuple[Candidate, int], Point]:
    """The checkpoint: the trials of an earlier, interrupted tune of ``model`` (or a grid's, by ``phase``)."""
    return {(point.candidate, point.concurrency): point for point in read_points(path, model, phase)}


class Trials:
    """Every trial, appended to ``trials.csv`` as it is measured: the record and the checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fresh = not path.exists()
        self.handle = path.open("a", newline="")
        self.writer = csv.writer(self.handle)
        if fresh:
            self.writer.writerow([*TRIAL_FIELDS, *MEASURED_FIELDS])

    def add(self, model: str, point: Point, phase: str) -> None:
        c = point.candidate
        self.writer.writerow(
            [model, c.variant, c.dtype, c.instances, c.max_batch_size, c.queue_delay_us, c.prefill_tokens,
             point.concurrency,
             f"{point.throughput:.3f}", f"{point.p99_ms:.3f}", point.errors, phase, f"{point.ttft_p99_ms:.3f}"]
        )  # fmt: skip
        self.handle.flush()


def tune_model(
    name: str, space: Space, live: Live, options: TuneOptions, trials: Trials, budget: int, seconds: float
) -> Outcome:
    """One model's search, with a progress bar that shows the best so far."""
    bar = tqdm(total=budget, desc=f"tune {name}", unit="trial")

    def on_trial(point: Point, best: Point | None) -> None:
        trials.add(name, point, search.phase)
        bar.update(1)
        if best is not None:
            bar.set_postfix_str(
                f"best {best.throughput:.0f} {space.serves.unit}: {best.candidate.label} c{best.concurrency}"
            )

    deadline = time.monotonic() + seconds
    p99_ms, ttft_p99_ms = options.bounds(space.serves)
    search = Search(space, live, p99_ms, budget=budget, deadline=deadline, on_trial=on_trial, ttft_p99_ms=ttft_p99_ms)
    search.cache.update(read_trials(options.workdir / "trials.csv", name))  # resumed: measured points aren't redone
    try:
        return search.run()
    finally:
        bar.close()


def tune(options: TuneOptions) -> Path:
    """Tune every model asked for, then write the output repository whole."""
    found = spaces(options.repository, options.models)
    options.workdir.mkdir(parents=True, exist_ok=True)
    trials = Trials(options.workdir / "trials.csv")
    seconds = options.budget_minutes * 60 / len(found)  # each model's share
    budget = max(40, int(seconds / SECONDS_PER_POINT * 2))  # a bound on trials; the time is the budget
    outcomes: dict[str, Outcome] = {}
    timings: dict[str, dict[tuple[str, str], Timing]] = {}
    with stopped_as_interrupted(), TritonServer(options.repository, models=()) as server:
        live = Live(server, options.repository, options.workdir, options.window_ms)
        for name, space in found.items():
            started = time.monotonic()
            if options.prescreen and space.serves is Serves.REQUESTS:  # in this process, the server idle
                space, timings[name] = prescreen(options.repository, space, lambda c: configured(options.repository, c))
                live.overheads.update((key, t.overhead_tokens) for key, t in timings[name].items())
            left = seconds - (time.monotonic() - started)
            outcomes[name] = tune_model(name, space, live, options, trials, budget, left)
            print(summary(name, outcomes[name], time.monotonic() - started, space.serves))
        for lost in live.lost:
            print(f"lost a trial: {lost}")
    write_tuned(options.repository, options.output, outcomes, options, live.overheads)
    serves = {name: space.serves for name, space in found.items()}
    (options.workdir / "report.md").write_text(report(outcomes, options, live.memory, timings, serves))
    plot(outcomes, options.workdir / "candidates.png", options, serves)
    print(f"wrote {options.output} (report: {options.workdir / 'report.md'})")
    return options.output


@contextlib.contextmanager
def stopped_as_interrupted() -> Iterator[None]:
    """SIGTERM (a job stopped, a pod deleted) as Ctrl-C: the server is stopped, not left behind in its own session,
    and the trials so far stay, for the next tune to resume from."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summary(name: str, outcome: Outcome, seconds: float, serves: Serves) -> str:
    return (
        f"{name}: {outcome.chosen.label} ({outcome.note}): {outcome.capacity.throughput:.1f} {serves.unit} at"
        f" concurrency {outcome.capacity.concurrency}, {latency(outcome.capacity, serves)}; the default"
        f" {outcome.default.throughput:.1f} {serves.unit} ({outcome.gain:.2f}x, noise {outcome.noise:.0%});"
        f" {len(outcome.trials)} trials in {seconds / 60:.1f} min"
    )


def latency(point: Point, serves: Serves) -> str:
    if serves is Serves.STREAM:
        return f"p99 {point.p99_ms:.1f} ms between tokens and {point.ttft_p99_ms:.0f} ms to the first"
    return f"p99 {point.p99_ms:.1f} ms"


def write_tuned(
    source: Path, output: Path, outcomes: dict[str, Outcome], options: TuneOptions, overheads: Overheads | None = None
) -> None:
    """The repository with each model's winner under its plain name, written whole or not at all."""
    manifest: Manifest = read_manifest(source)
    machine = machine_record(options.p99_ms)
    with staged(output.resolve()) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True, symlinks=True)
        for name, outcome in outcomes.items():
            chosen = outcome.chosen
            for variant, layout in outcome.layouts.items():  # every variant in its best measured layout
                if variant != name:
                    model_config.write(configured(source, layout, overheads=overheads), staging / variant)
            if chosen.variant != name:  # an export won: the PyTorch model keeps a name of its own
                pytorch = f"{name}_{PYTHON.name}"
                (staging / name).rename(staging / pytorch)
                python = outcome.layouts.get(name, outcome.default.candidate)
                model_config.write(configured(source, python, pytorch, overheads), staging / pytorch)
                manifest[pytorch] = manifest[name]
                shutil.copytree(staging / chosen.variant, staging / name, symlinks=True)
                manifest[name] = {**manifest[chosen.variant]}
            model_config.write(configured(source, chosen, name, overheads), staging / name)
            manifest[name]["tuned"] = {
                **machine,
                "variant": chosen.variant,
                "candidate": chosen.label,
                "throughput": round(outcome.capacity.throughput, 2),
                "default_throughput": round(outcome.default.throughput, 2),
                "concurrency": outcome.capacity.concurrency,
                "p99_ms": round(outcome.capacity.p99_ms, 2),
                **({"ttft_p99_ms": round(outcome.capacity.ttft_p99_ms, 2)} if outcome.capacity.ttft_p99_ms else {}),
                "noise": round(outcome.noise, 3),
            }
        write_manifest(staging, manifest)
        placement.write(staging, placement.record(manifest, "auto", "cpu", cpu_count()))
        seal(staging)


def machine_record(p99_ms: float | None) -> dict:
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "flags": [f for f in placement.RECORDED_FLAGS if f in flags],
        "cpus": cpu_count(),
        "p99_bound_ms": p99_ms,
        "date": time.strftime("%Y-%m-%d"),
    }


def report(
    outcomes: dict[str, Outcome],
    options: TuneOptions,
    memory: dict[Candidate, int],
    timings: dict[str, dict[tuple[str, str], Timing]],
    serves: dict[str, Serves],
) -> str:
    machine = machine_record(options.p99_ms)
    versions = {name: metadata.version(name) for name in ("torch", "transformers", "onnxruntime", "tritonclient")}
    lines = [
        "# tritonhf tune",
        "",
        f"- CPU: {machine['cpu']} ({machine['cpus']} CPUs), flags: {', '.join(machine['flags']) or 'none recorded'}",
        f"- Python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        (
            f"- bounds, p99: {options.p99_ms or 'none'} ms (requests), {options.ttft_p99_ms or 'none'} ms"
            f" (generation's time to first token), {options.itl_p99_ms or 'none'} ms (streams' inter-token latency);"
            f" budget {options.budget_minutes:g} min"
        ),
        f"- memory: a candidate may hold {MEMORY_SHARE:.0%} of {memory_limit() / 2**30:.1f} GiB (server and models)",
        "",
        (
            "p99 ms: a request's latency; a stream's, between its tokens. Generation: the mixed workload"
            " (perf/generation.py), its output tokens/s."
        ),
        "",
        "| model | served as | throughput | p99 ms | TTFT p99 ms | concurrency | vs default | memory MiB | why |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, outcome in outcomes.items():
        kind = serves[name]
        for label, point in (("default", outcome.default), ("tuned", outcome.capacity)):
            ttft = f"{point.ttft_p99_ms:.0f}" if kind is not Serves.REQUESTS else ""
            lines.append(
                f"| {name} | {label}: {point.candidate.label} | {point.throughput:.1f} {kind.unit} |"
                f" {point.p99_ms:.1f} | {ttft} | {point.concurrency} |"
                f" {point.throughput / outcome.default.throughput:.2f}x |"
                f" {memory.get(point.candidate, 0) / 2**20:.0f} |"
                f" {outcome.note if label == 'tuned' else ''} |"
            )
    for name, outcome in outcomes.items():
        kind = serves[name]
        lines += ["", f"## {name}: the finals, a race (one measurement's noise: {outcome.noise:.1%})", ""]
        lines += [f"| candidate | rounds | {kind.unit} | p99 ms | |", "|---|---|---|---|---|"]
        most = max(map(len, outcome.finalists.values()))
        for candidate, points in sorted(outcome.finalists.items(), key=lambda item: -estimate(item[1]).throughput):
            found = estimate(points)
            default = " (the default)" if candidate == outcome.default.candidate else ""
            fate = (
                "chosen"
                if candidate == outcome.chosen
                else "failed the bound in most rounds"
                if not majority_pass(points, *options.bounds(kind))
                else "to the end"
                if len(points) == most
                else "dropped"
            )
            lines.append(
                f"| {candidate.label}{default} | {len(points)} | {found.throughput:.1f} | {found.p99_ms:.1f} | {fate} |"
            )
    for name, found in timings.items():
        lines += ["", f"## {name}: in-process, before the live search (prescreen.py)", ""]
        lines += ["| variant | dtype | rows/s (16 x 96 words) | length-bucket overhead, tokens | live |"]
        lines += ["|---|---|---|---|---|"]
        top = max(t.rate for t in found.values())
        for t in sorted(found.values(), key=lambda t: -t.rate):
            live = "searched" if t.rate >= PRESCREEN_KEEP * top else f"dropped (< {PRESCREEN_KEEP:.0%} of the best)"
            lines.append(f"| {t.variant} | {t.dtype} | {t.rate:.1f} | {t.overhead_tokens:.0f} | {live} |")
    return "\n".join(lines) + "\n"


def plot(outcomes: dict[str, Outcome], path: Path, options: TuneOptions, serves: dict[str, Serves]) -> None:
    """Throughput against p99 (a stream's: between tokens) for every trial that passed, one colour per variant, one
    panel per model; the default and the choice ringed, the bound drawn."""
    from tritonhf.perf.report import pyplot, save

    plt = pyplot()
    figure, axes = plt.subplots(1, len(outcomes), figsize=(6.5 * len(outcomes), 4.8), squeeze=False)
    for axis, (name, outcome) in zip(axes[0], outcomes.items()):
        clean = [t for t in outcome.trials if t.errors == 0 and t.throughput > 0]
        for variant in dict.fromkeys(t.candidate.variant for t in clean):
            mine = [t for t in clean if t.candidate.variant == variant]
            axis.scatter([t.p99_ms for t in mine], [t.throughput for t in mine], s=14, alpha=0.6,
                         label=variant.removeprefix(name).lstrip("_") or PYTHON.name)  # fmt: skip
        for label, point in (("default", outcome.default), ("tuned", outcome.capacity)):
            axis.scatter([point.p99_ms], [point.throughput], s=160, facecolors="none", edgecolors="black")
            axis.annotate(label, (point.p99_ms, point.throughput), textcoords="offset points", xytext=(8, -4))
        kind = serves[name]
        if (bound := options.bounds(kind)[0]) is not None:
            axis.axvline(bound, color="red", linestyle="--", linewidth=1, label=f"p99 bound {bound:g} ms")
        between = " between tokens" if kind is Serves.STREAM else ""
        axis.set(title=name, xlabel=f"p99 latency{between} (ms)", ylabel=kind.unit)
        axis.legend()
    save(figure, f"tritonhf tune: every trial ({cpu_model()}, {cpu_count()} CPUs)", path)
