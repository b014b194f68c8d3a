"""A brute-force grid of ``tritonhf tune``'s space, measured once on one machine and committed (perf/grids/): the
truth that the search is held to by a replay test (tests/test_grid_replay.py).

Every candidate of the space (``Space.everything()``: the default, and every variant in every precision it may
load in, at every instance count, ``max_batch_size`` and queue delay) is loaded in one running server, as the tune
loads it, and measured along a ladder of concurrencies 1, 2, 4, ...: up to the first errors or refusals, or the
first doubling from 4 on that gains no more than ``SATURATED`` (past that, a closed-loop load only queues:
throughput stays, latency grows with the concurrency, and the replay extrapolates so). Each point is three windows
of ``--window-ms``, taken as they come. Then ``REPEATS`` candidates drawn at random are measured again at their
recorded points: the machine's noise, which the replay draws from. Last, the ``CONFIRMED`` leaders are measured
``CONFIRM_ROUNDS`` times more at their best point, and the replay takes the median there: the best of a thousand
single measurements is partly luck (the winner's curse), and a search can't be held to luck.

    python -m tritonhf.perf.grid --model-repository model_repository --model NAME --output perf/grids/NAME.csv

Resumable: points already in the CSV are not measured again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tritonhf.perf.analyzer import ANY_WINDOWS
from tritonhf.server import TritonServer
from tritonhf.tune import Live, Trials, machine_record, read_points, read_trials, spaces
from tritonhf.tuning import MAX_CONCURRENCY, Candidate, Measure, Point, Space, best_per_candidate, median_point

SATURATED = 0.03  # a doubling of the load that gains no more than this share of throughput
REPEATS = 12  # candidates measured again, every point of their ladder: the noise
CONFIRMED, CONFIRM_ROUNDS = 10, 3  # the leaders' best points, measured again: the grid's best is their median


Done = dict[tuple[Candidate, int], Point]


def ladder(candidate: Candidate, measure: Measure, done: Done, record: Callable[[Point], Point]) -> None:
    """The candidate along doubling concurrencies, until errors, or a doubling from 4 on without a gain."""
    best, concurrency = 0.0, 1
    while concurrency <= MAX_CONCURRENCY:
        point = done.get((candidate, concurrency)) or record(measure(candidate, concurrency))
        if point.errors or point.throughput <= 0 or (concurrency >= 4 and point.throughput <= best * (1 + SATURATED)):
            return
        best = max(best, point.throughput)
        concurrency *= 2


MIN_REPEATS = 4  # repeated points of a family before its own noise is taken


def spread(logs: list[float]) -> float:
    """One measurement's sd of log throughput, from differences of two measurements (twice its variance)."""
    return statistics.stdev(logs) / math.sqrt(2) if len(logs) > 1 else 0.0


def leaders(done: Done, count: int = CONFIRMED) -> list[Point]:
    """The ``count`` candidates whose best clean point is highest, each at that point."""
    best = best_per_candidate(p for p in done.values() if p.passes(None))
    return sorted(best.values(), key=lambda p: -p.throughput)[:count]


def record_grid(repository: Path, model: str, output: Path, window_ms: int, seed: int = 0) -> None:
    [space] = spaces(repository, [model]).values()
    output.parent.mkdir(parents=True, exist_ok=True)
    done = read_trials(output, model, phase="grid")
    repeated = read_trials(output, model, phase="repeat")
    trials = Trials(output)
    record = {**machine_record(None), "window_ms": window_ms, "model": model, "space": dataclasses.asdict(space)}
    output.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    workdir = output.with_suffix(".work")
    workdir.mkdir(exist_ok=True)
    with TritonServer(repository, models=()) as server:
        live = Live(server, repository, workdir, window_ms, stability_percent=ANY_WINDOWS)

        def keep(phase: str) -> Callable[[Point], Point]:
            def add(point: Point) -> Point:
                trials.add(model, point, phase)
                return point

            return add

        for candidate in tqdm(space.everything(), desc=f"grid {model}", unit="candidate"):
            ladder(candidate, live, done, keep("grid"))
        done = read_trials(output, model, phase="grid")
        again = random.Random(seed).sample(sorted({c for c, _ in done}), REPEATS)
        for candidate in tqdm(again, desc="noise", unit="candidate"):
            for c, concurrency in sorted(done, key=lambda key: key[1]):
                if c == candidate and (c, concurrency) not in repeated:
                    keep("repeat")(live(candidate, concurrency))
        confirmed = Counter((p.candidate, p.concurrency) for p in read_points(output, model, "confirm"))
        for point in tqdm(leaders(done), desc="the leaders, again", unit="candidate"):
            for _ in range(CONFIRM_ROUNDS - confirmed[(point.candidate, point.concurrency)]):
                keep("confirm")(live(point.candidate, point.concurrency))
    for lost in live.lost:
        print(f"lost a trial: {lost}")


@dataclass
class Grid:
    """A recorded grid, as the replay reads it: each candidate's ladder, the space it covers, the measured noise."""

    space: Space
    ladders: dict[Candidate, list[Point]]  # by concurrency
    noise: float  # one measurement's relative spread (the sd of log throughput), from all the repeats
    measurements: int  # the grid's, repeats excluded
    families: dict[tuple[str, int], float] = dataclasses.field(default_factory=dict)  # (variant, instances): its noise

    def noise_of(self, candidate: Candidate) -> float:
        """Its family's noise where the repeats measured enough of it (one instance of two threads can be far
        noisier than two of one), else the grid's."""
        return self.families.get((candidate.variant, candidate.instances), self.noise)

    @classmethod
    def load(cls, path: Path) -> Grid:
        record = json.loads(path.with_suffix(".json").read_text())
        raw = record["space"]
        space = Space(
            Candidate(**raw["default"]),
            {v: tuple(d) for v, d in raw["variants"].items()},
            *(tuple(raw[k]) for k in ("instances", "batch_sizes", "delays_us")),
        )
        grid = read_trials(path, record["model"], phase="grid")
        repeats = read_trials(path, record["model"], phase="repeat")
        confirms: dict[tuple[Candidate, int], list[Point]] = {}
        for point in read_points(path, record["model"], "confirm"):
            confirms.setdefault((point.candidate, point.concurrency), []).append(point)
        ladders: dict[Candidate, list[Point]] = {}
        for (candidate, concurrency), point in sorted(grid.items(), key=lambda kv: kv[0][1]):  # a leader: the median
            ladders.setdefault(candidate, []).append(median_point([point, *confirms.get((candidate, concurrency), [])]))
        logs: dict[tuple[str, int], list[float]] = {}  # per family: a variant at an instance count
        for key, point in repeats.items():
            if min(point.throughput, grid[key].throughput) > 0:
                family = (point.candidate.variant, point.candidate.instances)
                logs.setdefault(family, []).append(math.log(point.throughput / grid[key].throughput))
        everything = [x for found in logs.values() for x in found]
        families = {family: spread(found) for family, found in logs.items() if len(found) >= MIN_REPEATS}
        return cls(space, ladders, spread(everything), len(grid), families)

    def truth(self, candidate: Candidate, concurrency: int) -> Point:
        """The recorded point; between two, interpolated on log concurrency; past the last one, its throughput with
        latency growing with the load (a saturated closed loop), or its errors; past a clean point and before one with
        errors, errors."""
        ladder = self.ladders[candidate]
        below = [p for p in ladder if p.concurrency <= concurrency]
        above = [p for p in ladder if p.concurrency >= concurrency]
        low = below[-1] if below else ladder[0]
        if not above:
            return dataclasses.replace(low, concurrency=concurrency, p99_ms=low.p99_ms * concurrency / low.concurrency)
        high = above[0]
        if high.concurrency == low.concurrency or high.errors:
            return dataclasses.replace(high, concurrency=concurrency)
        share = math.log(concurrency / low.concurrency) / math.log(high.concurrency / low.concurrency)
        return Point(
            candidate,
            concurrency,
            low.throughput + share * (high.throughput - low.throughput),
            low.p99_ms + share * (high.p99_ms - low.p99_ms),
        )

    def noisy(self, seed: int) -> Measure:
        """The grid as a measurement: the truth, each throughput off by its family's noise (latency inversely)."""
        rng = random.Random(seed)

        def measure(candidate: Candidate, concurrency: int) -> Point:
            point = self.truth(candidate, concurrency)
            factor = math.exp(rng.gauss(0, self.noise_of(candidate)))
            return dataclasses.replace(point, throughput=point.throughput * factor, p99_ms=point.p99_ms / factor)

        return measure

    def capacity(self, candidate: Candidate, p99_ms: float | None) -> float:
        """The candidate's recorded best within the bound."""
        return max((p.throughput for p in self.ladders[candidate] if p.passes(p99_ms)), default=0.0)

    def best(self, p99_ms: float | None) -> tuple[Candidate, float]:
        return max(((c, self.capacity(c, p99_ms)) for c in self.ladders), key=lambda item: item[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m tritonhf.perf.grid")
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True, help="a classifier or embedder's plain name")
    parser.add_argument("--output", type=Path, required=True, help="the grid's CSV (perf/grids/<model>.csv)")
    parser.add_argument("--window-ms", type=int, default=500)
    args = parser.parse_args(argv)
    record_grid(args.model_repository, args.model, args.output, args.window_ms)


if __name__ == "__main__":
    main()
