"""One prompt being answered, token by token: its text so far, what it streamed, how it samples.

No Triton import. A :class:`Sequence` is a row of a running batch
(running_batch.py): it gets one token per decoding step, turns it into text
with ``tokenizers``' ``DecodeStream`` (which holds back unfinished UTF-8
characters), cuts the text at stop strings, and hands the streaming glue the
pieces that can no longer change. The next token of every row is chosen by
:func:`choose`: greedy, or sampled through transformers' own logits warpers
with the row's own parameters and generator.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tokenizers.decoders import DecodeStream
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .heads import Piece
from .parameters import GenerationParams


class Stream(Protocol):
    """Where a streaming request's pieces go (the Triton glue: its response sender)."""

    def send(self, piece: Piece) -> None: ...

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
    sent_chars: int = 0
    sent_tokens: int = 0
    responses: int = 0
    arrived: float = field(default_factory=time.monotonic)
    last_sent: float = 0.0
    decoder: DecodeStream | None = field(default_factory=lambda: DecodeStream(skip_special_tokens=True))
    sampler: tuple[LogitsProcessorList, torch.Generator] | None = None  # made at the first sampled token

    @property
    def reserved(self) -> int:
        """The cache columns this row may need."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    def add(self, token: int, eos: frozenset[int]) -> None:
        self.tokens.append(token)
        if token in eos:
            self.finish = "eos"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish = "length"

    def extend(self, piece: str | None) -> None:
        """The text of the newest token (None: DecodeStream holds back a character still missing bytes)."""
        if piece:
            start = len(self.text)
            self.text += piece
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
        """How much of the text can't change any more: everything but a stop string's possible start."""
        if self.finish:
            return len(self.text)
        end = len(self.text)
        for stop in self.params.stop:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if self.text[:end].endswith(stop[:size]):
                    end -= size
                    break
        return max(end, self.sent_chars)

    def take(self, every: int = 1) -> Piece | None:
        """The next piece to stream, or None if there is nothing to send yet: the first token at once, then
        ``every`` tokens a piece (fewer in the last)."""
        if self.responses and not self.finish and len(self.tokens) - self.sent_tokens < every:
            return None
        end = self.settled()
        if end == self.sent_chars and not self.finish:
            return None
        text = self.text[self.sent_chars : end]
        if self.responses == 0 and self.params.return_full_text:
            text = self.prompt + text
        piece = Piece(text, len(self.tokens) - self.sent_tokens, len(self.prompt_ids), self.finish)
        self.sent_chars, self.sent_tokens, self.responses = end, len(self.tokens), self.responses + 1
        return piece

    def answer(self) -> str:
        return self.prompt + self.text if self.params.return_full_text else self.text

    def whole(self) -> Piece:
        """The whole answer as one piece (static batching)."""
        return Piece(self.answer(), len(self.tokens), len(self.prompt_ids), self.finish)

    def sample(self, logits: torch.Tensor) -> int:
        """One token from this row's logits: transformers' warpers in ``generate``'s order, then a draw."""
        if self.sampler is None:
            warpers = LogitsProcessorList([TemperatureLogitsWarper(self.params.temperature)])
            if self.params.top_k:  # 0: no top-k filter
                warpers.append(TopKLogitsWarper(self.params.top_k))
            if self.params.top_p < 1:
                warpers.append(TopPLogitsWarper(self.params.top_p))
            generator = torch.Generator(logits.device)
            if self.params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.params.seed)
            self.sampler = (warpers, generator)
        warpers, generator = self.sampler
        # Shifted so that the best token's logit is 0: dividing by any temperature > 0 then gives finite or -inf
        # scores with one 0 among them, never NaN (1e-40 would overflow unshifted logits to inf, inf - inf = NaN).
        scores = warpers(None, (logits - logits.max())[None])  # these warpers never read the input ids
        return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


class AdditivePenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, as a logits processor over the generated ids (transformers has
    only the multiplicative repetition penalty): each token's score is lowered by ``presence`` if it was generated
    before, and by ``frequency`` times how often."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence, self.frequency = presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0)


def penalise(logits: torch.Tensor, row: Sequence) -> None:
    """The row's penalties on its logits, in place, over the tokens it generated so far."""
    if row.tokens:
        generated = torch.tensor([row.tokens], device=logits.device)
        logits[:] = AdditivePenalties(row.params.presence_penalty, row.params.frequency_penalty)(
            generated, logits[None]
        )[0]


def choose(logits: torch.Tensor, rows: list[Sequence], eos: frozenset[int]) -> list[int]:
    """The next token of every row: greedy or sampled, by the row's own parameters.

    EOS is masked by hand for rows short of ``min_new_tokens``: transformers'
    MinNewTokensLengthLogitsProcessor reads each row's length from its input
    ids, which a left-padded running batch doesn't keep; one assignment masks every row.
    Penalties apply first, as in vLLM (transformers has no additive OpenAI-style processor).
    """
    for i, row in enumerate(rows):
        if row.params.penalised:
            penalise(logits[i], row)
    early = [i for i, row in enumerate(rows) if len(row.tokens) < row.params.min_new_tokens]
    if early and eos:
        rows_index = torch.tensor(early, device=logits.device)[:, None]
        logits[rows_index, torch.tensor(sorted(eos), device=logits.device)[None, :]] = -math.inf
    tokens = logits.argmax(-1).tolist()
    return [
        row.sample(logits[i]) if row.params.do_sample else token for i, (row, token) in enumerate(zip(rows, tokens))
    ]
