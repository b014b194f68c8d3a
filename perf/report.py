"""The perf report: a Markdown table per model, the targets, a throughput-vs-latency plot and the mixed generation
workload's latency distributions."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from tritonhf.variants import VARIANTS

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def mixed_markdown(mixed: list[dict]) -> list[str]:
    """The mixed generation workload: static python model against the streaming one."""
    if not mixed:
        return []
    intro = (
        f"Each request asks for max_new_tokens uniform in 8..64, at concurrency {mixed[0]['concurrency']:.0f}; "
        "measured from perf_analyzer's profile export "
        "(time to first token: the static model's only answer; inter-token latency: gaps between streamed pieces, "
        "per token)."
    )
    header = (
        "| model | variant | req/s | output tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | inter-token p50 (ms) "
        "| end-to-end p50 (ms) | tokens/s vs static |"
    )
    lines = ["## Generation, mixed workload", "", intro, "", header, "|---|---|---|---|---|---|---|---|---|"]
    for r in mixed:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | not measured: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} "
            f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | "
            f"{fmt(r.get('itl_p50_ms'), '.0f')} | {r['e2e_p50_ms']:.0f} "
            f"| {fmt(r.get('tokens_vs_static'), '.2f', 'x')} |"
        )
    return [*lines, ""]


def second_markdown(rows: list[dict], second: list[dict]) -> list[str]:
    """The second server (float32, three-step ensembles) beside the first server's counterpart of each row."""
    if not second:
        return []
    lines = [
        "## Precision and layout: the same classifier on a second server",
        "",
        (
            "Same run, same machine, right after the sweep: the python model in float32 and the exported variants as "
            "three-step ensembles (tokenize -> network -> postprocess, each a Python-backend process). First server: "
            "the dtype `auto` chose and the fused layout."
        ),
        "",
        "| variant | concurrency | second: dtype, layout | req/s | first: dtype, layout | req/s | first / second |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in second:
        first = next(
            (
                f
                for f in rows
                if (f["model"], f["variant"], f["concurrency"]) == (r["model"], r["variant"], r["concurrency"])
            ),
            {},
        )
        mine, theirs = r.get("throughput_rps"), first.get("throughput_rps")
        lines.append(
            f"| {r['variant']} | {r['concurrency']:.0f} | {r['dtype']}, {r['layout']} | {fmt(mine, '.1f')} "
            f"| {first.get('dtype', '?')}, {first.get('layout', '?')} | {fmt(theirs, '.1f')} "
            f"| {fmt(theirs / mine if mine and theirs else None, '.2f', 'x')} |"
        )
    return [*lines, ""]


def in_process_markdown(rows: list[dict]) -> list[str]:
    """Served throughput against the same step run in-process at the batch the server formed."""
    measured = [r for r in rows if "in_process_rps" in r]
    if not measured:
        return []
    lines = [
        "## Served against in-process",
        "",
        (
            "Each classification model's step run in this process from its config.pbtxt (one instance, its threads), "
            "at the average batch the server formed at concurrency 32, against what the server delivered there with "
            "all its instances."
        ),
        "",
        (
            "| variant | dtype, layout | batch formed | in-process req/s (one instance) | served req/s "
            "| served / in-process |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for r in measured:
        lines.append(
            f"| {r['variant']} | {r['dtype']}, {r['layout']} | {r['avg_batch']:.1f} | {r['in_process_rps']:.1f} "
            f"| {r['throughput_rps']:.1f} | {r['throughput_rps'] / r['in_process_rps']:.2f}x |"
        )
    return [*lines, ""]


def compute_markdown(rows: list[dict], facts: dict[str, str]) -> list[str]:
    """Each classification variant at its highest throughput, as a share of the machine's limit in its precision."""
    best: dict[str, dict] = {}
    for r in rows:
        if "share_of_limit" in r and r["share_of_limit"] > best.get(r["variant"], {}).get("share_of_limit", -1):
            best[r["variant"]] = r
    if not best:
        return []
    lines = [
        "## Share of this machine's compute limit",
        "",
        (
            f"The limit, probed in this run after the sweep (matrix multiplies of a transformer layer's shape over "
            f"every CPU, the variants' own kernels): {facts.get('compute limit', '?')}. A request's work: FLOPs "
            "counted over one unpadded forward per prompt. Each variant at its highest throughput of the sweep."
        ),
        "",
        "| variant | dtype | concurrency | req/s | served GFLOP/s | share of the limit in its dtype |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(best.values(), key=lambda r: -r["share_of_limit"]):
        lines.append(
            f"| {r['variant']} | {r['dtype']} | {r['concurrency']:.0f} | {r['throughput_rps']:.1f} "
            f"| {r['gflops']:.0f} | {r['share_of_limit']:.0%} |"
        )
    return [*lines, ""]


def summary_markdown(
    rows: list[dict],
    facts: dict[str, str],
    targets: Sequence[tuple[str, float, float | None]],
    extra: dict[str, float],
    mixed: Sequence[dict] = (),
    second: Sequence[dict] = (),
) -> str:
    lines = ["# tritonhf perf report", "", " | ".join(f"**{k}** {v}" for k, v in facts.items()), ""]
    method = (
        "Measured in one run on this machine: perf_analyzer over gRPC, fixed concurrency, time windows as above; "
        "ratios are against the tutorial's one-request-at-a-time baseline at the same concurrency. "
        "avg batch = requests / executions of the network step (server metrics); "
        "queue and compute are per request, summed over the steps."
    )
    lines += [method, ""]
    for model, group in groupby(rows, key=lambda r: r["model"]):
        lines += [
            f"## {model}",
            "",
            (
                "| variant | dtype | layout | concurrency | throughput (req/s) | p50 (ms) | p95 (ms) | avg batch "
                "| queue (ms) | compute (ms) | vs baseline |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            group, key=lambda r: (r["concurrency"], not VARIANTS[r["variant"]].perf.reference, r["variant"])
        ):
            head = f"| {r['variant']} | {r.get('dtype', '?')} | {r.get('layout', '?')} | {r['concurrency']:.0f} |"
            if "error" in r:
                lines.append(f"{head} not measured: {r['error']} | | | | | | |")
                continue
            flag = "" if r.get("stability_percent", 20) <= 20 else f" (±{r['stability_percent']:.0f}%)"
            lines.append(
                f"{head} {r['throughput_rps']:.1f}{flag} "
                f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                f"{r['avg_batch']:.1f} | {r['queue_ms']:.0f} | {r['compute_ms']:.0f} "
                f"| {fmt(r.get('vs_baseline'), '.2f', 'x')} |"
            )
        lines.append("")
    lines += second_markdown(rows, list(second))
    lines += in_process_markdown(rows)
    lines += compute_markdown(rows, facts)
    lines += mixed_markdown(list(mixed))
    lines += ["## Targets", "", "| target | goal | measured | |", "|---|---|---|---|"]
    for what, goal, measured in targets:
        verdict = (
            "n/a" if measured is None else ("met" if measured >= goal else f"MISSED by {(goal - measured) / goal:.0%}")
        )
        lines.append(f"| {what} | >= {goal:.2f} | {fmt(measured, '.2f')} | {verdict} |")
    return "\n".join(lines) + "\n"


def pyplot():  # noqa: ANN201 - matplotlib, headless, imported only when plotting
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8})
    return plt


def log_x(axis: Axes) -> None:
    """A log x axis labelled at 1, 2 and 5 of each decade only: minor labels overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_xscale("log")
    axis.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())


def save(figure: Figure, title: str, path: Path) -> None:
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot(rows: list[dict], path: Path) -> None:
    """Throughput against p95 latency, one line per variant, one panel per model."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == model):
            points = sorted(
                (r for r in rows if r["model"] == model and r["variant"] == variant and "error" not in r),
                key=lambda r: r["concurrency"],
            )
            axis.plot([p["p95_ms"] for p in points], [p["throughput_rps"] for p in points], marker="o", label=variant)
            for p in points:
                axis.annotate(
                    f"{p['concurrency']:.0f}",
                    (p["p95_ms"], p["throughput_rps"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        axis.set(title=model, xlabel="p95 latency (ms, log)", ylabel="throughput (req/s)")
        log_x(axis)
        axis.legend()
    save(figure, "throughput vs p95 latency (labels: concurrency)", path)
    plt.close(figure)


def plot_mixed(mixed: Sequence[dict], path: Path) -> None:
    """The mixed workload, request by request: share of requests answered within a time, first token and last, per
    variant."""
    from tritonhf.perf.generation import profile_samples

    plt = pyplot()
    measured = [r for r in mixed if "profile" in r]
    models = list(dict.fromkeys(r["model"] for r in measured))
    figure, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        for color, row in zip(("tab:orange", "tab:green", "tab:blue"), (r for r in measured if r["model"] == model)):
            samples = profile_samples(Path(row["profile"]))
            streamed = VARIANTS[row["variant"]].streams
            curves = (
                (("ttft_ms", "-", "first token"), ("e2e_ms", ":", "last token"))
                if streamed
                else (("e2e_ms", "-", "its one answer"),)
            )
            for key, style, what in curves:
                values = sorted(samples[key])
                axis.step(
                    values,
                    [(i + 1) / len(values) for i in range(len(values))],
                    style,
                    color=color,
                    where="post",
                    label=f"{row['variant']}: {what}",
                )
        axis.set(
            title=f"{model}, concurrency {measured[0]['concurrency']:.0f}",
            xlabel="time since the request was sent (ms, log)",
            ylabel="share of requests",
        )
        log_x(axis)
        axis.legend()
    save(figure, "mixed generation workload (max_new_tokens uniform in 8..64): static vs stream", path)
    plt.close(figure)
