"""``tritonhf tune``'s first, cheap look: every variant (and precision) of a model timed in this process, before any
server, to drop the clear losers and to fit the length-bucket overhead of each one on this machine.

Each variant's own step (what its model.py runs, from its config.pbtxt: backends/python_hf/steps.load_step) is
timed at a few shapes, one padded forward each (``forward_overhead_tokens`` 1e9): ``ROWS`` rows of ``WORDS``
words. A forward costs about ``a + b x rows x tokens``; the least-squares fit gives the overhead in token-times,
``a / b``, that ``length_buckets`` weighs padding against (the config parameter ``forward_overhead_tokens``;
measured once on one Xeon before: 35 on every CPU). Threads: the default layout's, one instance's share of the CPUs.

A variant whose rows/s at the largest shape is below ``KEEP`` of the best is not screened live: the live search
only measures what could win. The margin is wide on purpose: in-process timing sees no server, no tokenizer
contention between instances, no queueing.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tritonhf.tuning import Candidate, Space

ROWS = (1, 4, 16)
WORDS = (8, 32, 96)
SECONDS = 0.4  # per shape, at least two forwards
KEEP = 0.5  # of the best in-process rate: below it, a variant is left out of the live search
UNBUCKETED = "1e9"  # forward_overhead_tokens that forces one padded forward


@dataclass(frozen=True)
class Timing:
    variant: str
    dtype: str
    seconds: dict[tuple[int, int], float]  # (rows, words) -> one forward
    overhead_tokens: float  # the fit's a / b, in token-times

    @property
    def rate(self) -> float:
        """Rows/s at the largest shape timed."""
        rows, words = ROWS[-1], WORDS[-1]
        return rows / self.seconds[(rows, words)]


def fit_overhead(seconds: dict[tuple[int, int], float], special_tokens: int = 2) -> float:
    """``a / b`` of ``t = a + b x rows x tokens`` by least squares on relative errors (tokens = words + the special
    tokens). Relative, because the overhead shows only at the small shapes, and attention's cost grows faster than
    the tokens at the large ones: an absolute fit, ruled by its largest times, put the intercept below zero for ONNX
    int8 on a 2-core EPYC (6 ms at 1 x 8 words, 555 ms at 16 x 96), an overhead of 0 that split every batch into
    many small forwards, 12-14% slower served than the relative fit's 10."""
    work = np.array([rows * (words + special_tokens) for rows, words in seconds], dtype=float)
    times = np.array(list(seconds.values()))
    b, a = np.polyfit(work, times, 1, w=1 / times)
    return float(max(0.0, a) / b) if b > 0 else float("inf")


def best_of(call: Callable[[], object], seconds: float = SECONDS) -> float:
    """The fastest of repeated calls (after one to warm up), over about ``seconds``."""
    call()
    times: list[float] = []
    while len(times) < 2 or sum(times) < seconds:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


Configure = Callable[[Candidate], dict]  # a candidate's config (tune.configured)


def time_candidate(repository: Path, candidate: Candidate, configure: Configure) -> Timing:
    import torch

    from tritonhf.backends.python_hf.steps import load_step

    config = configure(candidate)
    config["parameters"]["forward_overhead_tokens"] = {"string_value": UNBUCKETED}
    threads = torch.get_num_threads()  # this process's, restored after
    gpu = config["instance_group"][0].get("kind") == "KIND_GPU"
    step, context = load_step(config, repository / candidate.variant / "1", "cuda:0" if gpu else "cpu")
    torch.set_num_threads(int(context.parameters.get("cpu_threads", threads)))
    try:
        seconds = {
            (rows, words): best_of(lambda rows=rows, words=words: step([" ".join(["hello"] * words)] * rows))
            for rows in ROWS
            for words in WORDS
        }
    finally:
        torch.set_num_threads(threads)
    return Timing(candidate.variant, candidate.dtype, seconds, fit_overhead(seconds))


def prescreen(repository: Path, space: Space, configure: Configure) -> tuple[Space, dict[tuple[str, str], Timing]]:
    """The space without the variants far behind in-process, and each variant's timing (its fitted overhead)."""
    timings = {}
    for candidate in tqdm(space.screened(), desc="in-process timing", unit="variant"):
        timings[(candidate.variant, candidate.dtype)] = time_candidate(repository, candidate, configure)
        gc.collect()  # one model in memory at a time
    top = max(t.rate for t in timings.values())
    kept = {
        variant: tuple(d for d in dtypes if timings[(variant, d)].rate >= KEEP * top)
        for variant, dtypes in space.variants.items()
    }
    return replace(space, variants={v: d for v, d in kept.items() if d}), timings
