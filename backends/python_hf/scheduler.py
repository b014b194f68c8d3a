"""Continuous batching: one running batch on a thread of its own, new requests admitted at every step boundary.

No Triton import. The streaming ``<name>_stream`` model hands each request to a
:class:`Scheduler` (the in-flight batching of vLLM, TGI and TensorRT-LLM); the
static ``<name>`` model runs running_batch.generate_all over each dynamic
batch instead. Its knobs and their defaults are parameters.Limits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from .batching import RequestError, decode_rows
from .budget import PrefillBudget
from .hardware import on_a_thread_that_ends
from .packed import PackedBatch, PackingModel, PrefillError, time_steps
from .parameters import Limits
from .running_batch import LanguageModel, RunningBatch
from .sequence import Sequence, Stream

logger = logging.getLogger(__name__)


class Observer(Protocol):
    """What the scheduler reports (the glue: Triton custom metrics)."""

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float, tokens: int) -> None: ...

    def generated(self, tokens: int) -> None:
        """Tokens streamed, once a flush (every metric is a message to the server: one a step, not one a row)."""
        ...

    def occupancy(self, running: int, queued: int) -> None: ...


class Quiet:
    def first_token(self, seconds: float) -> None:
        pass

    def inter_token(self, seconds: float, tokens: int) -> None:
        pass

    def generated(self, tokens: int) -> None:
        pass

    def occupancy(self, running: int, queued: int) -> None:
        pass


class Scheduler:
    """Continuous batching on a thread of its own.

    Every iteration: drop cancelled rows, admit waiting requests that fit
    (one prefill forward for them), run one decoding step for all rows, send
    each row its new text, retire finished rows. ``submit`` is thread-safe
    and never blocks; a request whose own reservation exceeds
    ``max_running_tokens`` is refused at once.

    A packed batch (packed.py, the models that pack) admits at every step
    whatever fits: a join costs nothing, and a prompt goes in by chunks within
    the step's token budget, inside the same forward as the decoding rows.
    A padded batch (running_batch.py) admits by TGI's rule: at once into an
    empty batch; otherwise when the waiting requests number
    ``waiting_served_ratio`` x the running ones, or the oldest has waited
    ``max_waiting_steps`` decoding steps, since each of its admissions costs a
    prefill forward and a copy of the cache.
    """

    def __init__(
        self,
        model: LanguageModel,
        limits: Limits | None = None,
        observer: Observer | None = None,
        log_error: Callable[[str], None] | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.observer = observer or Quiet()
        self.log_error = log_error or logger.error
        self.model, self.batch = model, model.running_batch(PrefillBudget(self.limits.max_prefill_tokens))
        if isinstance(self.batch, PackedBatch) and self.limits.prefill_step_slack:
            self.batch.prefill = self.timed_budget(self.batch.model)
        self.steps_waited = 0  # decoding steps run while someone waited
        self.waiting: deque[Sequence] = deque()
        self.wake = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self.run, name="tritonhf-decode", daemon=True)
        self.thread.start()

    def timed_budget(self, model: PackingModel) -> PrefillBudget:
        """The packed steps' prompt tokens (budget.py) within the slack, by their cost timed now, on a thread of
        its own (the caller's would keep an OpenMP team: hardware.on_a_thread_that_ends)."""
        limits = self.limits
        try:
            cost = on_a_thread_that_ends(
                lambda: time_steps(model, limits.max_running_sequences, limits.max_running_tokens)
            )
        except Exception:  # noqa: BLE001 - serving goes on, with budget.UNTIMED
            self.log_error(f"could not time packed steps; prompts go in by a fixed count:\n{traceback.format_exc()}")
            cost = None
        return PrefillBudget(limits.max_prefill_tokens, limits.prefill_step_slack, cost)

    def describe(self) -> str:
        """The batch it runs, for the log."""
        if isinstance(self.batch, RunningBatch):
            return "a padded running batch"
        prefill = self.batch.prefill.describe(self.limits.max_running_sequences) if self.batch.prefill else "whole"
        return f"packed steps, prompts chunked: {prefill}; attention in {self.batch.model.attention}"

    def start(self, prompt: np.ndarray | None, raw: Any, stream: Stream) -> None:
        """Check one streaming request and queue it; a bad one gets its error on its own stream."""
        try:
            rows = decode_rows(None if prompt is None else prompt.reshape(-1, 1))
            if len(rows) != 1:
                raise RequestError(f"a stream answers one prompt, got {len(rows)}")
            self.submit(self.model.sequence(rows[0], self.model.parse_options(raw), stream))
        except RequestError as err:
            stream.fail(str(err), "invalid")
        except Exception as err:  # noqa: BLE001 - this request fails, not the model
            self.log_error(traceback.format_exc())
            stream.fail(f"could not start: {type(err).__name__}: {err}".splitlines()[0], "internal")

    def submit(self, row: Sequence) -> None:
        if row.reserved > self.limits.max_running_tokens:
            raise RequestError(
                f"prompt ({len(row.prompt_ids)} tokens) + max_new_tokens ({row.params.max_new_tokens})"
                f" exceeds this model's max_running_tokens ({self.limits.max_running_tokens})"
            )
        with self.wake:
            if self.closing:
                refusal = "the model is unloading"
            elif len(self.waiting) >= self.limits.max_waiting_sequences:
                refusal = f"overloaded: {len(self.waiting)} requests already wait for a slot; try again later"
            else:
                self.waiting.append(row)
                self.wake.notify()
                return
        self.fail(row, refusal, "unavailable")

    def close(self) -> None:
        """Stop after the current step; every request not yet answered gets an error."""
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            self.log_error("the decoding thread did not stop within 30 s")

    def admissible(self) -> list[Sequence]:
        """Waiting rows that fit, in arrival order (the first that doesn't fit waits, and so does everyone after it)."""
        new: list[Sequence] = []
        running = len(self.batch.rows)
        if (
            isinstance(self.batch, RunningBatch)  # a padded join costs a prefill forward: TGI's rule spaces them
            and running
            and len(self.waiting) < self.limits.waiting_served_ratio * running
            and self.steps_waited < self.limits.max_waiting_steps
        ):
            self.steps_waited += bool(self.waiting)
            return new
        self.steps_waited = 0
        rows, widest = len(self.batch.rows), max((row.reserved for row in self.batch.rows), default=0)
        while self.waiting and rows + len(new) < self.limits.max_running_sequences:
            head = self.waiting[0]
            if (rows + len(new) + 1) * max(widest, head.reserved) > self.limits.max_running_tokens:
                break
            new.append(self.waiting.popleft())
            widest = max(widest, head.reserved)
        return new

    def run(self) -> None:
        while (new := self.next_admissions()) is not None:
            with torch.inference_mode():
                self.serve(new)
            self.report("occupancy", len(self.batch.rows), len(self.waiting))
        for row in self.batch.rows:
            self.fail(row, "the model is unloading", "unavailable")

    def next_admissions(self) -> list[Sequence] | None:
        """Wait for work; the requests to admit now (None: closing, and everyone waiting has had its error)."""
        with self.wake:
            while not (self.waiting or self.batch.rows or self.closing):
                self.wake.wait()
            if self.closing:
                leftover, self.waiting = self.waiting, deque()
            else:
                leftover, candidates = None, self.admissible()
        if leftover is not None:
            for row in leftover:
                self.fail(row, "the model is unloading", "unavailable")
            return None
        return [row for row in candidates if not self.cancelled(row)]  # outside the lock: it asks the server

    def serve(self, new: list[Sequence]) -> None:
        """One iteration: drop the cancelled, admit the new, step, send.

        Admission is all or none: a failed prefill fails only the newcomers.
        """
        for row in self.batch.rows:
            self.cancelled(row)
        self.guard(self.batch.rows, self.batch.retire)
        if new and not self.guard(new, lambda: self.batch.admit(new), reset=False):
            new.clear()
        self.guard(self.batch.rows, self.step)

    def step(self) -> None:
        self.flush()  # the newcomers' first pieces
        if self.batch.rows:
            try:
                self.batch.step()
            except PrefillError as failed:  # a packed step fails its prompts, then runs again for the others
                cause = failed.__cause__
                self.log_error(traceback.format_exc())
                for row in failed.rows:
                    self.fail(row, f"generation failed: {type(cause).__name__}: {cause}".splitlines()[0], "internal")
                self.batch.retire()
                self.batch.step()
            self.flush()

    def guard(self, rows: list[Sequence], work: Callable[[], Any], reset: bool = True) -> bool:
        """Run ``work``; if it raises, ``rows`` fail (INTERNAL) and serving goes on.

        With ``reset``, the batch is emptied too: the failure may have torn it.
        """
        try:
            work()
            return True
        except Exception as err:  # noqa: BLE001 - these requests fail; the scheduler lives on
            self.log_error(traceback.format_exc())
            for row in list(rows):
                self.fail(row, f"generation failed: {type(err).__name__}: {err}".splitlines()[0], "internal")
            if reset:
                self.batch.reset()
            return False

    def report(self, what: str, *values: float) -> None:
        """Metrics are best-effort: a failing observer is logged, never fatal."""
        try:
            getattr(self.observer, what)(*values)
        except Exception:  # noqa: BLE001 - metrics are best-effort: logged, never fatal
            self.log_error(f"metrics ({what}): {traceback.format_exc()}")

    def flush(self) -> None:
        """Send every row what it has new, then retire the finished ones."""
        now, streamed = time.monotonic(), 0
        for row in self.batch.rows:
            if (piece := row.take(self.limits.stream_interval)) is None:
                continue
            try:
                row.stream.send(piece)
            except Exception as err:  # noqa: BLE001 - this row fails; the others go on
                if not self.cancelled(row):  # a client that went away is cancelled; anything else is our failure
                    self.fail(row, f"could not send: {err}", "internal")
                continue
            row.closed = piece.final
            if row.responses == 1:
                self.report("first_token", now - row.arrived)
                if piece.new_tokens > 1:
                    self.report("inter_token", 0.0, piece.new_tokens - 1)
            else:
                self.report("inter_token", now - row.last_sent, piece.new_tokens)
            row.last_sent = now
            streamed += piece.new_tokens
        if streamed:
            self.report("generated", streamed)
        self.batch.retire()

    def cancelled(self, row: Sequence) -> bool:
        try:
            cancelled = row.stream.cancelled()
        except Exception:  # noqa: BLE001 - the request is gone
            cancelled = True
        if cancelled:
            self.fail(row, "request cancelled", "cancelled")
            row.finish = "cancelled"
        return cancelled

    @staticmethod
    def fail(row: Sequence, message: str, kind: str) -> None:
        """The row's error, as its final response, unless it has had one."""
        row.finish = row.finish or "error"
        if row.closed:
            return
        row.closed = True
        with contextlib.suppress(Exception):  # nobody is listening any more
            row.stream.fail(message, kind)
