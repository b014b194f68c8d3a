"""``tritonhf perf`` / ``make perf``: every variant side by side against the tutorial's baseline, in one run.

Builds one repository from the full-size stand-ins (generation makes exactly
``GEN_TOKENS`` new tokens: random weights would otherwise stop at random EOS
tokens and change the work), starts the server once, and sweeps each served
model through perf_analyzer at fixed concurrencies, reading the server's
metrics around every step. Then the mixed generation workload (perf/generation.py):
the static model against the streaming one. Writes ``perf/results/<timestamp>/``:
raw CSVs and profiles, ``summary.csv``, ``mixed.csv``, ``summary.md`` (printed
at the end) and ``throughput_latency.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from tritonhf.perf import compute
from tritonhf.perf.analyzer import PROMPTS, PerfAnalyzerError, PerfOptions, data_file, measure
from tritonhf.perf.generation import measure_mixed, mixed_data
from tritonhf.perf.metrics import server_side, snapshot
from tritonhf.perf.report import plot, plot_mixed, summary_markdown
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import read_manifest
from tritonhf.server import TritonServer, find_installation
from tritonhf.standins import write_standins
from tritonhf.variants import (
    BASELINE,
    FUSED,
    ONNX,
    ONNX_INT8,
    PYTHON,
    PYTHON_ENSEMBLE,
    STREAM,
    TORCHSCRIPT,
    VARIANTS,
    Variant,
)

GEN_TOKENS = 32
CLASSIFIER = "distilbert-base-uncased-finetuned-sst-2-english"


@dataclass(frozen=True)
class SuiteOptions:
    output: Path = Path("perf/results")
    workdir: Path = Path(".cache")
    class_concurrency: tuple[int, ...] = (1, 4, 16, 32, 64)
    gen_concurrency: tuple[int, ...] = (1, 32)  # the baseline makes ~1 answer/s: every step is slow
    gen_models: tuple[str, ...] = ("gpt2", "facebook/opt-125m")
    device: str = "cpu"
    window_ms: int = 4000
    gen_window_ms: int = 15000  # the generation baseline's windows: ~10 answers each
    # of gen_models, by served name: static vs stream under the mixed workload
    mixed_models: tuple[str, ...] = ("gpt2",)
    mixed_concurrency: int = 32
    # the second server: float32 python and the three-step ensembles, against the first's auto dtype and fused models
    second_variants: tuple[str, ...] = (PYTHON.name, ONNX.name, ONNX_INT8.name)
    second_concurrency: tuple[int, ...] = (16, 64)


@dataclass(frozen=True)
class Served:
    """One served model and the Triton models that make it up."""

    name: str
    base: str  # the model's own name: the python variant's
    task: str
    variant: Variant
    runtime: str = FUSED  # exported variants: how they are laid out (variants.RUNTIMES)
    dtype: str = "float32"

    @property
    def network(self) -> str:
        return self.variant.network(self.base, self.runtime)

    @property
    def pipeline(self) -> list[str]:
        return self.variant.pipeline(self.base, self.runtime)

    @property
    def layout(self) -> str:
        """How a request is served: eager PyTorch, the tutorial's pipeline, a fused export or an ensemble."""
        if self.variant.exporter:
            return "ensemble" if self.variant.ensemble(self.runtime) else "fused"
        return "pipeline" if self.variant.perf.reference else "eager"


def served_models(repository: Path) -> list[Served]:
    """The repository's models, per model: the reference first, then in the registry's order."""
    manifest = read_manifest(repository)
    served = [
        Served(
            name,
            Path(info["source"]).name,
            info["task"],
            VARIANTS[info["variant"]],
            info.get("runtime", FUSED),
            info.get("dtype", "float32"),
        )
        for name, info in manifest.items()
    ]
    order = list(VARIANTS.values())
    return sorted(served, key=lambda s: (s.base, not s.variant.perf.reference, order.index(s.variant)))


def machine_facts(server_url: str) -> dict[str, str]:
    import urllib.request

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    server = json.loads(urllib.request.urlopen(f"http://{server_url}/v2", timeout=5).read())
    facts = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "tritonserver": server["version"],
    }
    facts.update({name: metadata.version(name) for name in ("torch", "transformers", "onnxruntime", "tritonclient")})
    try:
        import torch

        facts["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001 - a fact, not a requirement
        facts["gpu"] = "unknown"
    return facts


def in_process_throughput(repository: Path, name: str, batch: int, seconds: float = 8.0) -> float:
    """req/s of one served model's step run in this process from its config (one instance, its threads), at one
    batch size: the ceiling Triton's overhead is measured against."""
    import torch

    from tritonhf import model_config
    from tritonhf.backends.python_hf.steps import load_step

    step, context = load_step(model_config.read(repository / name / "config.pbtxt"), repository / name / "1")
    threads = torch.get_num_threads()  # this process's, restored after: the suite builds again later
    torch.set_num_threads(int(context.parameters.get("cpu_threads", threads)))
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    batches = [[prompts[(i * batch + j) % len(prompts)] for j in range(batch)] for i in range(len(prompts))]
    try:
        step(batches[0])  # warm-up
        done, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            step(batches[i % len(batches)])
            done, i = done + batch, i + 1
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def measure_steps(
    server: TritonServer, steps: list[tuple[Served, int]], options: SuiteOptions, data: Path, results: Path, label: str
) -> list[dict]:
    """perf_analyzer at each (served model, concurrency), with the server's metrics around each step.

    If the server died during a step, that step is reported with where its log was kept, and the server is
    started again for the rest: one crash costs one row, not the run.
    """
    rows: list[dict] = []
    env = find_installation().env
    for served, concurrency in tqdm(steps, desc=label, unit="step"):
        if rows and server.process is not None and server.process.poll() is not None:
            kept = server.log_path.with_name(f"{server.log_path.stem}.crash-{len(rows)}.log")
            server.log_path.rename(kept)
            rows[-1] = {**rows[-1], "error": f"tritonserver died (exit {server.process.returncode}; log: {kept.name})"}
            server.stop()
            server.start()
        row = {
            "model": served.base,
            "task": served.task,
            "variant": served.variant.name,
            "dtype": served.dtype,
            "layout": served.layout,
            "concurrency": concurrency,
        }
        try:
            before = snapshot(server.metrics_url)
            measured = measure(step_options(options, served, concurrency, server, data, results), env)
            side = server_side(before, snapshot(server.metrics_url), served.network, served.pipeline)
        except (PerfAnalyzerError, OSError) as err:  # a noisy step (or a dead server) is reported; the sweep goes on
            rows.append({**row, "error": str(err).splitlines()[-1]})
            continue
        rows.append({**row, **measured, **side})
    return rows


def sweep(options: SuiteOptions, results: Path) -> tuple[list[dict], list[dict], list[dict], dict[str, str]]:
    standins = write_standins(options.workdir / "standins", "full")
    entries = plan(
        [str(standins[m]) for m in options.gen_models], [str(standins[CLASSIFIER])], [], GEN_TOKENS, GEN_TOKENS
    )
    repository = build(
        entries,
        BuildOptions(output=options.workdir / "perf_repository", variants=tuple(VARIANTS), device=options.device),
    )
    data = data_file(results / "prompts.data.json")
    served = served_models(repository)
    plan_steps = [
        (s, c)
        for s in served
        if s.variant.perf.sweep
        for c in (options.gen_concurrency if s.task == "text-generation" else options.class_concurrency)
    ]
    mixed_steps = [s for s in served if s.base in options.mixed_models and s.variant.perf.mixed]
    mixed_file = mixed_data(results / "mixed.data.json", json.loads(PROMPTS.read_text())["prompts"])
    mixed = []
    with TritonServer(repository, log_path=results / "tritonserver.log") as server:
        facts = {
            **machine_facts(server.http_url),
            "windows": f"{options.window_ms / 1000:.0f} s; generation: 2 x concurrency answers "
            f"(baseline above concurrency 1: {options.gen_window_ms / 1000:.0f} s)",
        }
        env = find_installation().env
        rows = measure_steps(server, plan_steps, options, data, results, "perf sweep")
        for served in tqdm(mixed_steps, desc="mixed generation workload", unit="model"):
            row = {"model": served.base, "variant": served.variant.name, "concurrency": options.mixed_concurrency}
            try:
                mixed.append(
                    {
                        **row,
                        **measure_mixed(
                            served.name,
                            served.variant.streams,
                            server.grpc_url,
                            mixed_file,
                            options.mixed_concurrency,
                            results,
                            env,
                            server.control_key,
                        ),
                    }
                )
            except (PerfAnalyzerError, ValueError) as err:
                mixed.append({**row, "error": str(err).splitlines()[-1]})
    for row in rows:  # the Python-side ceiling of each classification model, at the batch it formed at 32
        one_step = row["layout"] != "ensemble"  # an ensemble's steps are three models: no one step to time
        if row["model"] == CLASSIFIER and row["concurrency"] == 32 and "error" not in row and one_step:
            name = VARIANTS[row["variant"]].served_name(CLASSIFIER)
            row["in_process_rps"] = in_process_throughput(repository, name, max(1, round(row["avg_batch"])))
    limit = compute.limits()  # with the server gone: the machine to itself, as the sweep had it
    flops = compute.request_flops(standins[CLASSIFIER], json.loads(PROMPTS.read_text())["prompts"])
    facts["compute limit"] = ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in limit.items())
    for row in rows:
        if row["model"] == CLASSIFIER and "error" not in row and row.get("dtype") in limit:
            row["gflops"] = row["throughput_rps"] * flops / 1e9
            row["share_of_limit"] = compute.share(row["throughput_rps"], flops, limit[row["dtype"]])
    second = second_server(options, standins, results, data)
    return rows, second, mixed, facts


def second_server(options: SuiteOptions, standins: dict[str, Path], results: Path, data: Path) -> list[dict]:
    """The same classifier, float32 and laid out as three-step ensembles, on a second server in the same run:
    what the hardware-chosen precision and the fused layout are measured against."""
    repository = build(
        plan([], [str(standins[CLASSIFIER])], [], GEN_TOKENS),
        BuildOptions(
            output=options.workdir / "perf_repository_float32_ensembles",
            variants=options.second_variants,
            device=options.device,
            dtype="float32",
            runtime=PYTHON_ENSEMBLE,
        ),
    )
    steps = [(s, c) for s in served_models(repository) for c in options.second_concurrency]
    with TritonServer(repository, log_path=results / "tritonserver-second.log") as server:
        (results / "second").mkdir(exist_ok=True)
        return measure_steps(server, steps, options, data, results / "second", "second server")


def step_options(
    options: SuiteOptions, served: Served, concurrency: int, server: TritonServer, data: Path, results: Path
) -> PerfOptions:
    """Generation answers arrive a batch at a time: windows of 2 x concurrency answers (8 at least).
    The baseline answers one request a second, smoothly: time windows, or a window would take minutes."""
    csv_path = results / f"{served.name}.c{concurrency}.csv"
    base = PerfOptions(
        served.name, server.grpc_url, data, concurrency, csv_path, options.window_ms, control_key=server.control_key
    )
    if served.task != "text-generation":
        return base
    if served.variant.perf.reference and concurrency > 1:
        return dataclasses.replace(base, window_ms=options.gen_window_ms)
    return dataclasses.replace(base, request_count=max(8, 2 * concurrency))


def pick(rows: list[dict], model: str, variant: str, concurrency: int, metric: str = "throughput_rps") -> float | None:
    found = (r for r in rows if r["model"] == model and r["variant"] == variant and r["concurrency"] == concurrency)
    return next((r.get(metric) for r in found), None)


def ratio(
    rows: list[dict], model: str, variant: str, versus: str, concurrency: int, metric: str = "throughput_rps"
) -> float | None:
    a, b = pick(rows, model, variant, concurrency, metric), pick(rows, model, versus, concurrency, metric)
    return a / b if a and b else None


@dataclass(frozen=True)
class Target:
    what: str
    goal: float
    measure: Callable[[list[dict], list[dict], dict[str, float]], float | None]  # (rows, second server's, extra)


def versus(what: str, model: str, variant: Variant, base: Variant, concurrency: int, goal: float) -> Target:
    """Throughput of one variant of a model over another's, at one concurrency."""
    label = f"{what}, concurrency {concurrency}: {variant.name} / {base.name}"
    return Target(label, goal, lambda rows, second, extra: ratio(rows, model, variant.name, base.name, concurrency))


def best_versus_baseline(what: str, model: str, concurrency: int, goal: float) -> Target:
    def best(rows: list[dict], second: list[dict], extra: dict[str, float]) -> float | None:
        ratios = [ratio(rows, model, r["variant"], BASELINE.name, concurrency) for r in rows if r["model"] == model]
        return max((r for r in ratios if r is not None), default=None)

    return Target(f"{what}, concurrency {concurrency}: best variant / {BASELINE.name}", goal, best)


def at_every_concurrency(what: str, model: str, variant: Variant, base: Variant, goal: float) -> Target:
    """The worst ratio over the concurrencies both were measured at; any unstable step of ``variant`` fails it."""

    def worst(rows: list[dict], second: list[dict], extra: dict[str, float]) -> float | None:
        mine = [r for r in rows if r["model"] == model and r["variant"] == variant.name]
        if any("error" in r for r in mine):
            return 0.0
        ratios = [ratio(rows, model, variant.name, base.name, int(r["concurrency"])) for r in mine]
        return min((r for r in ratios if r is not None), default=None)

    return Target(f"{what}, every concurrency: {variant.name} / {base.name}", goal, worst)


def versus_second(what: str, model: str, variant: Variant, base: Variant, concurrency: int, goal: float) -> Target:
    """A variant on the first server over a variant on the second (float32, ensembles), at one concurrency."""

    def measured(rows: list[dict], second: list[dict], extra: dict[str, float]) -> float | None:
        a, b = pick(rows, model, variant.name, concurrency), pick(second, model, base.name, concurrency)
        return a / b if a and b else None

    return Target(f"{what}, concurrency {concurrency}: {variant.name} / {base.name} (second server)", goal, measured)


def extra_figure(what: str, key: str, goal: float) -> Target:
    return Target(what, goal, lambda rows, second, extra: extra.get(key))


MIXED = "gpt2, mixed 8..64 new tokens, concurrency 32"
DISTILBERT = "distilbert"
TARGETS = (
    versus(DISTILBERT, CLASSIFIER, PYTHON, BASELINE, 16, 4.0),
    best_versus_baseline(DISTILBERT, CLASSIFIER, 16, 5.0),
    best_versus_baseline(DISTILBERT, CLASSIFIER, 64, 6.0),
    versus_second(f"{DISTILBERT}, int8 against float32", CLASSIFIER, ONNX_INT8, PYTHON, 16, 2.0),
    at_every_concurrency(DISTILBERT, CLASSIFIER, TORCHSCRIPT, PYTHON, 1.0),
    versus_second(f"{DISTILBERT}, fused against ensemble", CLASSIFIER, ONNX, ONNX, 16, 1.0),
    versus("gpt2, 32 new tokens", "gpt2", PYTHON, BASELINE, 32, 10.0),
    extra_figure(f"{MIXED}: output tokens/s, {STREAM.name} / {PYTHON.name}", "mixed_tokens_ratio", 1.5),
    extra_figure(f"{MIXED}: median time to first token, {PYTHON.name} / {STREAM.name}", "mixed_ttft_ratio", 2.0),
)


def run_soak(options: SuiteOptions, seconds: float, concurrency: int = 64, kill_at: float | None = None) -> Path:
    """Soak the python variant of the DistilBERT stand-in (default queue policy), supervised, optionally killing
    its process ``kill_at`` seconds in; results/<timestamp>/soak.json."""
    from tritonhf.perf.soak import soak, write

    results = options.output / datetime.datetime.now().strftime("%Y%m%d-%H%M%S-soak")
    results.mkdir(parents=True)
    standins = write_standins(options.workdir / "standins", "full")
    repository = build(
        plan([], [str(standins[CLASSIFIER])], [], GEN_TOKENS),
        BuildOptions(output=options.workdir / "soak_repository", variants=(PYTHON.name,), device=options.device),
    )
    with TritonServer(repository, log_path=results / "tritonserver.log") as server:
        report = soak(server, CLASSIFIER, json.loads(PROMPTS.read_text())["prompts"], concurrency, seconds, kill_at)
    write(report, results / "soak.json")
    print(report.summary())
    if not report.passed:
        from tritonhf import TritonHFError

        raise TritonHFError(f"soak failed; see {results / 'soak.json'}")
    return results


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)


def run(options: SuiteOptions) -> Path:
    results = options.output / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results.mkdir(parents=True)
    rows, second, mixed, facts = sweep(options, results)
    extra: dict[str, float] = {}
    if mixed:
        concurrency = options.mixed_concurrency
        for row in mixed:
            row["tokens_vs_static"] = ratio(
                mixed, row["model"], row["variant"], PYTHON.name, concurrency, "output_tokens_per_s"
            )
        extra["mixed_tokens_ratio"] = ratio(mixed, "gpt2", STREAM.name, PYTHON.name, concurrency, "output_tokens_per_s")
        extra["mixed_ttft_ratio"] = ratio(mixed, "gpt2", PYTHON.name, STREAM.name, concurrency, "ttft_p50_ms")
        write_csv(mixed, results / "mixed.csv")
    for row in rows:
        row["vs_baseline"] = ratio(rows, row["model"], row["variant"], BASELINE.name, int(row["concurrency"]))
    write_csv(rows, results / "summary.csv")
    if second:
        write_csv(second, results / "second.csv")
    targets = [(t.what, t.goal, t.measure(rows, second, extra)) for t in TARGETS]
    report = summary_markdown(rows, facts, targets, extra, mixed, second)
    (results / "summary.md").write_text(report)
    plot(rows, results / "throughput_latency.png")
    if any("profile" in row for row in mixed):
        plot_mixed(mixed, results / "generation_latency.png")
    print(report)
    print(f"results: {results}")
    return results
