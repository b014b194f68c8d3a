"""A tuned repository side by side with the one it was tuned from, in one run: every variant of one model in both,
at a few concurrencies, in interleaved rounds (a new order every round), one model loaded at a time.

    python -m tritonhf.perf.versus --untuned model_repository --tuned tuned_repository --model NAME

Two servers run, one per repository, with nothing loaded but the model being measured (loaded, measured at each
concurrency, unloaded). Per model and concurrency: the median of the rounds; the noise is the spread of the
untuned ``<name>``'s rounds. The verdict, per concurrency: the tuned ``<name>`` against the fastest model of either
repository (the goal: 95% of it or more), and against the untuned ``<name>`` (never below it beyond the noise).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from tritonhf.perf.analyzer import PerfOptions, data_file, measure
from tritonhf.repository import read_manifest
from tritonhf.server import TritonServer, find_installation

SHARE_OF_FASTEST = 0.95


def family(repository: Path, name: str) -> list[str]:
    """The served models of ``name``'s source and task: the plain name first."""
    manifest = read_manifest(repository)
    source, task = manifest[name]["source"], manifest[name]["task"]
    others = sorted(n for n, e in manifest.items() if e["source"] == source and e["task"] == task and n != name)
    return [name, *(n for n in others if not n.endswith("_baseline"))]


def run(
    untuned: Path, tuned: Path, name: str, concurrencies: list[int], rounds: int, window_ms: int, work: Path
) -> str:
    work.mkdir(parents=True, exist_ok=True)
    data = data_file(work / "prompts.json")
    env = find_installation().env
    repositories = {"untuned": untuned, "tuned": tuned}
    entries = [(label, model) for label, path in repositories.items() for model in family(path, name)]
    figures: dict[tuple[str, str, int], list[float]] = {}
    with ExitStack() as stack:
        servers = {label: stack.enter_context(TritonServer(path, models=())) for label, path in repositories.items()}
        rng = random.Random(0)
        bar = tqdm(total=rounds * len(entries) * len(concurrencies), desc="side by side", unit="point")
        for _ in range(rounds):
            for label, model in rng.sample(entries, len(entries)):
                server = servers[label]
                server.control("load", model)
                for concurrency in concurrencies:
                    options = PerfOptions(
                        model, server.grpc_url, data, concurrency, work / "last.csv", window_ms,
                        control_key=server.control_key,
                    )  # fmt: skip
                    figures.setdefault((label, model, concurrency), []).append(measure(options, env)["throughput_rps"])
                    bar.update(1)
                server.control("unload", model)
        bar.close()
    (work / "figures.json").write_text(json.dumps({" ".join(map(str, k)): v for k, v in figures.items()}, indent=1))
    return table(figures, name, concurrencies)


def table(figures: dict[tuple[str, str, int], list[float]], name: str, concurrencies: list[int]) -> str:
    medians = {key: statistics.median(values) for key, values in figures.items()}
    lines = [
        "| repository | model | " + " | ".join(f"c{c} req/s" for c in concurrencies) + " |",
        "|---|---|" + "---|" * len(concurrencies),
    ]
    for label, model in dict.fromkeys((label, model) for label, model, _ in figures):
        cells = [f"{medians[(label, model, c)]:.1f}" for c in concurrencies]
        lines.append(f"| {label} | {model} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in concurrencies:
        base = figures[("untuned", name, c)]
        noise = (max(base) - min(base)) / statistics.median(base)
        fastest = max((v, f"{label} {model}") for (label, model, cc), v in medians.items() if cc == c)
        mine, untuned = medians[("tuned", name, c)], medians[("untuned", name, c)]
        share_ok = mine >= SHARE_OF_FASTEST * fastest[0]
        lines.append(
            f"- c{c}: tuned {name} {mine:.1f}/s = {mine / fastest[0]:.0%} of the fastest ({fastest[1]},"
            f" {fastest[0]:.1f}/s): {'met' if share_ok else 'MISSED'}; {mine / untuned:.2f}x the untuned {name}"
            f" (noise {noise:.0%}): {'met' if mine >= untuned * (1 - noise) else 'MISSED'}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m tritonhf.perf.versus")
    parser.add_argument("--untuned", type=Path, required=True)
    parser.add_argument("--tuned", type=Path, required=True)
    parser.add_argument("--model", required=True, help="the plain name")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path("versus"))
    args = parser.parse_args(argv)
    text = run(args.untuned, args.tuned, args.model, args.concurrency, args.rounds, args.window_ms, args.work)
    (args.work / "versus.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
