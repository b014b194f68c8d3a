"""``tritonhf tune``'s search, free of Triton: candidates, each one's highest load under a p99 bound, and a choice
that noise can't make.

A candidate is one served configuration of one model: which built variant serves it (python, onnx, onnx-int8,
torchscript), its precision, instances (each gets the CPUs / instances as threads where it runs), ``max_batch_size``
and the dynamic batcher's queue delay. ``measure(candidate, concurrency)`` is whatever measures: live (one running
server, the model reloaded with the candidate's config, perf_analyzer) or replayed from a recorded grid (tests).

Model Analyzer's quick search ties the load to the configuration (concurrency = 2 x batch x instances), measures
each point once and takes any gain, noise included. Here:

1. **Capacity, not one point.** A candidate's score is its throughput at the highest load with p99 within the
   bound and no error or refusal: concurrency doubles while that holds and throughput still grows, then one
   bisection between the last pass and the first failure. Past saturation a closed loop's throughput stays, so the
   highest passing load measures the capacity, where the best of a few noisy points would measure luck.
2. **Screen, then best-first.** Every variant (and verified precision) is measured in the default layout at the
   default's capacity load, one point each; those far behind the best are dropped, the best one's capacity is
   found. Under a p99 bound, its every other batch size is scored too: the batch a bound allows can be anywhere
   on the axis, far from the default's. Then, until the search's share of the budget is spent, the fastest point
   not yet expanded has its neighbours (instances, batch size or queue delay one step away) scored from its load
   upwards (a larger batch needs more load to show). A single hill-climb stops at the first unlucky measurement;
   this goes on to the next fastest, and leaves the noise to the finals.
3. **Finals, a race.** The best few and today's default are measured again in interleaved rounds (a new order
   every round, each at its own load). From the third round, an entrant that fails the bound in most rounds, or
   that the leader beats by more than two standard errors of the difference (the noise pooled over all the rounds),
   drops out, and the rounds left go to those still close. The default is kept unless the winner beats it so. Ties
   (within ``MIN_NOISE``: equal in practice) go to fewer processes, then to the lower latency at concurrency 1.
4. **A queue delay must buy something.** It trades latency for throughput: under light load every request waits
   for it (a closed loop of 16 against batches of 32 waits the whole delay for every batch). The winner keeps its
   delay only if it beats the same layout without one beyond the noise: a duel after the finals, unless they
   raced both (the finals stop early to leave room for it and the tie-break; without room, the delay stays and
   the note says so). The default, when kept, stays as built.

Generation is searched the same way (``Serves``): its throughput is output tokens/s, and a point also carries its
p99 time to first token, bounded separately; a stream's "batch size" is its running batch's rows, and its own
axis is the cap on the prompt tokens a packed step carries besides the decoding rows' (chunked prefill's budget,
within its time bound, prefill_step_slack: more lets newcomers in sooner, fewer keeps the steps, and so the
inter-token latency, even).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from tritonhf import TritonHFError

MIN_NOISE = 0.03  # the smallest relative difference ever taken for a gain: a shared machine's floor
MIN_ROUNDS, MAX_ROUNDS = 3, 30  # of the finals: at least, and at most where the budget and the deadline allow
FINALS_SHARE = 0.4  # of the budget, kept for the finals' race
FINALS_PACE = 1.5  # a finals measurement's time, to a search measurement's: each one reloads its candidate
DUEL = 2 * MIN_ROUNDS  # measurements the finals leave for a winner's duel with its undelayed self
DUEL_ROUNDS = 10  # at most, where the budget allows
Z = 2.0  # standard errors of a difference that make it a difference
SCREEN_KEEP = 0.75  # a variant whose screened capacity is below this share of the best is dropped
MAX_CONCURRENCY = 256
BUDGET_MINUTES = 30.0  # for all the models of one tune


GOALS = {  # the tune's bounds and budget, as ``tritonhf tune`` and ``tritonhf build --tune`` take them
    "p99_ms": "classifiers' and embedders' p99 request latency bound (default: none, throughput only)",
    "ttft_p99_ms": "generation models' p99 time-to-first-token bound (a static model's first token is its answer)",
    "itl_p99_ms": "streams' p99 inter-token latency bound",
}


def add_goal_arguments(add: Callable[..., object], prefix: str = "") -> None:
    for name, text in GOALS.items():
        add(f"--{name.replace('_', '-')}", type=float, default=None, help=f"{prefix}{text}")
    add("--budget-minutes", type=float, default=BUDGET_MINUTES, help=f"{prefix}for all models (default: %(default)s)")


def goal_arguments(args: object) -> dict[str, float | None]:
    """The parsed goal arguments, as keywords for ``TuneOptions``."""
    return {name: getattr(args, name) for name in (*GOALS, "budget_minutes")}


@dataclass(frozen=True, order=True)
class Candidate:
    """One configuration of one served model."""

    variant: str  # the variant's served name: the model directory whose files serve it
    dtype: str  # the generic model's precision (config parameter ``dtype``); exports: their own, "export"
    instances: int
    max_batch_size: int
    queue_delay_us: int
    prefill_tokens: int = 0  # a stream's cap on the prompt tokens a packed step carries (max_prefill_tokens)

    @property
    def label(self) -> str:
        prefill = f" prefill {self.prefill_tokens}" if self.prefill_tokens else ""
        return (
            f"{self.variant} {self.dtype} {self.instances}x mbs {self.max_batch_size} delay {self.queue_delay_us}us"
            + prefill
        )


@dataclass(frozen=True)
class Point:
    """One measurement: a candidate at one concurrency."""

    candidate: Candidate
    concurrency: int
    throughput: float  # answers per second; generation: output tokens per second
    p99_ms: float  # a request's latency; a stream's: the latency between its tokens
    errors: int = 0  # failed or refused requests, or a server that died
    ttft_p99_ms: float = 0.0  # generation: the time to the first token

    def passes(self, p99_ms: float | None, ttft_p99_ms: float | None = None) -> bool:
        return (
            self.errors == 0
            and self.throughput > 0
            and (p99_ms is None or self.p99_ms <= p99_ms)
            and (ttft_p99_ms is None or self.ttft_p99_ms <= ttft_p99_ms)
        )


Measure = Callable[[Candidate, int], Point]


class Serves(str, Enum):
    """What a model's throughput counts, and which of the tune's bounds hold it (its value: as a grid records it)."""

    REQUESTS = "requests"  # classifiers, embedders: answers/s, the p99 request latency bounded
    TOKENS = "tokens"  # a generation model: output tokens/s; its answer comes whole: its first token is its latency
    STREAM = "streamed"  # output tokens/s, streamed: time to first token and inter-token latency bounded; the running
    # batch's rows (the scheduler's max_running_sequences) are its max_batch_size, and nothing waits on a delay

    @property
    def unit(self) -> str:
        return "req/s" if self is Serves.REQUESTS else "tokens/s"

    def bounds(
        self, p99_ms: float | None, ttft_p99_ms: float | None, itl_p99_ms: float | None
    ) -> tuple[float | None, float | None]:
        """The bounds on a point's ``p99_ms`` and on its ``ttft_p99_ms``."""
        return {
            Serves.REQUESTS: (p99_ms, None),
            Serves.TOKENS: (None, ttft_p99_ms),
            Serves.STREAM: (itl_p99_ms, ttft_p99_ms),
        }[self]


@dataclass(frozen=True)
class Space:
    """What may vary, per model: the built variants with their verified precisions, and the layout's values."""

    default: Candidate  # the repository as built
    variants: dict[str, tuple[str, ...]]  # variant served name -> precisions it may load in
    instances: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    delays_us: tuple[int, ...]
    serves: Serves = Serves.REQUESTS
    prefill_tokens: tuple[int, ...] = (0,)  # a stream's caps on its steps' prompt tokens; (0,): the rest

    def neighbours(self, candidate: Candidate) -> list[Candidate]:
        """The candidates one step away on one layout axis (instances, batch size, queue delay, a stream's prefill
        tokens a step)."""
        found = []
        for axis, values in (
            ("instances", self.instances),
            ("max_batch_size", self.batch_sizes),
            ("queue_delay_us", self.delays_us),
            ("prefill_tokens", self.prefill_tokens),
        ):
            at = values.index(getattr(candidate, axis)) if getattr(candidate, axis) in values else None
            for step in (-1, 1):
                if at is not None and 0 <= at + step < len(values):
                    found.append(replace(candidate, **{axis: values[at + step]}))
        return [c for c in found if reachable(c)]

    def along(self, candidate: Candidate) -> list[Candidate]:
        """Every other value of the batch axis, and of a stream's prefill axis, from ``candidate``: where to look
        under a bound, which may allow only a corner of an axis (a stream's inter-token bound: short steps)."""
        batches = [replace(candidate, max_batch_size=batch) for batch in self.batch_sizes[::2]]
        seeds = [c if reachable(c) else replace(c, queue_delay_us=0) for c in batches]
        return seeds + [replace(candidate, prefill_tokens=n) for n in self.prefill_tokens[::2] if n]

    def everything(self) -> list[Candidate]:
        """The whole space, as a brute-force grid measures it: the default and every reachable layout of every
        variant in every precision."""
        layouts = itertools.product(self.instances, self.batch_sizes, self.delays_us, self.prefill_tokens)
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
    finalists: int = 4  # besides the default
    seed: int = 0
    on_trial: Callable[[Point, Point | None], None] = lambda point, best: None
    ttft_p99_ms: float | None = None  # streams: the bound on the time to the first token (``p99_ms``: between tokens)
    trials: list[Point] = field(default_factory=list)
    cache: dict[tuple[Candidate, int], Point] = field(default_factory=dict)
    noise: float = MIN_NOISE
    best: Point | None = None
    started: float = field(default_factory=lambda: time.monotonic())
    phase: str = "search"  # then "finals"

    def point(self, candidate: Candidate, concurrency: int) -> Point:
        """A measurement, remembered."""
        key = (candidate, concurrency)
        if key in self.cache:
            return self.cache[key]
        if self.spent():
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
        return point.passes(*(None if bound is None else bound / (1 + self.noise) for bound in self.bounds))

    @property
    def bounds(self) -> tuple[float | None, float | None]:
        return self.p99_ms, self.ttft_p99_ms

    def capacity(self, candidate: Candidate, start: int | None = None) -> Point | None:
        """The point at the highest load that passes: from a first load that passes (halved until one does), the
        concurrency doubles while it passes and still gains more than ``MIN_NOISE``; then one bisection between the
        last pass and the first failure. The highest passing load, not the highest single throughput: past
        saturation a closed loop's throughput stays, so the highest load measures the capacity, where the best of
        a few noisy points would measure the luck. None: it fails even at concurrency 1."""
        rows = candidate.max_batch_size if self.space.serves is Serves.STREAM else min(candidate.max_batch_size, 4)
        best = self.first_fit(candidate, start or max(1, candidate.instances * rows))  # a stream: every slot busy
        if best is None:
            return None
        concurrency, failed_at = best.concurrency, None
        while (concurrency := concurrency * 2) <= MAX_CONCURRENCY:
            point = self.point(candidate, concurrency)
            if not self.fits(point):
                failed_at = concurrency
                break
            gained = point.throughput > best.throughput * (1 + MIN_NOISE)
            best = point  # the higher load: a closed loop's throughput doesn't fall with load, beyond the noise
            if not gained:
                break  # saturated: more load only queues
        if failed_at is not None and failed_at - best.concurrency > 1:
            middle = self.point(candidate, (best.concurrency + failed_at) // 2)
            if self.fits(middle):
                best = middle
        return best

    def first_fit(self, candidate: Candidate, concurrency: int) -> Point | None:
        """The point at ``concurrency``, halved until one passes (None: not even concurrency 1 does)."""
        while not self.fits(point := self.point(candidate, concurrency)):
            if concurrency == 1:
                return None
            concurrency //= 2
        return point

    def explore(self, survivors: set[tuple[str, str]]) -> None:
        """Best-first, until the search's share of the budget is spent: the fastest point not yet expanded (of a
        surviving variant and precision) has each of its neighbours never measured scored from its load upwards (a
        larger batch needs more load to show). One noisy point can't stop it as it stops a single hill-climb: the
        next fastest is expanded in turn, and the finals race what it found."""
        expanded: set[Candidate] = set()
        while True:
            frontier = [p for c, p in self.pool().items() if c not in expanded and (c.variant, c.dtype) in survivors]
            if not frontier:
                return
            parent = max(frontier, key=lambda p: p.throughput)
            expanded.add(parent.candidate)
            measured = {c for c, _ in self.cache}  # a resumed tune's, too
            for neighbour in self.space.neighbours(parent.candidate):
                if neighbour not in measured:
                    self.capacity(neighbour, parent.concurrency)

    def spent(self) -> bool:
        """The search's share is spent: ``FINALS_SHARE`` of the measurements, and of the time to the deadline, is
        the finals'."""
        if len(self.trials) >= self.budget - max(MIN_ROUNDS * (self.finalists + 1), int(FINALS_SHARE * self.budget)):
            return True
        return self.deadline is not None and time.monotonic() > self.deadline - FINALS_SHARE * (
            self.deadline - self.started
        )

    def seats(self) -> int:
        """How many besides the default can race ``MIN_ROUNDS`` rounds in the time left, at ``FINALS_PACE`` times
        the search's pace (``finalists`` at most, one at least)."""
        if self.deadline is None or not self.trials:
            return self.finalists
        pace = FINALS_PACE * self.pace()
        return max(1, min(self.finalists, int((self.deadline - time.monotonic()) / (pace * MIN_ROUNDS)) - 1))

    def pace(self) -> float:
        """Seconds a measurement so far."""
        return (time.monotonic() - self.started) / len(self.trials)

    def run(self) -> Outcome:
        try:
            default = self.capacity(self.space.default)
            if default is not None:  # the noise, from the first repeat: what a gain must exceed during the search
                again = self.measure_again(default)
                self.noise = max(MIN_NOISE, pooled_log_sd([(default, again)]))
                default = self.pool().get(default.candidate)  # the repeat may have failed at that load
            load = default.concurrency if default is not None else 1  # one point each, at the default's capacity
            screened = [found for c in self.space.screened() if (found := self.first_fit(c, load)) is not None]
            top = max(screened, key=lambda p: p.throughput) if screened else None
            if top is not None:
                self.capacity(top.candidate, top.concurrency)
            if self.bounds != (None, None):  # what a bound allows may be anywhere on an axis: look along them
                for seed in self.space.along(self.space.default if top is None else top.candidate):
                    self.capacity(seed)
            keep = SCREEN_KEEP * top.throughput if top is not None else 0.0
            survivors = [p.candidate for p in screened if p.throughput >= keep] or self.space.screened()
            self.explore({(c.variant, c.dtype) for c in survivors})
        except BudgetSpentError:
            pass  # the finals have their own share: see finals()
        return self.finals()

    def pool(self) -> dict[Candidate, Point]:
        """Each candidate's fitting point at the highest load so far (a resumed tune's included): its capacity, or as
        far as the budget let it get. A load that failed when measured again (refused at the edge of the queue, say)
        is not one it sustains."""
        points = [*self.cache.values(), *self.trials]
        failed = {(p.candidate, p.concurrency) for p in points if not p.passes(*self.bounds)}
        return most_loaded(p for p in points if self.fits(p) and (p.candidate, p.concurrency) not in failed)

    def finals(self) -> Outcome:
        """The best few (as many as the time left seats) and the default, raced: measured again in interleaved
        rounds (a new order every round, each at its own load); from ``MIN_ROUNDS`` on, an entrant that fails the
        bound in most rounds, or falls behind the leader beyond the noise, drops out, so that the rounds left go to
        those still close. A winner that beat the default then keeps its queue delay only if the delay buys
        throughput (``undelayed``), for which the race leaves room."""
        self.phase = "finals"
        pool = self.pool()
        default = pool.get(self.space.default)
        ranked = [p for p in sorted(pool.values(), key=score) if p.candidate != self.space.default]
        entrants = ([default] if default is not None else []) + ranked[: self.seats()]
        if not entrants:
            raise NoCandidateError(self.closest())
        keep = self.after_race(entrants)
        rounds, racing = self.race(entrants, keep)
        while (
            not racing and max(p.concurrency for p in entrants) > 1 and self.affords(MIN_ROUNDS * len(entrants) + keep)
        ):
            # each was raced at the edge of the bound, where one measurement passes and the next fails: lighter
            entrants = [replace(p, concurrency=max(1, p.concurrency // 2)) for p in entrants]
            rounds, racing = self.race(entrants, keep)
        estimates = {c: estimate(points) for c, points in rounds.items()}
        passing = {p.candidate: estimates[p.candidate] for p in racing}  # still racing: passing, and not beaten
        if not passing:
            raise NoCandidateError(self.closest())
        top = max(e.throughput for e in passing.values())
        tied = [c for c, e in passing.items() if e.throughput * (1 + MIN_NOISE) >= top]  # equal in practice
        fewest = min(c.instances for c in tied)
        tied = [c for c in tied if c.instances == fewest]
        timed = len(tied) > 1 and self.affords(len(tied))
        alone = {c: self.measure_again(Point(c, 1, 0.0, 0.0)).p99_ms for c in tied} if timed else {}
        chosen = min(tied, key=lambda c: (alone.get(c, 0.0), -passing[c].throughput))  # then the lower latency at c1
        note = "the fastest beyond the noise" if len(tied) == 1 else "the fewest processes among the fastest"
        if default is not None and default.candidate in passing and not self.beats(rounds, chosen, default.candidate):
            chosen, note = default.candidate, "the default: nothing beat it beyond the noise"
        elif chosen.queue_delay_us:
            held = default is not None and majority_pass(rounds[default.candidate], *self.bounds)
            chosen, why = self.undelayed(chosen, rounds, pool, default.candidate if held else None)
            note = f"{note}{why}"
        estimates = {c: estimate(points) for c, points in rounds.items()}  # a duel's rounds, too
        baseline = estimates[default.candidate] if default is not None else estimates[chosen]
        layouts = {c.variant: c for c, _ in sorted(pool.items(), key=lambda item: item[1].throughput)}
        layouts[chosen.variant] = chosen
        return Outcome(chosen, estimates[chosen], baseline, self.noise, self.trials, rounds, note, layouts)

    def after_race(self, entrants: list[Point]) -> int:
        """The measurements that the race leaves for what follows it: the tie-break's (one each, at concurrency 1)
        and the duel's, if some entrant but the default has a queue delay and its undelayed self does not race."""
        racing = {p.candidate for p in entrants}
        duel = any(
            c.queue_delay_us and replace(c, queue_delay_us=0) not in racing for c in racing - {self.space.default}
        )
        return len(entrants) + (DUEL if duel else 0)

    def undelayed(
        self,
        chosen: Candidate,
        rounds: dict[Candidate, list[Point]],
        pool: dict[Candidate, Point],
        default: Candidate | None,
    ) -> tuple[Candidate, str]:
        """``chosen`` without its queue delay unless the delay beats that beyond the noise, and why: a delay trades
        latency for throughput (under light load every request waits for it), so it must be shown to buy some.
        Without it, the layout must pass the bounds in most rounds and beat the default (``default``: where it
        passes them) too, judged on all the rounds (one that dropped out of the finals early may be within the noise of
        the winner's many). A duel after the finals when they did not race it: the winner at its load, the other at
        its own capacity where the search found a lower one."""
        undelayed = replace(chosen, queue_delay_us=0)
        if undelayed not in rounds:
            if not self.affords(DUEL):
                return chosen, "; its queue delay untested without: no time left to race it"
            theirs = rounds[chosen][0]
            load = min(theirs.concurrency, pool[undelayed].concurrency if undelayed in pool else theirs.concurrency)
            self.race([theirs, Point(undelayed, load, 0.0, 0.0)], rounds=rounds, most=DUEL_ROUNDS, drop=False)
        kept = (
            not majority_pass(rounds[undelayed], *self.bounds)
            or self.beats(rounds, chosen, undelayed)
            or (default is not None and not self.beats(rounds, undelayed, default))
        )
        return (
            (chosen, "")
            if kept
            else (undelayed, ", without its queue delay: the delay bought nothing beyond the noise")
        )

    def race(
        self,
        entrants: list[Point],
        keep: int = 0,
        rounds: dict[Candidate, list[Point]] | None = None,
        most: int = MAX_ROUNDS,
        drop: bool = True,
    ) -> tuple[dict[Candidate, list[Point]], list[Point]]:
        """Interleaved rounds, a new order each, until one is left, the rounds run out or the budget does (less
        ``keep`` measurements): every entrant's rounds (added to ``rounds``, whose every round the noise is pooled
        over), and those still racing (passing the bounds in most rounds, not beaten beyond the noise). Without
        ``drop``, none drops out: the race is judged once, at the end (every look at a race that drops out is
        another chance to drop a tie)."""
        rng = random.Random(self.seed)
        rounds = {} if rounds is None else rounds
        for entrant in entrants:
            rounds.setdefault(entrant.candidate, [])
        racing = entrants
        for number in range(1, most + 1):
            for entrant in rng.sample(racing, len(racing)):
                rounds[entrant.candidate].append(self.measure_again(entrant))
            if number >= MIN_ROUNDS:
                self.noise = max(MIN_NOISE, pooled_log_sd(rounds.values()))
                racing = self.still_racing(racing, rounds) if drop else racing
                if len(racing) < 2 or not self.affords(len(racing) + keep):
                    break
        return rounds, racing

    def still_racing(self, racing: list[Point], rounds: dict[Candidate, list[Point]]) -> list[Point]:
        """Those that pass the bound in most rounds and that the leader doesn't beat beyond the noise."""
        passing = [p for p in racing if majority_pass(rounds[p.candidate], *self.bounds)]
        if not passing:
            return []
        leader = max(passing, key=lambda p: estimate(rounds[p.candidate]).throughput).candidate
        return [p for p in passing if p.candidate == leader or not self.beats(rounds, leader, p.candidate)]

    def beats(self, rounds: dict[Candidate, list[Point]], a: Candidate, b: Candidate) -> bool:
        """``a``'s rounds beat ``b``'s by more than ``Z`` standard errors of the difference (and ``MIN_NOISE``)."""
        difference = math.log(estimate(rounds[a]).throughput / estimate(rounds[b]).throughput)
        error = self.noise * math.sqrt(1 / len(rounds[a]) + 1 / len(rounds[b]))
        return difference > max(Z * error, math.log1p(MIN_NOISE))

    def affords(self, measurements: int) -> bool:
        """Another round of ``measurements`` fits the budget, and the deadline at the pace so far."""
        if len(self.trials) + measurements > self.budget:
            return False
        if self.deadline is None or not self.trials:
            return True
        return time.monotonic() + self.pace() * measurements <= self.deadline

    def measure_again(self, point: Point) -> Point:
        """A finals measurement: outside the budget's search share, never from the cache."""
        measured = self.measure(point.candidate, point.concurrency)
        self.trials.append(measured)
        self.on_trial(measured, self.best)
        return measured

    def closest(self) -> str:
        """For an error: the point that came closest to the bounds, and by how much it missed them."""
        if not self.trials:
            return "nothing was measured"
        named = [(name, bound, attribute) for name, bound, attribute in (
            ("p99", self.p99_ms, "p99_ms"), ("time to first token p99", self.ttft_p99_ms, "ttft_p99_ms")
        ) if bound is not None]  # fmt: skip
        if not named:
            return "every measurement had errors"
        clean = [p for p in self.trials if p.errors == 0 and p.throughput > 0] or self.trials
        near = min(clean, key=lambda p: max(getattr(p, a) / bound for _, bound, a in named))
        missed = ", ".join(
            f"{name} {getattr(near, a):.1f} ms, {getattr(near, a) / bound - 1:+.0%} over the {bound:g} ms bound"
            for name, bound, a in named
        )
        within = not near.errors and all(getattr(near, a) <= bound for _, bound, a in named)
        again = " (within the bounds when first measured, not in most rounds of the finals)" if within else ""
        return f"the closest was {near.candidate.label} at concurrency {near.concurrency}{again}: {missed}"


class NoCandidateError(TritonHFError):
    """No candidate met the bound; the message says which came closest."""


def best_per_candidate(points: Iterable[Point]) -> dict[Candidate, Point]:
    """Each candidate's highest-throughput point among ``points``."""
    best: dict[Candidate, Point] = {}
    for point in points:
        if point.candidate not in best or point.throughput > best[point.candidate].throughput:
            best[point.candidate] = point
    return best


def most_loaded(points: Iterable[Point]) -> dict[Candidate, Point]:
    """Each candidate's point at the highest concurrency among ``points`` (of two there, the faster)."""
    found: dict[Candidate, Point] = {}
    for point in points:
        if point.candidate not in found or (point.concurrency, point.throughput) > (
            found[point.candidate].concurrency,
            found[point.candidate].throughput,
        ):
            found[point.candidate] = point
    return found


def score(point: Point) -> float:
    """Sort key: the highest throughput first."""
    return -point.throughput


def pooled_log_sd(groups: Iterable[Sequence[Point]]) -> float:
    """One measurement's relative noise, from several candidates' repeats (each about its own mean)."""
    squares, freedom = 0.0, 0
    for points in groups:
        logs = [math.log(p.throughput) for p in points if p.throughput > 0]
        if len(logs) > 1:
            squares += statistics.variance(logs) * (len(logs) - 1)
            freedom += len(logs) - 1
    return math.sqrt(squares / freedom) if freedom else 0.0


def estimate(points: Sequence[Point]) -> Point:
    """Repeated measurements of one candidate at one load as one: throughput their trimmed geometric mean (a fifth
    off each end: a stalled window weighs no more than a lucky one), p99 their median."""
    logs = sorted(math.log(p.throughput) for p in points if p.throughput > 0) or [-math.inf]
    cut = len(logs) // 5
    kept = logs[cut : len(logs) - cut]
    p99s = sorted(p.p99_ms for p in points)
    return replace(points[0], throughput=math.exp(sum(kept) / len(kept)), p99_ms=p99s[len(p99s) // 2])


def median_point(points: Sequence[Point]) -> Point:
    ordered = sorted(points, key=lambda p: p.throughput)
    return ordered[len(ordered) // 2]


def majority_pass(points: Sequence[Point], p99_ms: float | None, ttft_p99_ms: float | None = None) -> bool:
    return sum(p.passes(p99_ms, ttft_p99_ms) for p in points) * 2 > len(points)
