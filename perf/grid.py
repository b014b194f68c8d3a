"""A brute-force grid of ``tritonhf tune``'s space, measured once on one machine and committed (perf/grids/): the
truth that the search is held to by a replay test (tests/test_grid_replay.py).

Every candidate of the space (``Space.everything()``: the default, and every variant in every precision it may
load in, at every instance count, ``max_batch_size`` and queue delay) is loaded in one running server, as the tune
loads it, and measured along a ladder of concurrencies 1, 2, 4, ...: up to the first errors or refusals, or the
first doubling from 4 on that gains no more than ``SATURATED`` (past that, a closed-loop load only queues:
throughput stays, latency grows with the concurrency, and the replay extrapolates so). Each point is three windows
of ``--window-ms``, taken as they come. Then ``REPEATS`` candidates drawn at random are measured again at their
recorded points: the machine's noise, which the replay draws from. Last, the ``CONFIRMED`` leaders under each of
``BOUNDS`` are measured ``CONFIRM_ROUNDS`` times more at their best point there, in interleaved rounds (a new order
every round, so that a slow hour weighs on all of them alike), and the replay takes the median there: the best of a
thousand single measurements is partly luck (the winner's curse), and a search can't be held to luck. Then the
noise that the tune itself sees: the same leaders and each family's fastest point (a family: a variant at an
instance count), measured ``NOISE_ROUNDS`` times with the tune's own windows and stability rule
(``tune.WINDOW_MS``), in interleaved rounds. The replay draws from that noise; the grid's own, of its shorter
windows, is kept beside it.

    python -m tritonhf.perf.grid --model-repository model_repository --model NAME --output perf/grids/NAME.csv

Resumable: points already in the CSV are not measured again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tritonhf.perf.analyzer import ANY_WINDOWS
from tritonhf.server import TritonServer
from tritonhf.tune import WINDOW_MS, Live, Trials, machine_record, read_points, read_trials, spaces
from tritonhf.tuning import (
    MAX_CONCURRENCY,
    Candidate,
    Measure,
    Point,
    Serves,
    Space,
    best_per_candidate,
    median_point,
    pooled_log_sd,
    score,
)

SATURATED = 0.03  # a doubling of the load that gains no more than this share of throughput
REPEATS = 12  # candidates measured again, every point of their ladder: the noise
CONFIRMED, CONFIRM_ROUNDS = 8, 12  # per bound, the leaders' best points measured again: the truth is their median
NOISE_ROUNDS = 2  # measurements of each noise point with the tune's windows
BOUNDS = (None, 250.0, 100.0)  # p99 ms: throughput only, and two bounds the full-size models meet on 2 cores


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


MIN_REPEATS = 4  # degrees of freedom of a family's repeats before its own noise is taken

Groups = dict[tuple[Candidate, int], list[Point]]  # repeated measurements of one candidate at one concurrency


def noise(groups: Groups) -> tuple[float, dict[tuple[str, int], float]]:
    """One measurement's relative noise (sd of log throughput, about each point's own mean): in all, and per family
    (a variant at an instance count: one instance of two threads can be far noisier than two of one)."""
    families: dict[tuple[str, int], list[list[Point]]] = {}
    for (candidate, _), points in groups.items():
        families.setdefault((candidate.variant, candidate.instances), []).append(points)
    return pooled_log_sd(groups.values()), {
        family: pooled_log_sd(found)
        for family, found in families.items()
        if sum(len(points) - 1 for points in found) >= MIN_REPEATS
    }


def grouped(points: list[Point]) -> Groups:
    groups: Groups = {}
    for point in points:
        groups.setdefault((point.candidate, point.concurrency), []).append(point)
    return groups


def noise_points(done: Done, leading: list[tuple[Candidate, int]]) -> list[tuple[Candidate, int]]:
    """The leaders' points, and each family's fastest."""
    families: dict[tuple[str, int], list[Point]] = {}
    for point in sorted((p for p in done.values() if p.passes(None)), key=score):
        families.setdefault((point.candidate.variant, point.candidate.instances), []).append(point)
    fastest = [(found[0].candidate, found[0].concurrency) for found in families.values()]
    return sorted(set(leading) | set(fastest))


def leaders(done: Done, p99_ms: float | None, count: int = CONFIRMED) -> list[Point]:
    """The ``count`` candidates whose best point within the bound is highest, each at that point."""
    best = best_per_candidate(p for p in done.values() if p.passes(p99_ms))
    return sorted(best.values(), key=score)[:count]


def record_grid(repository: Path, model: str, output: Path, window_ms: int, seed: int = 0) -> None:
    [space] = spaces(repository, [model]).values()
    output.parent.mkdir(parents=True, exist_ok=True)
    done = read_trials(output, model, phase="grid")
    repeated = read_trials(output, model, phase="repeat")
    trials = Trials(output)
    record = {
        **machine_record(None),
        "window_ms": window_ms,
        "noise_window_ms": WINDOW_MS,
        "model": model,
        "space": dataclasses.asdict(space),
    }
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
        leading = sorted({(p.candidate, p.concurrency) for bound in BOUNDS for p in leaders(done, bound)})
        rng = random.Random(seed)
        for round_ in tqdm(range(CONFIRM_ROUNDS), desc="the leaders, again", unit="round"):
            for key in rng.sample(leading, len(leading)):
                if confirmed[key] <= round_:
                    keep("confirm")(live(*key))
                    confirmed[key] += 1
        live.window_ms, live.stability_percent = WINDOW_MS, Live.STABILITY_PERCENT  # as the tune measures
        measured = Counter((p.candidate, p.concurrency) for p in read_points(output, model, "noise"))
        keys = noise_points(done, leading)
        for round_ in tqdm(range(NOISE_ROUNDS), desc=f"noise at {WINDOW_MS} ms windows", unit="round"):
            for key in rng.sample(keys, len(keys)):
                if measured[key] <= round_:
                    keep("noise")(live(*key))
                    measured[key] += 1
    for lost in live.lost:
        print(f"lost a trial: {lost}")


@dataclass
class Grid:
    """A recorded grid, as the replay reads it: each candidate's ladder, the space it covers, the measured noise."""

    space: Space
    ladders: dict[Candidate, list[Point]]  # by concurrency
    noise: float  # one measurement's relative noise (sd of log throughput) with the tune's windows: the replay's
    measurements: int  # the grid's, repeats excluded
    families: dict[tuple[str, int], float] = dataclasses.field(default_factory=dict)  # (variant, instances): its noise
    window_noise: float = 0.0  # the same, with the grid's own (shorter) windows, from its repeats

    def noise_of(self, candidate: Candidate) -> float:
        """Its family's noise where enough of it was measured, else the grid's."""
        return self.families.get((candidate.variant, candidate.instances), self.noise)

    @classmethod
    def load(cls, path: Path) -> Grid:
        record = json.loads(path.with_suffix(".json").read_text())
        raw = record["space"]
        space = Space(
            Candidate(**raw["default"]),
            {v: tuple(d) for v, d in raw["variants"].items()},
            *(tuple(raw[k]) for k in ("instances", "batch_sizes", "delays_us")),
            Serves(raw.get("serves", Serves.REQUESTS)),  # recorded before generation was tuned: a classifier's
        )
        grid = read_trials(path, record["model"], phase="grid")
        confirms = grouped(read_points(path, record["model"], "confirm"))
        ladders: dict[Candidate, list[Point]] = {}
        for (candidate, concurrency), point in sorted(grid.items(), key=lambda kv: kv[0][1]):  # a leader: the median
            ladders.setdefault(candidate, []).append(median_point([point, *confirms.get((candidate, concurrency), [])]))
        repeats = {key: [grid[key], point] for key, point in read_trials(path, record["model"], "repeat").items()}
        window_noise, families = noise(repeats)
        tuned = grouped(read_points(path, record["model"], "noise"))
        if sum(len(points) - 1 for points in tuned.values()) >= MIN_REPEATS:  # measured with the tune's windows
            overall, families = noise(tuned)
        else:
            overall = window_noise
        return cls(space, ladders, overall, len(grid), families, window_noise)

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
