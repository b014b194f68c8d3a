"""Token-level generation: one forward per step for requests with their own parameters (parameters.py), continuous batching.

No Triton import. The static ``<name>`` model runs :func:`generate_all` over
its dynamically batched requests; the streaming ``<name>_stream`` model feeds a
:class:`Scheduler`, which keeps one running batch and admits new requests at
every step boundary (the in-flight batching of vLLM, TGI and TensorRT-LLM).

Why not transformers' own continuous batching (``generate_batch`` /
``ContinuousBatchingManager`` in the pinned 4.57.6)? It does not start on a
CPU (its paged cache sizes itself from CUDA memory statistics:
``TypeError`` in ``PagedAttentionCache.get_available_memory``), and it runs one
logits processor for every request, so per-request temperature, top-p, top-k
and seeds are impossible. What we keep from transformers is its
``DynamicCache`` and the models' own forward; the batch is a *padded* running
batch:

- every row is left-padded to the batch's width; the attention mask hides the
  padding and the position ids count real tokens only (exactly what
  ``generate`` does with a left-padded batch), so a row's tokens do not depend
  on its neighbours;
- admitting requests = one padded prefill forward for the newcomers, then
  their KV cache is concatenated to the running one (the narrower side
  left-padded);
- retiring = dropping finished rows from the cache at once, then the columns
  no remaining row uses.
The width of the cache never exceeds the longest ``prompt + max_new_tokens``
of the rows in it, so ``rows x that`` bounds its memory: the scheduler admits
a request only while that stays within ``max_running_tokens`` and the rows
within ``max_running_sequences``; the rest wait in arrival order.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .batching import RequestError, decode_rows
from .parameters import GenerationParams

logger = logging.getLogger(__name__)

# --- one sequence --------------------------------------------------------------------------


class Stream(Protocol):
    """Where a streaming request's pieces go (the Triton glue: its response sender)."""

    def send(self, text: str, new_tokens: int, final: bool) -> None: ...

    def fail(self, message: str, kind: str) -> None:
        """kind: invalid (a bad request), cancelled, or internal."""
        ...

    def cancelled(self) -> bool: ...


@dataclass(eq=False)
class Sequence:
    """One prompt being answered: its tokens so far, the text they make, what was sent."""

    prompt: str
    prompt_ids: list[int]
    params: GenerationParams
    stream: Stream | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the completion, cut before a stop string
    finish: str | None = None  # length | eos | stop | cancelled | error
    closed: bool = False  # its final response, or its error, is sent
    prefix_offset: int = 0  # incremental decoding: tokens[prefix_offset:read_offset] made the text's last piece
    read_offset: int = 0
    sent_chars: int = 0
    sent_tokens: int = 0
    responses: int = 0
    arrived: float = field(default_factory=time.monotonic)
    last_sent: float = 0.0
    generator: torch.Generator | None = None

    @property
    def reserved(self) -> int:
        """The cache columns this row may need."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    def window(self) -> tuple[list[int], list[int]]:
        """The tokens to decode for the next piece: since the last piece's start, with and without the unread ones."""
        return self.tokens[self.prefix_offset :], self.tokens[self.prefix_offset : self.read_offset]

    def add(self, token: int, eos: frozenset[int]) -> None:
        self.tokens.append(token)
        if token in eos:
            self.finish = "eos"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish = "length"

    def extend(self, window: str, before: str) -> None:
        """Incremental decoding (TGI's): the window's text past what its read part made is new, unless it ends mid-character."""
        if len(window) > len(before) and not window.endswith("\ufffd"):
            start = len(self.text)
            self.text += window[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            self.cut(start)

    def complete(self, text: str) -> None:
        """The whole completion decoded at once, as ``generate``'s caller would: the final text."""
        self.text = text
        self.cut(0)

    def cut(self, start: int) -> None:
        """End the text before the first stop string that ends past ``start``."""
        hits = [i for stop in self.params.stop if (i := self.text.find(stop, max(0, start - len(stop) + 1))) >= 0]
        if hits:
            self.text, self.finish = self.text[: min(hits)], "stop"

    def settled(self) -> int:
        """How much of the text can't change any more: not a stop string's start (``extend`` holds back unfinished characters)."""
        if self.finish:
            return len(self.text)
        end = len(self.text)
        for stop in self.params.stop:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if self.text[:end].endswith(stop[:size]):
                    end -= size
                    break
        return max(end, self.sent_chars)

    def take(self) -> tuple[str, int] | None:
        """The next piece to stream and its new-token count, or None if there is nothing to send yet."""
        end = self.settled()
        if end == self.sent_chars and not self.finish:
            return None
        piece = self.text[self.sent_chars : end]
        if self.responses == 0 and self.params.return_full_text:
            piece = self.prompt + piece
        new_tokens = len(self.tokens) - self.sent_tokens
        self.sent_chars, self.sent_tokens, self.responses = end, len(self.tokens), self.responses + 1
        return piece, new_tokens

    def answer(self) -> str:
        return self.prompt + self.text if self.params.return_full_text else self.text


# --- the model side ------------------------------------------------------------------------


class LanguageModel(Protocol):
    """What decoding needs from a causal LM (tasks.TextGeneration)."""

    device: torch.device
    eos: frozenset[int]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Last-position logits [rows, vocab] (float32) and the grown cache."""
        ...

    def new_cache(self) -> Any: ...

    def decode(self, tokens: list[list[int]]) -> list[str]: ...

    def parse_options(self, raw: Any) -> GenerationParams: ...

    def sequence(self, prompt: str, params: GenerationParams, stream: Stream | None = None) -> Sequence: ...


def pad_left(tensor: torch.Tensor, width: int, dim: int = -1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """One token from one row of logits: temperature, then top-k, then top-p (transformers' order)."""
    scores = logits / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1:
        ordered, order = torch.sort(scores, descending=True)
        probabilities = ordered.softmax(-1)
        outside = probabilities.cumsum(-1) - probabilities > params.top_p  # keeps at least the first
        scores = scores.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), -math.inf)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def choose(logits: torch.Tensor, rows: list[Sequence], eos: frozenset[int]) -> list[int]:
    """The next token of every row: greedy or sampled, by the row's own parameters."""
    early = [i for i, row in enumerate(rows) if len(row.tokens) < row.params.min_new_tokens]
    if early and eos:
        logits[torch.tensor(early, device=logits.device)[:, None], torch.tensor(sorted(eos), device=logits.device)[None, :]] = -math.inf
    tokens = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if row.params.do_sample:
            if row.generator is None:
                row.generator = torch.Generator(logits.device)
                if row.params.seed is None:
                    row.generator.seed()
                else:
                    row.generator.manual_seed(row.params.seed)
            tokens[i] = sample(logits[i], row.params, row.generator)
    return tokens


class RunningBatch:
    """The rows decoding together: one left-padded KV cache, one forward per step."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.rows: list[Sequence] = []
        self.cache: Any = None
        self.mask = self.last = torch.empty(0)

    def admit(self, new: list[Sequence]) -> None:
        """Prefill the newcomers in one padded forward, choose their first tokens, join them to the batch."""
        width = max(len(row.prompt_ids) for row in new)
        ids = torch.tensor([[0] * (width - len(row.prompt_ids)) + row.prompt_ids for row in new], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(row.prompt_ids)) + [1] * len(row.prompt_ids) for row in new], device=self.model.device)
        logits, cache = self.model.forward(ids, mask, self.model.new_cache())
        last = self.record(new, logits)
        if not self.rows:
            self.rows, self.cache, self.mask, self.last = new, cache, mask, last
            return
        # build everything first, then swap it in: if this fails (out of memory), the running batch is as it was
        width = max(width, self.mask.shape[1])
        joined = [[torch.cat([pad_left(a, width, -2), pad_left(b, width, -2)]) for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values))] for mine, theirs in zip(self.cache.layers, cache.layers)]
        self.mask = torch.cat([pad_left(self.mask, width), pad_left(mask, width)])
        for layer, (keys, values) in zip(self.cache.layers, joined):
            layer.keys, layer.values = keys, values
        self.rows, self.last = self.rows + new, torch.cat([self.last, last])

    def step(self) -> None:
        """One decoding step for every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits, self.cache = self.model.forward(self.last[:, None], self.mask, self.cache)
        self.last = self.record(self.rows, logits)

    def record(self, rows: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Every row's next token and the text it adds; a row that ends gets its whole completion decoded once."""
        tokens = choose(logits, rows, self.model.eos)
        for row, token in zip(rows, tokens):
            row.add(token, self.model.eos)
        windows = [row.window() for row in rows]
        for row, window, before in zip(rows, self.model.decode([w for w, _ in windows]), self.model.decode([b for _, b in windows])):
            row.extend(window, before)
        if ended := [row for row in rows if row.finish in ("eos", "length")]:
            for row, text in zip(ended, self.model.decode([row.tokens for row in ended])):
                row.complete(text)
        return torch.tensor(tokens, device=self.model.device)

    def retire(self) -> None:
        """Drop the finished rows, and the cache columns nobody uses any more."""
        keep = [i for i, row in enumerate(self.rows) if not row.finish]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, device=self.model.device)
        mask = self.mask[index]
        start = int(mask.any(0).nonzero()[0])
        self.mask, self.last, self.rows = mask[:, start:], self.last[index], [self.rows[i] for i in keep]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]


def generate_all(model: LanguageModel, rows: list[Sequence]) -> None:
    """Static batching: the rows decode together until the last one finishes; finished rows leave at once."""
    batch = RunningBatch(model)
    with torch.inference_mode():
        batch.admit(rows)
        batch.retire()
        while batch.rows:
            batch.step()
            batch.retire()


# --- continuous batching -------------------------------------------------------------------


class Observer(Protocol):
    """What the scheduler reports (the glue: Triton custom metrics)."""

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float, tokens: int) -> None: ...

    def occupancy(self, running: int, queued: int) -> None: ...


class Quiet:
    def first_token(self, seconds: float) -> None:
        pass

    def inter_token(self, seconds: float, tokens: int) -> None:
        pass

    def occupancy(self, running: int, queued: int) -> None:
        pass


class Scheduler:
    """Continuous batching on a thread of its own.

    Every iteration: drop cancelled rows, admit waiting requests that fit
    (one prefill forward for them), run one decoding step for all rows, send
    each row its new text, retire finished rows. ``submit`` is thread-safe
    and never blocks; a request whose own reservation exceeds
    ``max_tokens`` is refused at once.

    When to admit is TGI's rule: at once into an empty batch; otherwise when
    the waiting requests number ``waiting_served_ratio`` x the running ones,
    or the oldest has waited ``max_waiting_steps`` decoding steps. Each
    admission costs a prefill forward and a copy of the cache, so admitting a
    few at a time beats one at every step (on a 2-core CPU a gpt2 prefill
    forward costs about a third of a 32-row decoding step, before its tokens).
    """

    def __init__(
        self,
        model: LanguageModel,
        max_sequences: int,
        max_tokens: int,
        observer: Observer | None = None,
        log_error: Callable[[str], None] | None = None,
        max_waiting_steps: int = 10,
        waiting_served_ratio: float = 1.2,
    ) -> None:
        self.model, self.batch = model, RunningBatch(model)
        self.max_sequences, self.max_tokens = max_sequences, max_tokens
        self.max_waiting_steps, self.waiting_served_ratio = max_waiting_steps, waiting_served_ratio
        self.steps_waited = 0  # decoding steps run while someone waited
        self.observer = observer or Quiet()
        self.log_error = log_error or logger.error
        self.waiting: deque[Sequence] = deque()
        self.wake = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self.run, name="tritonhf-decode", daemon=True)
        self.thread.start()

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
        if row.reserved > self.max_tokens:
            raise RequestError(f"prompt ({len(row.prompt_ids)} tokens) + max_new_tokens ({row.params.max_new_tokens}) exceeds this model's max_running_tokens ({self.max_tokens})")
        with self.wake:
            if not self.closing:
                self.waiting.append(row)
                self.wake.notify()
                return
        self.fail(row, "the model is unloading", "internal")

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
        if running and len(self.waiting) < self.waiting_served_ratio * running and self.steps_waited < self.max_waiting_steps:
            self.steps_waited += bool(self.waiting)
            return new
        self.steps_waited = 0
        rows, widest = len(self.batch.rows), max((row.reserved for row in self.batch.rows), default=0)
        while self.waiting and rows + len(new) < self.max_sequences:
            head = self.waiting[0]
            if (rows + len(new) + 1) * max(widest, head.reserved) > self.max_tokens:
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
            self.fail(row, "the model is unloading", "internal")

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
                self.fail(row, "the model is unloading", "internal")
            return None
        return [row for row in candidates if not self.cancelled(row)]  # outside the lock: it asks the server

    def serve(self, new: list[Sequence]) -> None:
        """One iteration: drop the cancelled, admit the new (all or none: a failed prefill fails only them), step, send."""
        for row in self.batch.rows:
            self.cancelled(row)
        self.guard(self.batch.rows, self.batch.retire)
        if new and not self.guard(new, lambda: self.batch.admit(new), reset=False):
            new.clear()
        self.guard(self.batch.rows, self.step)

    def step(self) -> None:
        self.flush()  # the newcomers' first pieces
        if self.batch.rows:
            self.batch.step()
            self.flush()

    def guard(self, rows: list[Sequence], work: Callable[[], Any], reset: bool = True) -> bool:
        """Run ``work``; if it raises, ``rows`` fail (INTERNAL), the batch is emptied if it may be torn, and serving goes on."""
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
        except Exception:  # noqa: BLE001
            self.log_error(f"metrics ({what}): {traceback.format_exc()}")

    def flush(self) -> None:
        """Send every row what it has new, then retire the finished ones."""
        now = time.monotonic()
        for row in self.batch.rows:
            if (piece := row.take()) is None:
                continue
            text, new_tokens = piece
            try:
                row.stream.send(text, new_tokens, final=row.finish is not None)
            except Exception as err:  # noqa: BLE001 - a client that went away
                self.fail(row, f"could not send: {err}", "cancelled")
                continue
            row.closed = row.finish is not None
            if row.responses == 1:
                self.report("first_token", now - row.arrived)
                if new_tokens > 1:
                    self.report("inter_token", 0.0, new_tokens - 1)
            else:
                self.report("inter_token", now - row.last_sent, new_tokens)
            row.last_sent = now
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
        try:
            row.stream.fail(message, kind)
        except Exception:  # noqa: BLE001 - nobody is listening any more
            pass
