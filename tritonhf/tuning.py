"""``tritonhf tune``'s search, free of Triton: candidates, each one's highest load under a p99 bound, and a choice
that noise can't make.

A candidate is one served configuration of one model: which built variant serves it (python, onnx, onnx-int8,
torchscript), its precision, instances (each gets the CPUs / instances as threads where it runs), ``max_batch_size``
and the dynamic batcher's queue delay. ``measure(candidate, concurrency)`` is whatever measures: live (one running
server, the model reloaded with the candidate's config, perf_analyzer) or replayed from a recorded grid (tests).

Model Analyzer's quick search ties the load to the configuration (concurrency = 2 x batch x instances), measures
each point once and takes any gain, noise included. Here:

1. **Capacity, not one point.** A candidate's score is its highest throughput with p99 within the bound and no
   error or refusal: concurrency doubles while that holds and throughput still grows beyond the noise, then one
   bisection between the last pass and the first failure.
2. **Screen, then climb.** Every variant (and verified precision) is scored in the default layout; those far behind
   the best are dropped. The survivors climb: a neighbour (instances, batch size or queue delay one step away) is
   scored from the incumbent's load upwards (a larger batch needs more load to show), and taken only if it beats
   the incumbent by more than the noise.
3. **Finals, interleaved.** The best few and today's default are measured again in rounds, in a new order every
   round, at each one's own load; the default is kept unless a finalist's median beats it by more than the noise
   measured in those same rounds. Ties (within the noise) go to fewer processes, then to the lower latency at
   concurrency 1.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from tritonhf import TritonHFError

MIN_NOISE = 0.03  # the smallest relative difference ever taken for a gain: a shared machine's floor
MAX_ROUNDS = 7  # of the finals, where the budget allows
SCREEN_KEEP = 0.75  # a variant whose screened capacity is below this share of the best is dropped
MAX_CONCURRENCY = 256
BUDGET_MINUTES = 30.0  # for all the models of one tune


def add_goal_arguments(add: Callable[..., object], prefix: str = "") -> None:
    """The tune's bound and budget, as ``tritonhf tune`` and ``tritonhf build --tune`` take them."""
    add("--p99-ms", type=float, default=None, help=f"{prefix}the p99 latency bound (default: none, throughput only)")
    add("--budget-minutes", type=float, default=BUDGET_MINUTES, help=f"{prefix}for all models (default: %(default)s)")


@dataclass(frozen=True, order=True)
class Candidate:
    """One configuration of one served model."""

    variant: str  # the variant's served name: the model directory whose files serve it
    dtype: str  # the generic model's precision (config parameter ``dtype``); exports: their own, "export"
    instances: int
    max_batch_size: int
    queue_delay_us: int

    @property
    def label(self) -> str:
        return f"{self.variant} {self.dtype} {self.instances}x mbs {self.max_batch_size} delay {self.queue_delay_us}us"


@dataclass(frozen=True)
class Point:
    """One measurement: a candidate at one concurrency."""

    candidate: Candidate
    concurrency: int
    throughput: float  # answers per second
    p99_ms: float
    errors: int = 0  # failed or refused requests, or a server that died

    def passes(self, p99_ms: float | None) -> bool:
        return self.errors == 0 and self.throughput > 0 and (p99_ms is None or self.p99_ms <= p99_ms)


Measure = Callable[[Candidate, int], Point]


@dataclass(frozen=True)
class Space:
    """What may vary, per model: the built variants with their verified precisions, and the layout's values."""

    default: Candidate  # the repository as built
    variants: dict[str, tuple[str, ...]]  # variant served name -> precisions it may load in
    instances: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    delays_us: tuple[int, ...]

    def neighbours(self, candidate: Candidate) -> list[Candidate]:
        """The candidates one step away on one layout axis (instances, batch size, queue delay)."""
        found = []
        for axis, values in (
            ("instances", self.instances),
            ("max_batch_size", self.batch_sizes),
            ("queue_delay_us", self.delays_us),
        ):
            at = values.index(getattr(candidate, axis)) if getattr(candidate, axis) in values else None
            for step in (-1, 1):
                if at is not None and 0 <= at + step < len(values):
                    found.append(replace(candidate, **{axis: values[at + step]}))
        return [c for c in found if reachable(c)]

    def everything(self) -> list[Candidate]:
        """The whole space, as a brute-force grid measures it: the default and every reachable layout of every
        variant in every precision."""
        layouts = itertools.product(self.instances, self.batch_sizes, self.delays_us)
        found = [Candidate(v, d, *layout) for layout in layouts for v, dtypes in self.variants.items() for d in dtypes]
        return [self.default, *sorted(c for c in found if reachable(c) and c != self.default)]

    def screened(self) -> list[Candidate]:
        """Every variant in every precision it may load in, in the default layout."""
        return [replace(self.default, variant=v, dtype=d) for v, dtypes in self.variants.items() for d in dtypes]


@dataclass
class Outcome:
    chosen: Candidate
    capacity: Point  # the chosen one's, from the finals
    default: Point  # the default's, from the finals
    noise: float  # relative, measured in the finals
    trials: list[Point]
    finalists: dict[Candidate, list[Point]]
    note: str  # why this one
    layouts: dict[str, Candidate] = field(default_factory=dict)  # each variant's best measured, the chosen's its own

    @property
    def gain(self) -> float:
        return self.capacity.throughput / self.default.throughput if self.default.throughput else float("inf")


def reachable(candidate: Candidate) -> bool:
    return candidate.max_batch_size > 1 or candidate.queue_delay_us == 0  # no batch: nothing to wait for


class BudgetSpentError(Exception):
    """The search's share of the measurements is spent: on to the finals."""


@dataclass
class Search:
    """One model's search; ``budget`` bounds the measurements (finals included)."""

    space: Space
    measure: Measure
    p99_ms: float | None
    budget: int = 120  # measurements in all, the finals' included
    deadline: float | None = None  # time.monotonic() by which the finals should be done, too
    rounds: int = 3  # of the finals
    finalists: int = 4  # besides the default
    seed: int = 0
    on_trial: Callable[[Point, Point | None], None] = lambda point, best: None
    trials: list[Point] = field(default_factory=list)
    cache: dict[tuple[Candidate, int], Point] = field(default_factory=dict)
    noise: float = MIN_NOISE
    best: Point | None = None
    started: float = field(default_factory=time.monotonic)
    phase: str = "search"  # then "finals"

    def point(self, candidate: Candidate, concurrency: int, again: bool = False) -> Point:
        """A measurement, remembered (``again``: measured anew, as the finals do)."""
        key = (candidate, concurrency)
        if key in self.cache and not again:
            return self.cache[key]
        if len(self.trials) >= self.budget - self.reserved:
            raise BudgetSpentError
        if self.deadline is not None and self.trials:  # the finals' share, at the pace measured so far
            pace = (time.monotonic() - self.started) / len(self.trials)
            if time.monotonic() + pace * (self.reserved + 1) > self.deadline:
                raise BudgetSpentError
        point = self.measure(candidate, concurrency)
        self.trials.append(point)
        self.cache[key] = point
        if self.fits(point) and (self.best is None or point.throughput > self.best.throughput):
            self.best = point
        self.on_trial(point, self.best)
        return point

    def fits(self, point: Point) -> bool:
        """Passes with the noise to spare: a capacity found at the bound's very edge would fail half the finals."""
        return point.passes(None if self.p99_ms is None else self.p99_ms / (1 + self.noise))

    def better(self, a: Point | None, b: Point | None) -> bool:
        """``a`` beats ``b`` beyond the noise (a passing point beats a failing one, or none)."""
        if a is None or not self.fits(a):
            return False
        return b is None or not self.fits(b) or a.throughput > b.throughput * (1 + self.noise)

    def capacity(self, candidate: Candidate, start: int | None = None) -> Point | None:
        """The highest-throughput passing point: from a first load that passes (halved until one does), the
        concurrency doubles while it passes and still gains beyond the noise; then one bisection between the last
        pass and the first failure. None: it fails even at concurrency 1."""
        concurrency = start or max(1, candidate.instances * min(candidate.max_batch_size, 4))
        best = self.point(candidate, concurrency)
        while not self.fits(best):
            if concurrency == 1:
                return None
            concurrency //= 2
            best = self.point(candidate, concurrency)
        failed_at = None
        while (concurrency := concurrency * 2) <= MAX_CONCURRENCY:
            point = self.point(candidate, concurrency)
            if not self.fits(point):
                failed_at = concurrency
                break
            gained = point.throughput > best.throughput * (1 + self.noise)
            best = max(best, point, key=lambda p: p.throughput)
            if not gained:
                break  # saturated: more load only queues
        if failed_at is not None and failed_at - best.concurrency > 1:
            middle = self.point(candidate, (best.concurrency + failed_at) // 2)
            if self.fits(middle) and middle.throughput > best.throughput:
                best = middle
        return best

    def climb(self, start: Point) -> Point:
        """From a screened point, take the first neighbour that beats the incumbent at its load, until none does."""
        incumbent = start
        seen = {start.candidate}
        moved = True
        while moved:
            moved = False
            for neighbour in self.space.neighbours(incumbent.candidate):
                if neighbour in seen:
                    continue
                seen.add(neighbour)
                found = self.capacity(neighbour, incumbent.concurrency)  # from the incumbent's load, upwards
                if self.better(found, incumbent):
                    incumbent, moved = found, True
                    break
        return incumbent

    @property
    def reserved(self) -> int:
        """Measurements kept for the finals."""
        return self.rounds * (self.finalists + 1)

    def run(self) -> Outcome:
        try:
            default = self.capacity(self.space.default)
            if default is not None:  # the noise, from the first repeat: what a gain must exceed during the search
                again = self.measure_again(default)
                self.noise = max(MIN_NOISE, spread([default, again]))
            screened = [found for c in self.space.screened() if (found := self.capacity(c)) is not None]
            if screened:
                top = max(p.throughput for p in screened)
                for survivor in sorted((p for p in screened if p.throughput >= SCREEN_KEEP * top), key=score):
                    self.climb(survivor)
        except BudgetSpentError:
            pass  # the finals have their own share: see finals()
        return self.finals()

    def pool(self) -> dict[Candidate, Point]:
        """Each candidate's best fitting point so far: its capacity, or as far as the budget let it get."""
        return best_per_candidate(filter(self.fits, self.trials))

    def finals(self) -> Outcome:
        """The best few and the default, measured again in interleaved rounds at each one's own load."""
        self.phase = "finals"
        pool = self.pool()
        default = pool.get(self.space.default)
        ranked = [p for p in sorted(pool.values(), key=score) if p.candidate != self.space.default]
        entrants = ([default] if default is not None else []) + ranked[: self.finalists]
        if not entrants:
            raise NoCandidateError(self.closest())
        rng = random.Random(self.seed)
        rounds: dict[Candidate, list[Point]] = {p.candidate: [] for p in entrants}
        count = self.final_rounds(len(entrants))
        for _ in range(count):
            for entrant in rng.sample(entrants, len(entrants)):  # a new order every round
                rounds[entrant.candidate].append(self.measure_again(entrant))
        if default is not None:  # what a median of ``count`` must beat another by: about two sd of the difference
            self.noise = max(MIN_NOISE, 3.5 * log_sd(rounds[default.candidate]) / math.sqrt(count))
        medians = {c: median_point(points) for c, points in rounds.items()}
        passing = {c: m for c, m in medians.items() if majority_pass(rounds[c], self.p99_ms)}
        if not passing:
            raise NoCandidateError(self.closest())
        top = max(m.throughput for m in passing.values())
        tied = [c for c, m in passing.items() if m.throughput * (1 + self.noise) >= top]
        fewest = min(c.instances for c in tied)
        tied = [c for c in tied if c.instances == fewest]
        alone = {c: self.measure_again(Point(c, 1, 0.0, 0.0)).p99_ms for c in tied} if len(tied) > 1 else {}
        chosen = min(tied, key=lambda c: alone.get(c, 0.0))  # then the lower latency at concurrency 1
        note = "the fastest beyond the noise" if len(tied) == 1 else "the fewest processes among the fastest"
        baseline = medians[default.candidate] if default is not None else medians[chosen]
        beaten = passing[chosen].throughput > baseline.throughput * (1 + self.noise)
        if default is not None and default.candidate in passing and not beaten:
            chosen, note = default.candidate, "the default: nothing beat it beyond the noise"
        layouts = {c.variant: c for c, _ in sorted(pool.items(), key=lambda item: item[1].throughput)}
        layouts[chosen.variant] = chosen
        return Outcome(chosen, medians[chosen], baseline, self.noise, self.trials, rounds, note, layouts)

    def final_rounds(self, entrants: int) -> int:
        """``rounds`` at least; more, up to ``MAX_ROUNDS``, while the budget and the deadline (at the pace so far)
        allow: on a noisy machine the medians of more rounds tell closer candidates apart."""
        left = self.budget - len(self.trials)
        if self.deadline is not None and self.trials:
            pace = (time.monotonic() - self.started) / len(self.trials)
            left = min(left, int((self.deadline - time.monotonic()) / pace))
        return max(self.rounds, min(MAX_ROUNDS, left // entrants))

    def measure_again(self, point: Point) -> Point:
        """A finals measurement: outside the budget's search share, never from the cache."""
        measured = self.measure(point.candidate, point.concurrency)
        self.trials.append(measured)
        self.on_trial(measured, self.best)
        return measured

    def closest(self) -> str:
        """For an error: the point that came closest to the bound, and by how much it missed."""
        if not self.trials:
            return "nothing was measured"
        if self.p99_ms is None:
            return "every measurement had errors"
        clean = [p for p in self.trials if p.errors == 0 and p.throughput > 0] or self.trials
        near = min(clean, key=lambda p: p.p99_ms)
        return (
            f"the closest was {near.candidate.label} at concurrency {near.concurrency}: p99 {near.p99_ms:.1f} ms,"
            f" {near.p99_ms / self.p99_ms - 1:+.0%} over the {self.p99_ms:g} ms bound"
        )


class NoCandidateError(TritonHFError):
    """No candidate met the bound; the message says which came closest."""


def best_per_candidate(points: Iterable[Point]) -> dict[Candidate, Point]:
    """Each candidate's highest-throughput point among ``points``."""
    best: dict[Candidate, Point] = {}
    for point in points:
        if point.candidate not in best or point.throughput > best[point.candidate].throughput:
            best[point.candidate] = point
    return best


def score(point: Point) -> float:
    """Sort key: the highest throughput first."""
    return -point.throughput


def spread(points: Iterable[Point]) -> float:
    """Relative spread of repeated throughputs: (max - min) / median."""
    values = [p.throughput for p in points]
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 and min(values) > 0 else 0.0


def log_sd(points: Sequence[Point]) -> float:
    """The sd of log throughput of repeated measurements: one measurement's relative noise."""
    logs = [math.log(p.throughput) for p in points if p.throughput > 0]
    return statistics.stdev(logs) if len(logs) > 1 else 0.0


def median_point(points: Sequence[Point]) -> Point:
    ordered = sorted(points, key=lambda p: p.throughput)
    return ordered[len(ordered) // 2]


def majority_pass(points: Sequence[Point], p99_ms: float | None) -> bool:
    return sum(p.passes(p99_ms) for p in points) * 2 > len(points)
