"""The perf report: a Markdown table per model, the targets, and a throughput-vs-latency plot."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from pathlib import Path


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def mixed_markdown(mixed: list[dict]) -> list[str]:
    """The mixed generation workload: static python model against the streaming one."""
    if not mixed:
        return []
    lines = ["## Generation, mixed workload", "",
             f"Each request asks for max_new_tokens uniform in 8..64, at concurrency {mixed[0]['concurrency']:.0f}; measured from perf_analyzer's profile export "
             "(time to first token: the static model's only answer; inter-token latency: gaps between streamed pieces, per token).", "",
             "| model | variant | req/s | output tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | inter-token p50 (ms) | end-to-end p50 (ms) | tokens/s vs static |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in mixed:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | not measured: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | "
            f"{fmt(r.get('itl_p50_ms'), '.0f')} | {r['e2e_p50_ms']:.0f} | {fmt(r.get('tokens_vs_static'), '.2f', 'x')} |"
        )
    return [*lines, ""]


def summary_markdown(rows: list[dict], facts: dict[str, str], targets: Sequence[tuple[str, float, float | None]], extra: dict[str, float], mixed: Sequence[dict] = ()) -> str:
    lines = ["# tritonhf perf report", "", " | ".join(f"**{k}** {v}" for k, v in facts.items()), ""]
    lines += ["Measured in one run on this machine: perf_analyzer over gRPC, fixed concurrency, time windows as above; "
              "ratios are against the tutorial's one-request-at-a-time baseline at the same concurrency. "
              "avg batch = requests / executions of the network step (server metrics); queue and compute are per request, summed over the steps.", ""]  # fmt: skip
    for model, group in groupby(rows, key=lambda r: r["model"]):
        lines += [f"## {model}", "", "| variant | concurrency | throughput (req/s) | p50 (ms) | p95 (ms) | avg batch | queue (ms) | compute (ms) | vs baseline |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(group, key=lambda r: (r["concurrency"], r["variant"] != "baseline", r["variant"])):
            if "error" in r:
                lines.append(f"| {r['variant']} | {r['concurrency']:.0f} | not measured: {r['error']} | | | | | | |")
                continue
            flag = "" if r.get("stability_percent", 20) <= 20 else f" (±{r['stability_percent']:.0f}%)"
            lines.append(
                f"| {r['variant']} | {r['concurrency']:.0f} | {r['throughput_rps']:.1f}{flag} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                f"{r['avg_batch']:.1f} | {r['queue_ms']:.0f} | {r['compute_ms']:.0f} | {fmt(r.get('vs_baseline'), '.2f', 'x')} |"
            )
        lines.append("")
    lines += mixed_markdown(list(mixed))
    lines += ["## Targets", "", "| target | goal | measured | |", "|---|---|---|---|"]
    for what, goal, measured in targets:
        verdict = "n/a" if measured is None else ("met" if measured >= goal else f"MISSED by {(goal - measured) / goal:.0%}")
        lines.append(f"| {what} | >= {goal:.2f} | {fmt(measured, '.2f')} | {verdict} |")
    if "in_process_rps" in extra:
        lines += ["", f"In-process batched step (no server) at batch {extra['in_process_batch']:.0f}: {extra['in_process_rps']:.1f} req/s."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Throughput against p95 latency, one line per variant, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == model):
            points = sorted((r for r in rows if r["model"] == model and r["variant"] == variant and "error" not in r), key=lambda r: r["concurrency"])
            axis.plot([p["p95_ms"] for p in points], [p["throughput_rps"] for p in points], marker="o", label=variant)
            for p in points:
                axis.annotate(f"{p['concurrency']:.0f}", (p["p95_ms"], p["throughput_rps"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set(title=model, xlabel="p95 latency (ms, log)", ylabel="throughput (req/s)", xscale="log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("throughput vs p95 latency (labels: concurrency)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
