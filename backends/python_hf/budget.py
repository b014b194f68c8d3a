"""How many prompt tokens a packed step may carry: bounded by time, not by a count fixed on one machine.

No Triton import, no torch. Sarathi-Serve's rule for chunked prefill: a step
that carries prompt chunks beside decoding rows may take at most ``slack``
times the step those rows would take alone, so that a join never stalls the
rows decoding (their inter-token gap); a step in which no row decodes carries
waiting prompt tokens up to the cap. Sarathi-Serve sizes its budget by
profiling ahead; here a few packed steps are timed at load
(packed.time_steps), the best of three each, and fitted as

    seconds = base + per_row x decoding rows [+ per_prompt + per_token x prompt tokens]

so the chunk follows the device: on two CPU cores, gpt2 steps take about
18 ms + 0.7 ms a row + 0.3 ms a prompt token (at 1.25x, 12 tokens beside one
row, 31 beside 32); on a GPU, where a step costs about the same up to
hundreds of tokens, the cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

UNTIMED = 32  # prompt tokens beside decoding rows where the steps could not be timed (measured on 2 CPU cores)


@dataclass(frozen=True)
class StepCost:
    """A packed step's seconds: ``base + per_row x decoding rows``, plus ``per_prompt + per_token x prompt tokens``
    in a step that carries prompt tokens (each prompt chunk is one more attention call a layer, and its logits)."""

    base: float
    per_row: float
    per_prompt: float
    per_token: float

    def seconds(self, rows: int, tokens: int = 0) -> float:
        return self.base + self.per_row * rows + (self.per_prompt + self.per_token * tokens if tokens else 0.0)

    @classmethod
    def fit(cls, steps: np.ndarray) -> StepCost | None:
        """Least squares over ``steps`` rows (decoding rows, prompt tokens, seconds); None where they do not
        determine a step's cost. A term that comes out negative is 0: a per-token cost of 0 says prompt tokens
        cost nothing measurable here (a GPU's step costs about the same up to hundreds of them)."""
        rows, tokens, seconds = np.asarray(steps, dtype=float).T
        terms = np.column_stack([np.ones(len(rows)), rows, tokens > 0, tokens])
        solution, _, rank, _ = np.linalg.lstsq(terms, seconds, rcond=None)
        if rank < len(solution) or not np.isfinite(solution).all() or solution[0] <= 0:
            return None
        base, per_row, per_prompt, per_token = (max(float(value), 0.0) for value in solution)
        return cls(base, per_row, per_prompt, per_token)


@dataclass(frozen=True)
class PrefillBudget:
    """A step's prompt tokens: at most ``most``; beside decoding rows, also within ``slack`` x the rows' own step
    by ``cost`` (``slack`` 0: ``most`` always, vLLM's fixed budget; a slack without a measured cost: ``UNTIMED``).
    """

    most: int
    slack: float = 0.0
    cost: StepCost | None = None

    def allowance(self, decoding: int) -> int:
        """Prompt tokens the next step may carry beside ``decoding`` rows: never fewer than a chunk whose tokens
        cost as much as the chunk itself (``per_prompt``), so a prompt always moves at a fair price."""
        if not decoding or not self.slack:
            return self.most
        if self.cost is None:
            return min(self.most, UNTIMED)
        cost = self.cost
        if not cost.per_token:
            return self.most
        spare = (self.slack - 1) * cost.seconds(decoding) - cost.per_prompt
        least = max(1, math.ceil(cost.per_prompt / cost.per_token))
        return min(self.most, max(least, math.floor(spare / cost.per_token)))

    def describe(self, rows: int) -> str:
        """What a step carries, for the log (``rows``: the most rows a batch holds)."""
        if not self.slack:
            return f"up to {self.most} prompt tokens a step"
        if self.cost is None:
            return f"up to {self.allowance(1)} prompt tokens beside decoding rows (untimed), {self.most} a step"
        if not self.cost.per_token:
            return f"prompt tokens took no measurable time: up to {self.most} a step"
        cost = self.cost
        return (
            f"a step with prompt tokens takes at most {self.slack:g}x its decoding rows' own step (timed at load:"
            f" {cost.base * 1e3:.1f} ms + {cost.per_row * 1e3:.2f} ms a row; a prompt, {cost.per_prompt * 1e3:.1f} ms"
            f" + {cost.per_token * 1e3:.3f} ms a token): {self.allowance(1)} prompt tokens beside 1 row,"
            f" {self.allowance(rows)} beside {rows}, up to {self.most} a step"
        )
