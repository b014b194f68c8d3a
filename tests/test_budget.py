"""The packed step's prefill budget (backends/python_hf/budget.py): a step's cost fitted from timed steps, and the
chunk that keeps a step within its slack. No torch, no server; packed.time_steps, which times a real model's
steps, is tested in test_decoding.py."""

from __future__ import annotations

import math
from dataclasses import astuple

import numpy as np
import pytest

from tritonhf.backends.python_hf.budget import UNTIMED, PrefillBudget, StepCost

CPU = StepCost(base=0.018, per_row=0.0007, per_prompt=0.0008, per_token=0.0003)  # gpt2 on 2 EPYC cores, about
SHAPES = [(1, 0), (32, 0), (1, 16), (1, 64), (32, 64)]  # what packed.time_steps times


def timed(cost: StepCost, shapes: list[tuple[int, int]] = SHAPES) -> np.ndarray:
    return np.array([(rows, tokens, cost.seconds(rows, tokens)) for rows, tokens in shapes])


def test_the_fit_recovers_a_steps_cost_from_the_timed_shapes() -> None:
    fitted = StepCost.fit(timed(CPU))
    assert fitted is not None and astuple(fitted) == pytest.approx(astuple(CPU))
    slower = StepCost.fit(timed(CPU) * [1, 1, 1.02])  # 2% slower all over: 2% on every term
    assert slower is not None and astuple(slower) == pytest.approx(astuple(CPU), rel=0.021)


def test_the_fit_refuses_what_does_not_determine_a_cost_and_tells_free_tokens() -> None:
    """Decoding steps only (or one row: the shapes collapse): no prompt terms, no fit; a device on which prompt
    tokens cost nothing measurable (a GPU's step costs the same up to hundreds of them): a token cost of 0."""
    assert StepCost.fit(timed(CPU, [(1, 0), (8, 0), (32, 0)])) is None
    assert StepCost.fit(timed(CPU, [(1, 0), (1, 0), (1, 16), (1, 64), (1, 64)])) is None
    free = timed(StepCost(base=0.006, per_row=0.00001, per_prompt=0.0, per_token=0.0))
    free[:, 2] += [0.0, 0.00002, 0.00003, 0.0, 0.0]  # noise of a few microseconds
    fitted = StepCost.fit(free)
    assert fitted is not None and fitted.per_token == 0.0 and fitted.base == pytest.approx(0.006, rel=0.01)


def test_beside_decoding_rows_a_step_carries_what_keeps_it_within_its_slack() -> None:
    """The most prompt tokens whose step stays within slack x the rows' own step; never fewer than the chunk
    whose tokens cost what the chunk itself does (a prompt always moves, at a fair price); the cap where no row
    decodes or where the time allows more."""
    budget = PrefillBudget(most=512, slack=1.25, cost=CPU)
    for rows in (1, 4, 16, 32):
        tokens = budget.allowance(rows)
        assert CPU.seconds(rows, tokens) <= 1.25 * CPU.seconds(rows) < CPU.seconds(rows, tokens + 1)
    assert budget.allowance(1) == math.floor((0.25 * CPU.seconds(1) - CPU.per_prompt) / CPU.per_token) == 12
    assert PrefillBudget(most=512, slack=1.5, cost=CPU).allowance(32) == 64
    assert budget.allowance(0) == 512
    assert PrefillBudget(most=8, slack=1.25, cost=CPU).allowance(32) == 8
    assert PrefillBudget(most=512, slack=1.01, cost=CPU).allowance(1) == math.ceil(CPU.per_prompt / CPU.per_token)


def test_without_slack_or_with_free_tokens_the_budget_is_the_cap_and_untimed_a_fixed_count() -> None:
    """slack 0 (vLLM's fixed budget), or a device whose prompt tokens cost nothing measurable: the cap always;
    a slack whose steps could not be timed: UNTIMED tokens beside decoding rows, the cap beside none."""
    free = StepCost(base=0.006, per_row=0.0, per_prompt=0.0, per_token=0.0)
    for budget in PrefillBudget(most=32, cost=CPU), PrefillBudget(most=512, slack=1.5, cost=free):
        assert {budget.allowance(rows) for rows in range(33)} == {budget.most}
    untimed = PrefillBudget(most=512, slack=1.5)
    assert untimed.allowance(0) == 512 and {untimed.allowance(rows) for rows in range(1, 33)} == {UNTIMED}
    assert "timed at load" in PrefillBudget(most=512, slack=1.5, cost=CPU).describe(32)
    assert "untimed" in untimed.describe(32) and "no measurable time" in PrefillBudget(512, 1.5, free).describe(32)
