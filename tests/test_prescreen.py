"""``tritonhf tune``'s in-process pre-screen (prescreen.py): each variant's own step timed at a few shapes, the
length-bucket overhead fitted from those timings, and the clear losers left out of the live search."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tritonhf import prescreen
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.tune import configured, spaces

from .conftest import CLASSIFIER


def test_the_overhead_is_the_fits_intercept_over_its_slope() -> None:
    """16 ms a forward and 0.46 ms a token (DistilBERT on 2 cores, batching.py): ~35 token-times."""
    seconds = {(r, w): 0.016 + 0.00046 * r * (w + 2) for r in prescreen.ROWS for w in prescreen.WORDS}
    assert prescreen.fit_overhead(seconds) == pytest.approx(0.016 / 0.00046)
    assert prescreen.fit_overhead({k: 0.00046 * k[0] * (k[1] + 2) for k in seconds}) == pytest.approx(0, abs=1e-6)


def test_the_fit_weighs_the_small_shapes_where_the_overhead_shows() -> None:
    """ONNX int8 DistilBERT timed on a 2-core AMD EPYC (ms): attention makes the large shapes superlinear, and an
    absolute least-squares fit put the intercept below zero (overhead 0); the relative fit finds ~3 ms: ~10 tokens."""
    ms = {(1, 8): 6.0, (1, 32): 12.3, (1, 96): 31.3, (4, 8): 16.3, (4, 32): 42.5, (4, 96): 122.6, (16, 8): 48.4,
          (16, 32): 166.4, (16, 96): 555.0}  # fmt: skip
    assert 8 < prescreen.fit_overhead({k: v / 1000 for k, v in ms.items()}) < 12


@pytest.fixture(scope="module")
def built(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    options = BuildOptions(output=tmp_path_factory.mktemp("prescreen") / "repo", variants=("python", "onnx-int8"))
    return build(plan([], [str(tiny[CLASSIFIER])], [], 8), options)


def test_every_variant_is_timed_and_the_losers_dropped(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [space] = spaces(built).values()
    kept, timings = prescreen.prescreen(built, space, lambda c: configured(built, c))
    assert set(timings) == {(c.variant, c.dtype) for c in space.screened()}
    for timing in timings.values():
        assert set(timing.seconds) == {(r, w) for r in prescreen.ROWS for w in prescreen.WORDS}
        assert timing.rate > 0 and math.isfinite(timing.overhead_tokens) and timing.overhead_tokens >= 0
    assert kept.default == space.default
    monkeypatch.setattr(prescreen, "KEEP", 1.0)  # only the fastest is kept
    kept, timings = prescreen.prescreen(built, space, lambda c: configured(built, c))
    fastest = max(timings.values(), key=lambda t: t.rate)
    assert kept.variants == {fastest.variant: (fastest.dtype,)}
