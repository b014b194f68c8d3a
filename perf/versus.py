"""Tuned repositories side by side with the one they were tuned from, in one run: every variant of one model in
each, at a few concurrencies, in interleaved rounds (a new order every round), one model loaded at a time.

    python -m tritonhf.perf.versus --untuned model_repository --tuned tuned_repository [another ...] --model NAME

One server runs per repository, with nothing loaded but the model being measured (loaded, measured at each
concurrency, unloaded). Per model and concurrency: the median of the rounds; the noise is the median over the
models of the spread of their rounds (max - min over the median). The verdict, per concurrency and tuned
repository: its ``<name>`` against the fastest model of any repository (the goal: 95% of it or more; a miss inside
the noise says so), and against the untuned ``<name>`` (never below it beyond the noise); with two tuned
repositories or more (separate tunes of the same source), how far apart their ``<name>``s are (the goal: within
10%).
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
AGREE = 0.10  # separate tunes' <name>s: within this of each other


def family(repository: Path, name: str) -> list[str]:
    """The served models of ``name``'s source and task: the plain name first."""
    manifest = read_manifest(repository)
    source, task = manifest[name]["source"], manifest[name]["task"]
    others = sorted(n for n, e in manifest.items() if e["source"] == source and e["task"] == task and n != name)
    return [name, *(n for n in others if not n.endswith("_baseline"))]


def run(
    untuned: Path, tuned: list[Path], name: str, concurrencies: list[int], rounds: int, window_ms: int, work: Path
) -> str:
    work.mkdir(parents=True, exist_ok=True)
    data = data_file(work / "prompts.json")
    env = find_installation().env
    labels = ["tuned"] if len(tuned) == 1 else [f"tuned {i}" for i in range(1, len(tuned) + 1)]
    repositories = {"untuned": untuned, **dict(zip(labels, tuned))}
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
    tuned = [label for label in dict.fromkeys(label for label, _, _ in figures) if label != "untuned"]
    for c in concurrencies:
        noise = statistics.median(
            (max(v) - min(v)) / statistics.median(v) for (_, _, cc), v in figures.items() if cc == c
        )
        fastest = max((v, f"{label} {model}") for (label, model, cc), v in medians.items() if cc == c)
        untuned = medians[("untuned", name, c)]
        for label in tuned:
            mine = medians[(label, name, c)]
            if mine >= SHARE_OF_FASTEST * fastest[0]:
                share = "met"
            else:
                share = "MISSED, inside the noise" if mine >= fastest[0] * (1 - noise) else "MISSED"
            lines.append(
                f"- c{c}: {label} {name} {mine:.1f}/s = {mine / fastest[0]:.0%} of the fastest ({fastest[1]},"
                f" {fastest[0]:.1f}/s): {share}; {mine / untuned:.2f}x the untuned {name}"
                f" (noise {noise:.0%}): {'met' if mine >= untuned * (1 - noise) else 'MISSED'}"
            )
        if len(tuned) > 1:
            theirs = [medians[(label, name, c)] for label in tuned]
            apart = max(theirs) / min(theirs) - 1
            lines.append(
                f"- c{c}: the {len(tuned)} tuned {name}s are {apart:.1%} apart:"
                f" {'met' if apart <= AGREE else 'MISSED'} (within {AGREE:.0%})"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m tritonhf.perf.versus")
    parser.add_argument("--untuned", type=Path, required=True)
    parser.add_argument("--tuned", type=Path, nargs="+", required=True, help="one tuned repository, or several")
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
