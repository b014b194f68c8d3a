"""The rows decoding together: one left-padded KV cache, one forward per step for every row.

No Triton import. Why not transformers' own continuous batching
(``generate_batch`` / ``ContinuousBatchingManager`` in the pinned 4.57)? It
does not start on a CPU (its paged cache sizes itself from CUDA memory
statistics: ``TypeError`` in ``PagedAttentionCache.get_available_memory``),
and it runs one logits processor for every request, so per-request
temperature, top-p, top-k and seeds are impossible. What we keep from
transformers is the models' own forward and ``DynamicCache``; the batch is a
*padded* running batch:

- every row is left-padded to the batch's width; the attention mask hides the
  padding and the position ids count real tokens only (exactly what
  ``generate`` does with a left-padded batch), so a row's tokens do not depend
  on its neighbours;
- admitting rows = one padded prefill forward for the newcomers, then their
  KV cache is joined to the running one (the narrower side left-padded);
- retiring = dropping finished rows from the cache at once (the cache's
  ``batch_select_indices``), then the columns no remaining row uses.

The cache's width never exceeds the longest ``prompt + max_new_tokens`` of its
rows, so ``rows x that`` bounds its memory (scheduler.py admits by it).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from tokenizers.decoders import DecodeStream

from .budget import PrefillBudget
from .parameters import GenerationParams
from .sequence import Sequence, Stream, choose


class LanguageModel(Protocol):
    """What decoding needs from a causal LM (tasks.TextGeneration)."""

    device: torch.device
    eos: frozenset[int]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Last-position logits [rows, vocab] (float32) and the grown cache."""
        ...

    def new_cache(self) -> Any: ...

    def decode(self, tokens: list[list[int]]) -> list[str]: ...

    def decode_step(self, decoder: DecodeStream, token: int) -> str | None: ...

    def parse_options(self, raw: Any) -> GenerationParams: ...

    def sequence(self, prompt: str, params: GenerationParams, stream: Stream | None = None) -> Sequence: ...

    def running_batch(self, prefill: PrefillBudget | None = None) -> Batch:
        """The packed batch (packed.py) where the model packs, else this module's padded one."""
        ...


class Batch(Protocol):
    """What the scheduler drives: RunningBatch, or packed.PackedBatch."""

    rows: list[Sequence]

    def admit(self, new: list[Sequence]) -> None: ...

    def step(self) -> None: ...

    def retire(self) -> None: ...

    def reset(self) -> None: ...


def pad_left(tensor: torch.Tensor, width: int, dim: int = -1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


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
        padding = [[0] * (width - len(row.prompt_ids)) for row in new]
        ids = torch.tensor([pad + row.prompt_ids for pad, row in zip(padding, new)], device=self.model.device)
        mask = torch.tensor(
            [pad + [1] * len(row.prompt_ids) for pad, row in zip(padding, new)], device=self.model.device
        )
        logits, cache = self.model.forward(ids, mask, self.model.new_cache())
        last = record(self.model, new, logits)
        if not self.rows:
            self.rows, self.cache, self.mask, self.last = new, cache, mask, last
            return
        # No Cache API joins caches of different widths: left-pad the narrower, concatenate by hand.
        # Everything is built first, then swapped in: if this fails (out of memory), the batch is as it was.
        width = max(width, self.mask.shape[1])

        def join(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            return torch.cat([pad_left(mine, width, -2), pad_left(theirs, width, -2)])

        joined = [(join(a.keys, b.keys), join(a.values, b.values)) for a, b in zip(self.cache.layers, cache.layers)]
        self.mask = torch.cat([pad_left(self.mask, width), pad_left(mask, width)])
        for layer, (keys, values) in zip(self.cache.layers, joined):
            layer.keys, layer.values = keys, values
        self.rows, self.last = self.rows + new, torch.cat([self.last, last])

    def step(self) -> None:
        """One decoding step for every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits, self.cache = self.model.forward(self.last[:, None], self.mask, self.cache)
        self.last = record(self.model, self.rows, logits)

    def retire(self) -> None:
        """Drop the finished rows, and the cache columns nobody uses any more."""
        keep = [i for i, row in enumerate(self.rows) if not row.finish]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, device=self.model.device)
        self.cache.batch_select_indices(index)
        mask = self.mask[index]
        start = int(mask.any(0).nonzero()[0])
        self.mask, self.last, self.rows = mask[:, start:], self.last[index], [self.rows[i] for i in keep]
        if start:  # the Cache API crops on the right only; the unused columns are on the left (a view, no copy)
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def record(model: LanguageModel, rows: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
    """Every row's next token and the text it adds; a row that ends gets its whole completion decoded once."""
    tokens = choose(logits, rows, model.eos)
    for row, token in zip(rows, tokens):
        row.add(token, model.eos)
        if row.decoder is not None:
            try:
                row.extend(model.decode_step(row.decoder, token))
            except Exception:  # noqa: BLE001 - DecodeStream can refuse odd decoders: this row's text then comes whole at its end
                row.decoder = None
    if ended := [row for row in rows if row.finish in ("eos", "length")]:
        for row, text in zip(ended, model.decode([row.tokens for row in ended])):
            row.complete(text)
    return torch.tensor(tokens, device=model.device)


def generate_all(model: LanguageModel, rows: list[Sequence]) -> None:
    """Static batching: the rows decode together until the last one finishes; finished rows leave at once."""
    batch = model.running_batch()
    with torch.inference_mode():
        batch.admit(rows)
        batch.retire()
        while batch.rows:
            batch.step()
            batch.retire()
