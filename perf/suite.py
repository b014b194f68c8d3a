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

from tritonhf.perf.analyzer import PerfAnalyzerError, PerfOptions, measure
from tritonhf.perf.generation import measure_mixed, mixed_data
from tritonhf.perf.metrics import server_side, snapshot
from tritonhf.perf.report import plot, plot_mixed, summary_markdown
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import read_manifest
from tritonhf.server import TritonServer, find_installation
from tritonhf.standins import write_standins
from tritonhf.variants import BASELINE, FUSED, ONNX, ONNX_INT8, PYTHON, STREAM, VARIANTS, Variant

PROMPTS = Path(__file__).with_name("prompts.json")
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


def data_file(path: Path) -> Path:
    """perf_analyzer's input format: one entry per prompt, cycled."""
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    path.write_text(json.dumps({"data": [{"prompt": [p]} for p in prompts]}))
    return path


def in_process_throughput(source: str, batch: int, seconds: float = 10.0) -> float:
    """req/s of the python variant's own batched step, no server: the ceiling Triton's overhead is measured against."""
    from tritonhf.backends.python_hf.tasks import load_task

    task = load_task(source, "text-classification")
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    batches = [[prompts[(i * batch + j) % len(prompts)] for j in range(batch)] for i in range(len(prompts))]
    task(batches[0])  # warm-up
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        task(batches[i % len(batches)])
        done, i = done + batch, i + 1
    return done / (time.perf_counter() - start)


def sweep(options: SuiteOptions, results: Path) -> tuple[list[dict], list[dict], dict[str, str], Path]:
    standins = write_standins(options.workdir / "standins", "full")
    entries = plan(
        [str(standins[m]) for m in options.gen_models], [str(standins[CLASSIFIER])], [], GEN_TOKENS, GEN_TOKENS
    )
    repository = build(
        entries,
        BuildOptions(output=options.workdir / "perf_repository", variants=tuple(VARIANTS), device=options.device),
    )
    data = data_file(results / "prompts.data.json")
    rows = []
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
        for served, concurrency in tqdm(plan_steps, desc="perf sweep", unit="step"):
            row = {
                "model": served.base,
                "task": served.task,
                "variant": served.variant.name,
                "concurrency": concurrency,
            }
            before = snapshot(server.metrics_url)
            try:
                measured = measure(step_options(options, served, concurrency, server.grpc_url, data, results), env)
            except PerfAnalyzerError as err:  # a noisy step is reported as such; the sweep goes on
                rows.append({**row, "error": str(err).splitlines()[-1]})
                continue
            rows.append(
                {
                    **row,
                    **measured,
                    **server_side(before, snapshot(server.metrics_url), served.network, served.pipeline),
                }
            )
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
                        ),
                    }
                )
            except (PerfAnalyzerError, ValueError) as err:
                mixed.append({**row, "error": str(err).splitlines()[-1]})
    return rows, mixed, facts, standins[CLASSIFIER]


def step_options(
    options: SuiteOptions, served: Served, concurrency: int, url: str, data: Path, results: Path
) -> PerfOptions:
    """Generation answers arrive a batch at a time: windows of 2 x concurrency answers (8 at least).
    The baseline answers one request a second, smoothly: time windows, or a window would take minutes."""
    base = PerfOptions(
        served.name, url, data, concurrency, results / f"{served.name}.c{concurrency}.csv", options.window_ms
    )
    if served.task != "text-generation":
        return base
    if served.variant.perf.reference and concurrency > 1:
        return dataclasses.replace(base, window_ms=options.gen_window_ms)
    return dataclasses.replace(base, request_count=max(8, 2 * concurrency))


def ratio(
    rows: list[dict], model: str, variant: str, versus: str, concurrency: int, metric: str = "throughput_rps"
) -> float | None:
    def pick(v: str) -> float | None:
        return next(
            (
                r.get(metric)
                for r in rows
                if r["model"] == model and r["variant"] == v and r["concurrency"] == concurrency
            ),
            None,
        )

    a, b = pick(variant), pick(versus)
    return a / b if a and b else None


@dataclass(frozen=True)
class Target:
    what: str
    goal: float
    measure: Callable[[list[dict], dict[str, float]], float | None]


def versus(what: str, model: str, variant: Variant, base: Variant, concurrency: int, goal: float) -> Target:
    """Throughput of one variant of a model over another's, at one concurrency."""
    label = f"{what}, concurrency {concurrency}: {variant.name} / {base.name}"
    return Target(label, goal, lambda rows, extra: ratio(rows, model, variant.name, base.name, concurrency))


def extra_figure(what: str, key: str, goal: float) -> Target:
    return Target(what, goal, lambda rows, extra: extra.get(key))


MIXED = "gpt2, mixed 8..64 new tokens, concurrency 32"
TARGETS = (
    versus("distilbert", CLASSIFIER, PYTHON, BASELINE, 16, 2.2),
    versus("distilbert", CLASSIFIER, ONNX, PYTHON, 16, 1.3),
    versus("distilbert", CLASSIFIER, ONNX_INT8, PYTHON, 16, 2.0),
    versus("gpt2, 32 new tokens", "gpt2", PYTHON, BASELINE, 32, 5.0),
    extra_figure(
        f"Triton overhead: {PYTHON.name} at concurrency 32 / in-process step at the batch formed", "overhead_ratio", 0.8
    ),
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
    rows, mixed, facts, classifier = sweep(options, results)
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
    served32 = next(
        (
            r
            for r in rows
            if r["model"] == CLASSIFIER and r["variant"] == PYTHON.name and r["concurrency"] == 32 and "error" not in r
        ),
        None,
    )
    if served32:
        batch = max(1, round(served32["avg_batch"]))
        extra["in_process_rps"] = in_process_throughput(str(classifier), batch)
        extra["in_process_batch"] = batch
        extra["overhead_ratio"] = served32["throughput_rps"] / extra["in_process_rps"]
    for row in rows:
        row["vs_baseline"] = ratio(rows, row["model"], row["variant"], BASELINE.name, int(row["concurrency"]))
    write_csv(rows, results / "summary.csv")
    targets = [(t.what, t.goal, t.measure(rows, extra)) for t in TARGETS]
    report = summary_markdown(rows, facts, targets, extra, mixed)
    (results / "summary.md").write_text(report)
    plot(rows, results / "throughput_latency.png")
    if any("profile" in row for row in mixed):
        plot_mixed(mixed, results / "generation_latency.png")
    print(report)
    print(f"results: {results}")
    return results
