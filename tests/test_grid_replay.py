"""``tritonhf tune``'s search held to a brute-force grid measured on a real machine (perf/grids/, recorded by
perf/grid.py): replayed ten times, each with the noise measured on that machine with the tune's own windows, the
choice is within 5% of the grid's best in at least 9, and the search measures no more than a tenth of what the grid
did."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest

from tritonhf.perf.grid import BOUNDS, Grid
from tritonhf.tune import Trials
from tritonhf.tuning import Search

from .test_tuning import SPACE, truth

GRIDS = sorted((Path(__file__).parents[1] / "perf" / "grids").glob("*.csv"))


# Where the search is known to miss the bar, and why: a pass would fail the suite (strict), to be looked at.
NOT_YET = {
    # The grid's best under 100 ms (ONNX int8, 2 x batch 4, 2 ms delay) sits at concurrency 8 with a median p99 of
    # 97 ms over 13 measurements, 3% inside the bound, where one measurement's p99 varies by 10-20%: measured once,
    # it fails the bound about a third of the time, and the search (which keeps the noise to spare) picks the best
    # point that meets it reliably, 2 x batch 1 at 84 ms: 91% of the best (issue #20).
    ("distilbert-base-uncased-finetuned-sst-2-english", 100.0): "the grid's best is 3% inside the bound: see above",
    # The same edge on the Xeon's all-MiniLM-L6-v2 grid: the best under 100 ms (ONNX int8, 2 x batch 16, no delay)
    # has its p99 at 98 ms at concurrency 32 and 97 ms at 64; the search picks its 2 ms twin (0.98 of it) in 7 of 10
    # replays, and in 3 a layout that meets the bound with room (0.90-0.92).
    ("all-MiniLM-L6-v2", 100.0): "the grid's best is 2-3% inside the bound: see above",
}


def cases() -> list:
    return [
        pytest.param(
            path,
            p99_ms,
            id=f"{path.stem}-{p99_ms}",
            marks=[pytest.mark.xfail(strict=True, reason=NOT_YET[key])]
            if (key := (path.stem, p99_ms)) in NOT_YET
            else [],
        )
        for path in GRIDS
        for p99_ms in BOUNDS
    ]


@pytest.mark.parametrize(("path", "p99_ms"), cases())
def test_the_search_finds_the_grids_best_in_a_tenth_of_it(path: Path, p99_ms: float | None) -> None:
    grid = Grid.load(path)
    best, top = grid.best(p99_ms)
    shares, used = [], []
    for seed in range(10):
        outcome = Search(grid.space, grid.noisy(seed), p99_ms, budget=grid.measurements // 10, seed=seed).run()
        shares.append(grid.capacity(outcome.chosen, p99_ms) / top)
        used.append(len(outcome.trials))
    print(
        f"\n{path.stem} p99 {p99_ms}: noise {grid.noise:.1%} (the grid's own windows: {grid.window_noise:.1%}),"
        f" best {top:.1f}/s ({best.label});"
        f" share of it {[f'{s:.2f}' for s in shares]}; measurements {used} of {grid.measurements}"
    )
    assert sum(s >= 0.95 for s in shares) >= 9, shares
    assert max(used) <= grid.measurements // 10


def test_a_grid_reads_back_as_recorded_and_replays_between_its_points(tmp_path: Path) -> None:
    """A grid written as perf/grid.py writes one (the synthetic surface of test_tuning, two candidates): every
    recorded point comes back; between two, interpolated; past the last, saturated; the noise from the repeats."""
    path = tmp_path / "m.csv"
    space = dataclasses.replace(SPACE, variants={"clf": ("float32",)}, instances=(1,), batch_sizes=(1, 2))
    (tmp_path / "m.json").write_text(json.dumps({"model": "m", "space": dataclasses.asdict(space)}))
    trials, rng = Trials(path), random.Random(0)
    ladders = {c: [truth(c, 2**k) for k in range(5)] for c in space.everything()}
    refused = dataclasses.replace(ladders[space.default][-1], concurrency=32, throughput=0.0, errors=3)
    ladders[space.default].append(refused)
    for ladder in ladders.values():
        for point in ladder:
            trials.add("m", point, "grid")
            again = math.exp(rng.gauss(0, 0.05))
            trials.add("m", dataclasses.replace(point, throughput=point.throughput * again), "repeat")
    leader = max(ladders[space.default], key=lambda p: p.throughput)
    for factor in (0.5, 0.6):  # measured again twice, lower: the median of the three is the first of these
        trials.add("m", dataclasses.replace(leader, throughput=leader.throughput * factor), "confirm")
    grid = Grid.load(path)
    assert grid.truth(space.default, leader.concurrency).throughput == pytest.approx(leader.throughput * 0.6, 1e-3)
    assert grid.space == space and grid.measurements == sum(map(len, ladders.values()))
    assert 0.03 < grid.noise < 0.07, "the repeats' spread: 5% was drawn"
    candidate = next(c for c in ladders if c != space.default)
    for point in ladders[candidate]:
        got = grid.truth(candidate, point.concurrency)
        assert (got.throughput, got.p99_ms) == pytest.approx((point.throughput, point.p99_ms), rel=1e-3)
    four, eight, share = grid.truth(candidate, 4), grid.truth(candidate, 8), math.log2(6 / 4)
    between = grid.truth(candidate, 6)
    assert between.p99_ms == pytest.approx(four.p99_ms + share * (eight.p99_ms - four.p99_ms)) and not between.errors
    last = ladders[candidate][-1]
    beyond = grid.truth(candidate, 64)
    assert (beyond.throughput, beyond.p99_ms) == pytest.approx((last.throughput, last.p99_ms * 64 / 16), rel=1e-3)
    assert grid.truth(space.default, 24).errors and grid.truth(space.default, 64).errors, "refused: so beyond"
    assert grid.capacity(space.default, None) == max(p.throughput for p in grid.ladders[space.default])
