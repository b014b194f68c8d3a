"""Collect -> pad -> forward -> split over one Triton batch: the data path, with no Triton import.

Triton's dynamic batcher hands ``execute`` a list of requests; each carries a
``prompt`` tensor of shape [rows, 1]. We run one padded forward (generation:
one forward per decoding step) over every valid row of every request, then give each request
exactly its own rows back. A bad request becomes a :class:`Failure` at its own
index; it never sinks the batch.

The modules of this directory are copied next to ``model.py`` into every
generated model, so they import each other relatively and never the
``tritonhf`` package; this one needs numpy only. The *pad* and *forward*
stages are the step's own (tasks.py, text.py, runtimes.py, heads.py); which
step a model runs is steps.py's business.
"""

from __future__ import annotations

import itertools
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)
T = TypeVar("T")
Outputs = dict[str, np.ndarray]
BatchFn = Callable[[list[str]], Mapping[str, np.ndarray]]  # texts -> arrays, one row per text
TensorFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]  # arrays -> arrays, row for row


class RequestError(ValueError):
    """What is wrong with one request; its client gets this message as INVALID_ARG."""


@dataclass(frozen=True)
class Failure:
    """The answer to a request that could not be served."""

    message: str
    internal: bool = False  # True: the server failed (INTERNAL); False: the request is bad (INVALID_ARG)


Result = Outputs | Failure


@dataclass(frozen=True)
class Collected:
    """All valid rows of a batch, flattened in request order, and where they came from."""

    texts: list[str]
    counts: list[int]  # rows per request; 0 for a rejected request
    failures: dict[int, Failure] = field(default_factory=dict)
    options: list[Any] = field(default_factory=list)  # per row, read by the step (read_rows)


def decode_rows(prompt: np.ndarray | None) -> list[str]:
    """The rows of one request's ``prompt`` tensor (shape [rows, 1], BYTES) as text."""
    if prompt is None:
        raise RequestError("missing input 'prompt'")
    if prompt.ndim != 2 or prompt.shape[1] != 1:
        raise RequestError(f"input 'prompt' must have shape [rows, 1], got {list(prompt.shape)}")
    if prompt.shape[0] == 0:
        raise RequestError("input 'prompt' has no rows")
    texts = []
    for row, value in enumerate(prompt[:, 0]):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RequestError(f"prompt row {row} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
        elif not isinstance(value, str):
            raise RequestError(f"prompt row {row} is not a string ({type(value).__name__})")
        if not value.strip():
            raise RequestError(f"prompt row {row} is empty")
        texts.append(value)
    return texts


def attempt(read: Callable[[], T]) -> T | Failure:
    """One request's read (its tensors, its parameters), or the Failure that answers it: a request that
    can't even be read fails alone, as INVALID_ARG, and never sinks its batch."""
    try:
        return read()
    except Exception as err:  # noqa: BLE001 - whatever a malformed request makes the reader raise
        return Failure(f"could not read the request: {type(err).__name__}: {err}".splitlines()[0])


def collect(
    prompts: Sequence[np.ndarray | Failure | None],
    options: Sequence[Any] | None = None,
    read: Callable[[list[str], Any], list[Any]] | None = None,
) -> Collected:
    """Decode and validate every request, and, if the step reads them (``read_rows``), its rows with its options:
    one item per row (its parsed options), every row checked, so that a bad row fails its own request.

    A bad request becomes a Failure at its index; so does one that could not be read (a Failure already).
    """
    texts: list[str] = []
    counts: list[int] = []
    failures: dict[int, Failure] = {}
    parsed: list[Any] = []
    for index, prompt in enumerate(prompts):
        try:
            if isinstance(prompt, Failure):
                raise RequestError(prompt.message)
            rows = decode_rows(prompt)
            if read:
                parsed.extend(read(rows, options[index] if options else {}))
        except RequestError as err:
            failures[index] = Failure(str(err))
            rows = []
        except Exception as err:  # noqa: BLE001 - a reader's bug fails this request, not its batch
            failures[index] = Failure(
                f"could not read the request: {type(err).__name__}: {err}".splitlines()[0], internal=True
            )
            rows = []
        texts.extend(rows)
        counts.append(len(rows))
    return Collected(texts, counts, failures, parsed)


FORWARD_OVERHEAD_TOKENS = {"cpu": 35, "cuda": 4096}  # length_buckets' default per device; on a GPU: one forward


def length_buckets(lengths: Sequence[int], overhead_tokens: float) -> list[list[int]]:
    """Rows grouped for padded forwards: the cheapest split of the length-sorted rows.

    A forward costs about ``overhead_tokens + rows x longest row`` token-times
    (measured on a 2-core CPU for DistilBERT-base: 16 ms + 0.46 ms a token, so
    ~35). One padded forward over prompts of 5 to 46 tokens spends most of its
    time on padding; this dynamic programme over the sorted lengths picks the
    contiguous groups that minimise the total. With a large overhead (a GPU,
    where a small forward costs about as much as a big one) it returns one group:
    one padded forward for the whole batch.
    """
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for stop in range(1, len(order) + 1):
        longest = lengths[order[stop - 1]]
        for start in range(stop):
            cost = best[start] + overhead_tokens + (stop - start) * longest
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    groups, stop = [], len(order)
    while stop:
        groups.append(order[cut[stop] : stop])
        stop = cut[stop]
    return groups[::-1]


def merge(parts: Sequence[tuple[Sequence[int], Mapping[str, np.ndarray]]], rows: int) -> Outputs:
    """Outputs of row groups back into one batch, every row at its original index."""
    merged: Outputs = {}
    for indices, outputs in parts:
        for name, array in outputs.items():
            if name not in merged:
                merged[name] = np.empty((rows, *array.shape[1:]), dtype=array.dtype)
            merged[name][list(indices)] = array
    return merged


def split(outputs: Mapping[str, np.ndarray], counts: Sequence[int]) -> list[Outputs]:
    """Slice batch outputs back into one dict per request, by the recorded row counts."""
    total = sum(counts)
    for name, array in outputs.items():
        if len(array) != total:
            raise RuntimeError(f"output {name!r} has {len(array)} rows for {total} input rows")
    bounds = np.cumsum([0, *counts])
    return [{name: array[start:stop] for name, array in outputs.items()} for start, stop in itertools.pairwise(bounds)]


def guarded(compute: Callable[[], list[Outputs]], requests: int, log_error: Callable[[str], None]) -> list[Result]:
    """Run the batch; if it raises, log the traceback and fail each of its requests, briefly."""
    try:
        return list(compute())
    except Exception as err:  # noqa: BLE001 - turned into per-request errors, traceback logged
        log_error(traceback.format_exc())
        return [Failure(f"inference failed: {type(err).__name__}: {err}".splitlines()[0], internal=True)] * requests


def run_batch(
    forward: BatchFn,
    prompts: Sequence[np.ndarray | Failure | None],
    log_error: Callable[[str], None] = logger.error,
    options: Sequence[Any] | None = None,
) -> list[Result]:
    """One result per request, in request order: outputs, or a Failure for that request alone.

    ``forward`` maps a list of texts to arrays whose first axis is the text. It
    is called once, over the valid rows of every request. A step with a
    ``read_rows`` method (generation, feature extraction) also gets what it
    read of each row with that request's ``options`` (its parameters and
    optional tensors); the other steps take none. If ``forward`` raises, each
    request in the batch gets a short INTERNAL failure; the next batch is
    served as usual.
    """
    read = getattr(forward, "read_rows", None)
    batch = collect(prompts, options, read)
    if not batch.texts:
        return [batch.failures[index] for index in range(len(prompts))]
    per_request = guarded(
        lambda: split(forward(batch.texts, batch.options) if read else forward(batch.texts), batch.counts),
        len(prompts),
        log_error,
    )
    return [batch.failures.get(index, result) for index, result in enumerate(per_request)]


def run_tensor_batch(
    forward: TensorFn,
    requests: Sequence[Mapping[str, np.ndarray] | Failure],
    log_error: Callable[[str], None] = logger.error,
) -> list[Result]:
    """The same for tensor inputs (the ensembles' inner steps): concatenate rows, one forward, split.

    Triton's dynamic batcher only batches requests whose shapes match past the
    batch axis, so the rows concatenate; if they did not, the batch fails as a whole.
    A request that could not be read keeps its Failure; the others run.
    """
    readable = [request for request in requests if not isinstance(request, Failure)]
    if not readable:
        return list(requests)
    counts = [len(next(iter(request.values()))) for request in readable]
    names = list(readable[0])

    def compute() -> list[Outputs]:
        return split(forward({name: np.concatenate([request[name] for request in readable]) for name in names}), counts)

    answers = iter(guarded(compute, len(readable), log_error))
    return [request if isinstance(request, Failure) else next(answers) for request in requests]
