"""The packed running batch: one forward a step over every row's next token and chunks of new prompts.

No Triton import. vLLM's scheduling on a Hugging Face model, without its kernels:

- **Packed tokens.** A step's new tokens, from every row, go through the model
  as one sequence ``[1, T]``: the decoding rows' next tokens, then chunks of
  prompts being prefilled. Linear layers do not care where a token comes from,
  so the weights are read once a step whatever the mix (on a CPU a forward is
  bound by reading them: a separate prefill forward of 8 tokens cost as much
  as a decoding step of 8 rows). Each token carries its own position.
- **Slots.** Each row owns a slot of a KV cache reserved ahead,
  ``[slots, heads, columns, head_dim]`` a layer; a token's keys and values are
  written in place at (its row's slot, its position). Nothing is concatenated
  at a step (``DynamicCache`` copies the whole cache at every step: 11-27% of a
  gpt2 step on 2 cores), nothing is copied at a join, and a retired row's slot
  is refilled by the last one. The cache outlives the batch's busy spells, as
  vLLM's blocks do: reserved anew whenever the batch refilled, it cost a
  reservation of up to 230 ms in a step at light load (page faults and copies
  while it grew back), the inter-token tail's longest gaps.
- **Attention** is the model's own attention module with its scaled
  dot-product replaced (transformers' ``AttentionInterface``): the decoding
  rows attend over their slots in one batched call, each prompt chunk over its
  own slot, causally. Without a plan (any other forward) it is transformers'
  SDPA, unchanged.
- **Chunked prefill.** Besides one token a decoding row, a step carries
  prompt tokens within its ``prefill`` budget (budget.py), in arrival order; a
  longer prompt is cut into chunks over the next steps, and its row starts
  decoding once its prompt is in. Decoding never waits for a prompt. The
  budget is one of time (Sarathi-Serve's): beside decoding rows, a step may
  take at most a set multiple of the rows' own step, by a cost timed at start
  (``time_steps``), so a join never stalls them; with no row decoding, the
  cap goes to prompts. A count fixed on one machine would not do: on two CPU
  cores 32 tokens made a step of a few rows 1.5x longer, and a GPU's step
  costs about the same up to hundreds.

A model qualifies if a packed forward gives its own logits (``packs``,
checked once at load); one that does not keeps the padded running batch
(running_batch.py).
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .budget import PrefillBudget, StepCost
from .running_batch import LanguageModel, record
from .sequence import Sequence

ATTENTION = "tritonhf_packed"
Key = TypeVar("Key")


@dataclass(frozen=True)
class Plan:
    """Where a packed step's tokens go: the decoding rows' tokens (one a slot, slots 0..``slots``-1 in use), then
    the prompt chunks, each (slot, start, length)."""

    slots: int  # slots in use
    decoding: torch.Tensor  # [d] the slots of the decoding rows, in token order
    lengths: torch.Tensor  # [slots] each slot's cached tokens after this step (0: none decoding there)
    chunks: tuple[tuple[int, int, int], ...]
    token_slots: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    kernel: str = "sdpa"  # the decoding rows' attention's (attention_choice); prompt chunks take sdpa


PLAN: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("tritonhf_packed_plan", default=None)


def plan_step(
    model: PackingModel,
    slots: int,
    decoding: list[tuple[int, int, int]],
    chunks: list[tuple[int, int, list[int], bool]],
) -> tuple[torch.Tensor, Plan, torch.Tensor]:
    """One packed step of ``model``'s: its token ids, plan, and the indices of the tokens whose logits are wanted.

    ``decoding``: (slot, position, token) a decoding row; ``chunks``: (slot, start, prompt tokens, whether they end
    the prompt). Logits are kept for every decoding row and for the last token of a prompt now complete.
    """
    ids = [token for _, _, token in decoding] + [token for _, _, tokens, _ in chunks for token in tokens]
    positions = [position for _, position, _ in decoding]
    positions += [start + i for _, start, tokens, _ in chunks for i in range(len(tokens))]
    token_slots = [slot for slot, _, _ in decoding] + [slot for slot, _, tokens, _ in chunks for _ in tokens]
    lengths = [0] * slots
    for slot, position, _ in decoding:
        lengths[slot] = position + 1
    keep, offset = list(range(len(decoding))), len(decoding)
    for _, _, tokens, ends in chunks:
        offset += len(tokens)
        if ends:
            keep.append(offset - 1)
    device = model.device
    plan = Plan(
        slots=slots,
        decoding=torch.tensor(token_slots[: len(decoding)], dtype=torch.long, device=device),
        lengths=torch.tensor(lengths, device=device),
        chunks=tuple((slot, start, len(tokens)) for slot, start, tokens, _ in chunks),
        token_slots=torch.tensor(token_slots, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        kernel=model.attention_kernel,
    )
    long = {"dtype": torch.long, "device": device}
    return torch.tensor(ids, **long), plan, torch.tensor(keep, **long)


def planned_forward(
    model: PackingModel, ids: torch.Tensor, plan: Plan, keep: torch.Tensor, cache: SlotCache
) -> torch.Tensor:
    """The model's packed forward with ``plan`` in force for its attention and its cache."""
    token = PLAN.set(plan)
    try:
        return model.packed_forward(ids, plan, keep, cache)
    finally:
        PLAN.reset(token)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention of a packed step (query ``[1, heads, T, dim]``; key and value: the layer's slots); any other
    forward: transformers' SDPA."""
    plan = PLAN.get()
    if plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    q = query[0].transpose(0, 1).to(key.dtype)  # [T, heads, dim], in the cache's precision (attention_choice)
    out = []
    if decoding := len(plan.decoding):
        # every slot in use gets a query row (a prefilling slot a dummy one, masked to its first column), so the
        # keys are a view of the cache, not a gather of the decoding slots
        width = int(plan.lengths.max())
        queries = q.new_zeros(plan.slots, q.shape[1], 1, q.shape[2])
        queries[plan.decoding, :, 0] = q[:decoding]
        columns = torch.arange(width, device=q.device)
        mask = columns[None, :] < plan.lengths.clamp(min=1)[:, None]
        attended = grouped_attention(
            plan.kernel, queries, key[: plan.slots, :, :width], value[: plan.slots, :, :width], mask[:, None], scaling
        )
        out.append(attended[plan.decoding, :, 0])
    start_token = decoding
    for slot, start, length in plan.chunks:
        end = start + length
        causal = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        chunk = q[start_token : start_token + length].transpose(0, 1)[None]  # [1, heads, length, dim]
        attended = grouped_attention(
            "sdpa", chunk, key[slot : slot + 1, :, :end], value[slot : slot + 1, :, :end], causal[None], scaling
        )
        out.append(attended[0].transpose(0, 1))
        start_token += length
    return torch.cat(out)[None].to(query.dtype), None


def grouped_attention(
    kernel: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """Scaled dot-product attention of ``query`` ``[n, heads, length, dim]`` over ``key`` and ``value`` ``[n,
    kv_heads, columns, dim]`` with ``mask`` ``[n, length, columns]``, by ``kernel`` (``KERNELS``). Where key-value
    heads are fewer (grouped-query attention: query head h reads key-value head h // groups), each one's query heads
    attend as one longer query, so that the cache is read as it is, never repeated."""
    n, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    grouped = query.reshape(n, key.shape[1], groups * length, dim)
    attended = KERNELS[kernel](grouped, key, value, mask.repeat(1, groups, 1)[:, None], scaling)
    return attended.reshape(n, heads, length, dim)


def matmul_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Attention as the textbook writes it, two matmuls and a softmax (every row has a column unmasked). For the
    decoding rows of a step in float32 on a CPU it beat torch's fused kernel, which reads the same cache: a packed
    gpt2 step of 32 rows 5-14% shorter over 32-112 columns (2 EPYC cores, AVX512-BF16). A long prompt chunk is
    the fused kernel's (7% the shorter at 256 tokens)."""
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(query.shape[-1] ** -0.5 if scaling is None else scaling)
    return torch.matmul(scores.masked_fill_(~mask, -math.inf).softmax(-1), value)


def fused_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    return scaled_dot_product_attention(query, key, value, mask, scale=scaling)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"sdpa": fused_attention, "matmul": matmul_attention}


AttentionInterface.register(ATTENTION, packed_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the mask an unplanned forward needs; a planned one ignores it


CLEARLY_FASTER = 1.2  # float32 attention is taken if the model's precision takes this many times its time


def attention_choice(
    heads: int, dim: int, dtype: torch.dtype, device: torch.device, slots: int = 32, columns: int = 128
) -> tuple[torch.dtype, str, str]:
    """The precision of a packed step's attention and slot cache, and its decoding rows' kernel (``KERNELS``), for
    a model computing in ``dtype``; and what was timed, for the log. The fastest on this device of a decoding
    step's attention (``slots`` rows over ``columns``), timed once at load (interleaved, the best of 8 each):
    torch's fused kernel in the model's precision or in float32, or two matmuls and a softmax in float32 (in a
    reduced precision its softmax would round). Float32 must be clearly faster (``CLEARLY_FASTER``): its cache
    takes twice the memory.

    Keys and values from a reduced-precision model are exact in float32, so the choice is one of speed: torch's
    CPU attention kernel took 3-4x as long in bfloat16 as in float32 on AVX512-BF16 without AMX (2 EPYC cores),
    and a packed gpt2 step of 32 rows 1.27x as long (README, "Generation: parameters, streaming, continuous batching").
    """
    lengths = torch.linspace(1, columns, slots, device=device)
    mask = (torch.arange(columns, device=device)[None, :] < lengths[:, None])[:, None, None]
    candidates = dict.fromkeys([(dtype, "sdpa"), (torch.float32, "sdpa"), (torch.float32, "matmul")])
    inputs = {
        precision: (
            torch.randn(slots, heads, 1, dim, dtype=precision, device=device),
            torch.randn(slots, heads, columns, dim, dtype=precision, device=device),
        )
        for precision, _ in candidates
    }
    attention = {(p, k): partial(KERNELS[k], *inputs[p], inputs[p][1], mask, None) for p, k in candidates}
    seconds = best_seconds(attention, device, repeats=8)
    own = min((c for c in candidates if c[0] == dtype), key=seconds.__getitem__)
    best = min(candidates, key=seconds.__getitem__)
    chosen = best if seconds[own] >= CLEARLY_FASTER * seconds[best] else own
    timed = ", ".join(f"{p} {k} {seconds[(p, k)] / seconds[chosen]:.2f}x" for p, k in candidates if (p, k) != chosen)
    return *chosen, f"{chosen[0]} by {chosen[1]} (the others took: {timed})".replace("torch.", "")


def time_steps(model: PackingModel, rows: int, tokens: int, repeats: int = 3) -> StepCost | None:
    """This device's cost of a packed step (budget.StepCost), timed as a stream's scheduler starts: decoding
    steps of 1 and ``rows`` rows alone (fewer where ``tokens`` of cache would not hold them), and beside a prompt
    chunk of a quarter and all of ``context`` tokens (all of them beside ``rows``), each row over ``context``
    cached tokens (64, within the model's length); the best of ``repeats`` each, after a round that warms the
    kernels up. A few hundred milliseconds for gpt2 on two CPU cores. Run it on a thread that ends
    (hardware.on_a_thread_that_ends): a second OpenMP team slows every step.
    """
    context = min(64, model.max_tokens // 2)
    rows = max(2, min(rows, tokens // (context + 1)))
    cache = SlotCache.reserve(model.cache_shapes(), rows + 1, context + 1, model.device)
    shapes = [(1, 0), (rows, 0), (1, context // 4), (1, context), (rows, context)]
    steps = {shape: packed_step(model, cache, *shape, context) for shape in shapes}
    best = best_seconds(steps, model.device, repeats)
    return StepCost.fit(np.array([(decoding, tokens, seconds) for (decoding, tokens), seconds in best.items()]))


def packed_step(
    model: PackingModel, cache: SlotCache, rows: int, tokens: int = 0, context: int = 64
) -> Callable[[], object]:
    """One packed step, to run again and again: ``rows`` decoding rows over ``context`` cached tokens each, beside
    a prompt chunk of ``tokens`` in the next slot, its next tokens read back."""
    chunks = [(rows, 0, [0] * tokens, True)] if tokens else []
    ids, plan, keep = plan_step(model, rows + 1, [(slot, context, 0) for slot in range(rows)], chunks)

    def step() -> object:
        with torch.inference_mode():
            return planned_forward(model, ids, plan, keep, cache).argmax(-1).tolist()

    return step


def seconds_of(work: Callable[[], object], device: torch.device) -> float:
    """How long ``work()`` takes on ``device`` (a GPU's queue waited for)."""
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def best_seconds(work: Mapping[Key, Callable[[], object]], device: torch.device, repeats: int) -> dict[Key, float]:
    """Each piece of ``work``'s best time of ``repeats``, the pieces interleaved (so a slow spell of a shared
    machine falls on all of them), after a round that warms their kernels up."""
    best = dict.fromkeys(work, math.inf)
    for attempt in range(repeats + 1):
        for key, run in work.items():
            took = seconds_of(run, device)
            if attempt:
                best[key] = min(best[key], took)
    return best


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values, ``[slots, heads, columns, head_dim]``; a packed step writes its tokens in place."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True

    def lazy_initialization(self, key_states: torch.Tensor) -> None:  # reserved ahead: nothing to do
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = PLAN.get()
        assert plan is not None, "a slot cache is written by packed steps only"
        for cache, states in ((self.keys, key_states), (self.values, value_states)):  # in the cache's precision
            cache.permute(0, 2, 1, 3)[plan.token_slots, plan.positions] = states[0].transpose(0, 1).to(cache.dtype)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0  # positions are given with every token

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """The reserved KV cache: a SlotLayer per model layer, grown (copied once) when rows or columns run out."""

    def __init__(self, layers: list[SlotLayer]) -> None:
        super().__init__(layers=layers)

    @classmethod
    def reserve(
        cls, shapes: list[tuple[int, int, torch.dtype]], slots: int, columns: int, device: torch.device
    ) -> SlotCache:
        """``shapes``: each layer's (heads, head_dim, dtype)."""
        return cls(
            [
                SlotLayer(*(torch.zeros(slots, heads, columns, dim, dtype=dtype, device=device) for _ in range(2)))
                for heads, dim, dtype in shapes
            ]
        )

    @property
    def size(self) -> tuple[int, int]:
        """(slots, columns)."""
        keys = self.layers[0].keys
        return keys.shape[0], keys.shape[2]

    def grown(self, slots: int, columns: int) -> SlotCache:
        """A bigger cache holding this one."""
        old_slots, old_columns = self.size
        shapes = [(layer.keys.shape[1], layer.keys.shape[3], layer.keys.dtype) for layer in self.layers]
        bigger = SlotCache.reserve(shapes, max(slots, old_slots), max(columns, old_columns), self.layers[0].keys.device)
        for new, old in zip(bigger.layers, self.layers, strict=True):
            new.keys[:old_slots, :, :old_columns] = old.keys
            new.values[:old_slots, :, :old_columns] = old.values
        return bigger

    def move(self, source: int, target: int, columns: int) -> None:
        for layer in self.layers:
            layer.keys[target, :, :columns] = layer.keys[source, :, :columns]
            layer.values[target, :, :columns] = layer.values[source, :, :columns]


class PrefillError(Exception):
    """A packed step that carried prompt chunks failed: their ``rows`` fail, and the step runs again without them
    (nothing is counted as written until a step succeeds; the retry writes the same columns again)."""

    def __init__(self, rows: list[Sequence]) -> None:
        super().__init__(f"{len(rows)} prompt(s) being prefilled")
        self.rows = rows


class PackingModel(LanguageModel, Protocol):
    """What a packed batch needs of a model besides decoding (tasks.TextGeneration)."""

    max_tokens: int
    attention: str  # its precision and kernel, and why (attention_choice)
    attention_kernel: str  # KERNELS

    def cache_shapes(self) -> list[tuple[int, int, torch.dtype]]:
        """Each layer's (key-value heads, head_dim, dtype)."""
        ...

    def packed_forward(self, ids: torch.Tensor, plan: Plan, keep: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """The logits [len(keep), vocab] (float32) of the packed tokens at ``keep``."""
        ...


@dataclass(eq=False)
class Slot:
    """A row's place in the cache and how much of it is filled."""

    index: int
    cached: int = 0  # tokens written: prompt tokens prefilled, then one a decoding step


@dataclass
class PackedBatch:
    """The rows decoding together, packed (see the module): the same calls as running_batch.RunningBatch."""

    model: PackingModel
    prefill: PrefillBudget | None = None  # a step's prompt tokens (budget.py); None: all at once (static batching)
    rows: list[Sequence] = field(default_factory=list)
    slots: dict[Sequence, Slot] = field(default_factory=dict)
    cache: SlotCache | None = None

    def reset(self) -> None:
        self.rows, self.slots, self.cache = [], {}, None

    def admit(self, new: list[Sequence]) -> None:
        """Give the newcomers slots; their prompts go in with the next steps."""
        for row in new:
            self.slots[row] = Slot(len(self.rows))
            self.rows.append(row)
        self.reserve()

    def reserve(self) -> None:
        """Slots for every row, columns for the longest reservation (prompt + max_new_tokens); grown by doubling,
        within the model's length, so that a growing batch copies its cache a few times, not at every join."""
        slots, columns = len(self.rows), max(row.reserved for row in self.rows)
        if self.cache is None:
            self.cache = SlotCache.reserve(self.model.cache_shapes(), slots, columns, self.model.device)
            return
        have_slots, have_columns = self.cache.size
        if slots > have_slots or columns > have_columns:
            slots = max(slots, 2 * have_slots) if slots > have_slots else have_slots
            columns = (
                max(columns, min(2 * have_columns, self.model.max_tokens)) if columns > have_columns else have_columns
            )
            self.cache = self.cache.grown(slots, columns)

    def prefilling(self, row: Sequence) -> bool:
        return self.slots[row].cached < len(row.prompt_ids)

    def step(self) -> None:
        """One forward: every decoding row's next token, and prompt chunks within the step's prefill budget."""
        decoding = [row for row in self.rows if not self.prefilling(row)]
        budget = math.inf if self.prefill is None else self.prefill.allowance(len(decoding))
        chunks: list[tuple[Sequence, int, int]] = []
        for row in sorted((row for row in self.rows if self.prefilling(row)), key=lambda row: row.arrived):
            if budget <= 0:
                break
            start = self.slots[row].cached
            length = int(min(len(row.prompt_ids) - start, budget))
            chunks.append((row, start, length))
            budget -= length
        if not decoding and not chunks:
            return
        finishing = [row for row, start, length in chunks if start + length == len(row.prompt_ids)]
        ids, plan, keep = plan_step(
            self.model,
            len(self.rows),
            [(self.slots[row].index, self.slots[row].cached, row.tokens[-1]) for row in decoding],
            [(self.slots[row].index, s, row.prompt_ids[s : s + n], row in finishing) for row, s, n in chunks],
        )
        try:
            logits = planned_forward(self.model, ids, plan, keep, self.cache)
        except Exception as err:
            if chunks:  # the rows before were decoding fine: the prompts are the suspects
                raise PrefillError([row for row, _, _ in chunks]) from err
            raise
        for row in decoding:
            self.slots[row].cached += 1
        for row, _, length in chunks:
            self.slots[row].cached += length
        record(self.model, decoding + finishing, logits)

    def retire(self) -> None:
        """Drop the finished rows; the last rows move into the freed slots (one row's columns each)."""
        if all(not row.finish for row in self.rows):
            return
        keep = [row for row in self.rows if not row.finish]
        if not keep:  # the cache stays reserved for the next rows (reset, after a failure, drops it)
            self.rows, self.slots = [], {}
            return
        for row in self.rows:
            if row.finish:
                del self.slots[row]
        holes = iter(sorted(set(range(len(keep))) - {self.slots[row].index for row in keep}))
        for row in keep:
            slot = self.slots[row]
            if slot.index >= len(keep):
                target = next(holes)
                self.cache.move(slot.index, target, slot.cached)
                slot.index = target
        self.rows = sorted(keep, key=lambda row: self.slots[row].index)


def packs(model: PackingModel) -> bool:
    """Whether packed steps give this model's own logits: two prompts prefilled in one packed forward, then a
    decoding step for both, against each sequence's plain forward. If so, the model's attention becomes the
    packed one (SDPA for any other forward); if not, or if it does not use SDPA, it stays as it was."""
    module = model.model
    if module.config._attn_implementation != "sdpa":
        return False
    prompts, new = [[5, 6, 7, 8, 9], [11, 12, 13]], 3
    with torch.inference_mode():
        want = [
            module(input_ids=torch.tensor([[*p, new]], device=model.device)).logits[0, -2:].float() for p in prompts
        ]
        use_attention(module, ATTENTION)
        try:
            got = packed_check(model, prompts, new)
        except Exception:  # noqa: BLE001 - whatever the model's code does with a foreign cache: it does not pack
            got = None
    tolerance = 1e-3 if next(module.parameters()).dtype == torch.float32 else 5e-2
    if got is None or not all(
        torch.allclose(g, w, atol=tolerance * float(w.abs().max()), rtol=0) for g, w in zip(got, want, strict=True)
    ):
        use_attention(module, "sdpa")
        return False
    return True


def packed_check(model: PackingModel, prompts: list[list[int]], new: int) -> list[torch.Tensor]:
    """Each prompt's last two logits (its end, then ``new`` after it) from two packed steps in slots 0 and 1."""
    device = model.device
    cache = SlotCache.reserve(model.cache_shapes(), len(prompts), max(map(len, prompts)) + 1, device)
    prefill = plan_step(model, len(prompts), [], [(slot, 0, p, True) for slot, p in enumerate(prompts)])
    ends = planned_forward(model, *prefill, cache)
    decode = plan_step(model, len(prompts), [(slot, len(p), new) for slot, p in enumerate(prompts)], [])
    after = planned_forward(model, *decode, cache)
    return [torch.stack([ends[i], after[i]]) for i in range(len(prompts))]


def use_attention(module: torch.nn.Module, name: str) -> None:
    """The model's attention function, by its registered name. Not ``set_attn_implementation``: it reads the
    model's source file in the locale's encoding, which is ASCII in Triton's Python stub (a UnicodeDecodeError)."""
    module.config._attn_implementation = name
