"""Unit tier for generation: parameters, sequences, the padded running batch, sampling, the scheduler. No server."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from tritonhf.backends.python_hf import packed
from tritonhf.backends.python_hf.batching import RequestError
from tritonhf.backends.python_hf.budget import UNTIMED, PrefillBudget, StepCost
from tritonhf.backends.python_hf.heads import Piece
from tritonhf.backends.python_hf.packed import KERNELS, PackedBatch, Plan, SlotCache, packs, use_attention
from tritonhf.backends.python_hf.parameters import GenerationParams, Limits
from tritonhf.backends.python_hf.running_batch import RunningBatch
from tritonhf.backends.python_hf.scheduler import Observer, Quiet, Scheduler
from tritonhf.backends.python_hf.sequence import AdditivePenalties, Sequence
from tritonhf.backends.python_hf.tasks import TextGeneration, load_task
from tritonhf.backends.python_hf.text import render_chat

from .helpers import LENGTHS, PROMPTS, Pieces, reference, until


@pytest.fixture(scope="module", params=["gpt2", "facebook/opt-125m"])
def model(tiny: dict[str, Path], request: pytest.FixtureRequest) -> TextGeneration:
    return load_task(str(tiny[request.param]), "text-generation", max_length="8")


class Recorder(Pieces):
    """A sequence.Stream that keeps what it is sent, with arrival times."""

    def __init__(self, cancel_after: int | None = None) -> None:
        super().__init__()
        self.cancel_after = cancel_after

    def send(self, piece: Piece) -> None:
        self.pieces.append((time.monotonic(), piece.text, piece.new_tokens))
        self.last = piece
        if piece.final:
            self.done.set()

    def fail(self, message: str, kind: str) -> None:
        self.error = (message, kind)
        self.done.set()

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.pieces) >= self.cancel_after


@contextmanager
def scheduling(
    model: TextGeneration,
    max_sequences: int = 32,
    max_tokens: int | None = None,
    observer: Observer | None = None,
    prefill_tokens: int | None = None,
    stream_interval: int = 1,
) -> Iterator[Scheduler]:
    """A scheduler with these settings from its start, always closed; its packed steps' prompt tokens a fixed
    count (no slack: chunks do not hang on how fast this machine is today)."""
    limits = dataclasses.replace(
        model.limits,
        max_running_sequences=max_sequences,
        max_running_tokens=max_tokens or model.limits.max_running_tokens,
        max_prefill_tokens=prefill_tokens or model.limits.max_prefill_tokens,
        prefill_step_slack=0,
        stream_interval=stream_interval,
    )
    scheduler = Scheduler(model, limits, observer)
    try:
        yield scheduler
    finally:
        scheduler.close()


def stream_all(
    model: TextGeneration,
    requests: list[tuple[str, dict]],
    max_sequences: int = 32,
    gap: float = 0.0,
    stream_interval: int = 1,
) -> list[Recorder]:
    recorders = []
    with scheduling(model, max_sequences, stream_interval=stream_interval) as scheduler:
        for prompt, options in requests:
            recorders.append(Recorder())
            scheduler.submit(model.sequence(prompt, model.parse_options(options), recorders[-1]))
            time.sleep(gap)
        assert all(r.done.wait(60) for r in recorders)
    return recorders


# --- parameters ----------------------------------------------------------------------------


def test_request_values_override_the_defaults() -> None:
    defaults = GenerationParams(max_new_tokens=16, min_new_tokens=4)
    params = defaults.updated(
        {
            "max_new_tokens": "2",
            "do_sample": "true",
            "temperature": 0.7,
            "top_p": np.array([[0.5]], dtype=np.float32),
            "stop": np.array([[b"\n", b"."]], dtype=object),
            "seed": 3,
        },
        100,
    )
    assert params == GenerationParams(
        max_new_tokens=2,
        min_new_tokens=2,
        do_sample=True,
        temperature=0.7,
        top_p=0.5,
        top_k=50,
        seed=3,
        stop=("\n", "."),
    )
    assert defaults.updated({}, 100) == defaults


BAD_PARAMETERS = {
    "negative max_new_tokens": ({"max_new_tokens": -5}, "max_new_tokens must be in 1..100, got -5"),
    "too many new tokens": ({"max_new_tokens": 101}, "max_new_tokens must be in 1..100"),
    "temperature 0 with sampling": (
        {"do_sample": True, "temperature": 0},
        "temperature must be > 0 when do_sample is true",
    ),
    "unknown key": ({"max_tokens": 5}, "unknown generation parameter 'max_tokens'; known: max_new_tokens"),
    "not an integer": ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    "boolean as a count": ({"top_k": True}, "top_k must be an integer"),
    "top_p out of range": ({"top_p": 0}, "top_p must be in (0, 1]"),
    "min above max": ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens must be in 0..max_new_tokens (4)"),
    "not a boolean": ({"do_sample": "yes"}, "do_sample must be true or false"),
    "NaN temperature": ({"temperature": float("nan")}, "temperature must be a finite number"),
    "two values in a scalar tensor": ({"seed": np.array([[1, 2]])}, "input 'seed' must hold one value"),
    "empty stop string": ({"stop": ""}, "stop must be non-empty strings"),
    "a digit int() refuses": ({"max_new_tokens": "²"}, "max_new_tokens must be an integer, got '²'"),
    "penalty out of range": ({"frequency_penalty": 2.5}, "frequency_penalty must be in -2..2, got 2.5"),
}


@pytest.mark.parametrize("what", BAD_PARAMETERS)
def test_bad_parameters_are_named(what: str) -> None:
    raw, message = BAD_PARAMETERS[what]
    with pytest.raises(RequestError) as caught:
        GenerationParams().updated(raw, 100)
    assert message in str(caught.value)


def test_one_mistake_gets_one_message() -> None:
    """A bad max_new_tokens is not also reported as a min_new_tokens above it (the default min, 0, is fine)."""
    for bad in (-1, 0, 101):
        with pytest.raises(RequestError) as caught:
            GenerationParams().updated({"max_new_tokens": bad}, 100)
        assert str(caught.value) == f"max_new_tokens must be in 1..100, got {bad}"
    with pytest.raises(RequestError, match=r"^min_new_tokens must be in 0..max_new_tokens \(16\), got -1$"):
        GenerationParams().updated({"min_new_tokens": -1}, 100)


def test_a_parameter_given_twice_is_refused(model: TextGeneration) -> None:
    with pytest.raises(RequestError, match="max_new_tokens given both as a request parameter and as an input tensor"):
        model.parse_options(({"max_new_tokens": 3}, {"max_new_tokens": np.array([[4]], dtype=np.int32)}))


# --- static batches ------------------------------------------------------------------------


def test_a_static_batch_equals_generate_row_by_row(model: TextGeneration) -> None:
    """Every row its own max_new_tokens, in one batch: each equals transformers' generate on it alone."""
    out = model(PROMPTS, [model.parse_options({"max_new_tokens": n}) for n in LENGTHS])
    for i, (prompt, n) in enumerate(zip(PROMPTS, LENGTHS)):
        assert (out["text"][i, 0].decode(), int(out["new_tokens"][i, 0])) == reference(
            model, prompt, max_new_tokens=n, do_sample=False
        )


def test_the_penalties_are_openais_formula() -> None:
    """Generated 3, 3, 5: token 3 loses presence + 2 x frequency, token 5 presence + frequency, the rest nothing."""
    scores = AdditivePenalties(presence=0.5, frequency=1.0)(torch.tensor([[3, 3, 5]]), torch.zeros(1, 8))
    assert scores[0].tolist() == [0, 0, 0, -2.5, 0, -1.5, 0, 0]


@pytest.mark.parametrize(("presence", "frequency"), [(0.0, 1.5), (1.5, 0.0), (-0.5, 0.5)])
def test_penalties_equal_openais_formula_in_generate(model: TextGeneration, presence: float, frequency: float) -> None:
    """Greedy with presence / frequency penalties: each row equals generate with the same processor over its
    generated ids, beside a row without penalties in the same batch; and the penalties change the answer."""
    penalised = {"max_new_tokens": 24, "presence_penalty": presence, "frequency_penalty": frequency}
    out = model([PROMPTS[1], PROMPTS[1]], [model.parse_options(penalised), model.parse_options({"max_new_tokens": 24})])
    prompt_tokens = len(model.tokenizer(PROMPTS[1])["input_ids"])
    penalties = AdditivePenalties(presence, frequency)
    processor = LogitsProcessorList([lambda ids, scores: penalties(ids[:, prompt_tokens:], scores)])  # generated only
    expected = reference(model, PROMPTS[1], max_new_tokens=24, do_sample=False, logits_processor=processor)
    assert (out["text"][0, 0].decode(), int(out["new_tokens"][0, 0])) == expected
    assert (out["text"][1, 0].decode(), int(out["new_tokens"][1, 0])) == reference(
        model, PROMPTS[1], max_new_tokens=24, do_sample=False
    )
    assert out["text"][0, 0] != out["text"][1, 0], "the tiny models repeat themselves: a penalty changes that"


def test_every_answer_says_its_prompt_length_and_why_it_ended(model: TextGeneration) -> None:
    """prompt_tokens as the model read the prompt; finish_reason length, or stop at a stop string."""
    full = model([PROMPTS[4]], [model.parse_options({"max_new_tokens": 20, "return_full_text": False})])
    text = full["text"][0, 0].decode()
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = model(
        [PROMPTS[4], PROMPTS[0]],
        [model.parse_options({"max_new_tokens": 20, "stop": stop}), model.parse_options({"max_new_tokens": 3})],
    )
    assert out["finish_reason"][:, 0].tolist() == [b"stop", b"length"] and full["finish_reason"][0, 0] == b"length"
    assert out["prompt_tokens"][:, 0].tolist() == [
        len(model.tokenizer(p)["input_ids"]) for p in (PROMPTS[4], PROMPTS[0])
    ]
    [streamed] = stream_all(model, [(PROMPTS[0], {"max_new_tokens": 3})])
    assert (streamed.last.finish, streamed.last.prompt_tokens) == ("length", out["prompt_tokens"][1, 0])


def test_a_prompt_too_long_is_cut_from_the_left_or_refused(model: TextGeneration) -> None:
    words = " ".join(["word"] * model.max_tokens)
    kept = model.sequence(words, model.parse_options({"max_new_tokens": 8}))
    assert len(kept.prompt_ids) == model.max_tokens - 8
    with pytest.raises(RequestError, match=f"maximum context length is {model.max_tokens} tokens; the prompt has"):
        model.sequence(words, model.parse_options({"max_new_tokens": 8, "truncate": False}))


def test_a_chat_goes_through_the_plain_template_where_the_model_has_none(model: TextGeneration) -> None:
    """gpt2 and opt-125m have no chat template: the documented plain one, encoded with the model's special tokens,
    and answered as that text would be."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]
    row = model.sequence(json.dumps(messages), model.parse_options({"chat": True}))
    rendered = f"Be brief.\n\nUser: {PROMPTS[0]}\nAssistant:"
    assert row.prompt == rendered and row.prompt_ids == model.tokenizer(rendered)["input_ids"]
    chat = model([json.dumps(messages)], [model.parse_options({"chat": True, "max_new_tokens": 5})])
    plain = model([rendered], [model.parse_options({"max_new_tokens": 5})])
    assert chat["text"][0, 0] == plain["text"][0, 0]


def test_a_chat_goes_through_the_models_own_template(model: TextGeneration) -> None:
    """A tokenizer with a chat template renders with it and adds no special tokens of its own."""
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.chat_template = template
    text, special = render_chat(tokenizer, json.dumps([{"role": "user", "content": "hi"}]))
    assert (text, special) == ("<|user|>hi<|assistant|>", False)


BAD_CHATS = {
    "not JSON": ("hello", "chat: the prompt must be a JSON list of messages"),
    "not a list": ('{"role": "user"}', "chat: the prompt must be a non-empty JSON list of messages"),
    "no role": ('[{"content": "hi"}]', "chat: message 0 must be an object with a string 'role'"),
    "content not text": ('[{"role": "user", "content": [1]}]', "chat: message 0's content must be text"),
}


@pytest.mark.parametrize("what", BAD_CHATS)
def test_a_bad_chat_is_named(model: TextGeneration, what: str) -> None:
    prompt, message = BAD_CHATS[what]
    with pytest.raises(RequestError, match=re.escape(message)):
        model.sequence(prompt, model.parse_options({"chat": True}))


def test_a_prompt_without_tokens_starts_from_bos(model: TextGeneration) -> None:
    """As generate does without input: gpt2 tokenises "" to nothing, OPT to its BOS alone."""
    bos = model.model.generation_config.bos_token_id
    assert model.sequence("", model.defaults).prompt_ids == [bos]
    assert model([""], [model.parse_options({"max_new_tokens": 3, "min_new_tokens": 3})])["new_tokens"][0, 0] == 3


def test_min_new_tokens_holds_eos_back(model: TextGeneration) -> None:
    """Make the first greedy token the EOS: the row ends at once, unless min_new_tokens says otherwise."""
    first = model([PROMPTS[2]], [model.parse_options({"max_new_tokens": 1})])["text"][0, 0].decode()
    token = model.sequence(first, model.defaults).prompt_ids[-1]
    eos, model.eos = model.eos, frozenset([token])
    try:
        assert model([PROMPTS[2]], [model.parse_options({"max_new_tokens": 6})])["new_tokens"][0, 0] == 1
        assert (
            model([PROMPTS[2]], [model.parse_options({"max_new_tokens": 6, "min_new_tokens": 4})])["new_tokens"][0, 0]
            >= 4
        )
    finally:
        model.eos = eos


def test_stop_strings_end_the_answer_before_them(model: TextGeneration) -> None:
    full = model([PROMPTS[4]], [model.parse_options({"max_new_tokens": 20, "return_full_text": False})])["text"][
        0, 0
    ].decode()
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = model([PROMPTS[4]], [model.parse_options({"max_new_tokens": 20, "return_full_text": False, "stop": stop})])
    assert cut["text"][0, 0].decode() == full[: full.index(stop)]
    assert cut["new_tokens"][0, 0] < 20


def test_seeded_sampling_is_reproducible_in_any_batch(model: TextGeneration) -> None:
    seeded = model.parse_options(
        {"do_sample": True, "seed": 11, "max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95}
    )
    alone = model([PROMPTS[5]], [seeded])["text"][0, 0]
    among = model([PROMPTS[0], PROMPTS[5], PROMPTS[9]], [model.defaults, seeded, seeded])["text"][:, 0]
    assert among[1] == alone, "the same seed, the same answer, whatever the neighbours"
    assert (
        model([PROMPTS[5]], [model.parse_options({"do_sample": True, "seed": 12, "max_new_tokens": 12})])["text"][0, 0]
        != alone
    )


def test_sampling_filters_narrow_to_greedy(model: TextGeneration) -> None:
    greedy = model([PROMPTS[6]], [model.parse_options({"max_new_tokens": 10})])["text"][0, 0]
    for narrow in ({"top_k": 1}, {"top_p": 1e-6}):
        assert (
            model([PROMPTS[6]], [model.parse_options({"do_sample": True, "max_new_tokens": 10, **narrow})])["text"][
                0, 0
            ]
            == greedy
        ), narrow


def test_extreme_temperatures_sample_without_failing_the_batch(model: TextGeneration) -> None:
    """1e-40 overflows unshifted logits to inf (NaN probabilities); it must act as greedy, its neighbours unharmed."""
    greedy = model([PROMPTS[6]], [model.parse_options({"max_new_tokens": 10})])["text"][0, 0]
    options = [{"do_sample": True, "temperature": t, "max_new_tokens": 10, "seed": 1} for t in (1e-40, 1e30, 1.0)]
    out = model([PROMPTS[6]] * 3, [model.parse_options(o) for o in options])["text"][:, 0]
    assert out[0] == greedy and all(isinstance(text, bytes) for text in out)


# --- continuous batching -------------------------------------------------------------------


def test_streams_concatenate_to_the_static_answers(model: TextGeneration) -> None:
    """Requests arriving one by one join the running batch; each stream equals its static answer."""
    requests = [(prompt, {"max_new_tokens": n}) for prompt, n in zip(PROMPTS, LENGTHS)]
    static = model(PROMPTS, [model.parse_options(options) for _, options in requests])
    for i, recorder in enumerate(stream_all(model, requests, gap=0.004)):
        assert recorder.error is None
        assert (recorder.text, recorder.tokens) == (static["text"][i, 0].decode(), static["new_tokens"][i, 0])


def test_a_stream_interval_sends_that_many_tokens_a_piece_after_the_first(model: TextGeneration) -> None:
    """stream_interval 4: each stream's first piece goes at once, then pieces of 4 tokens (more where text was held
    back, fewer in the last); the streams still concatenate to the static answers. A bad interval is named."""
    requests = [(prompt, {"max_new_tokens": n}) for prompt, n in zip(PROMPTS, LENGTHS)]
    static = model(PROMPTS, [model.parse_options(options) for _, options in requests])
    streams = stream_all(model, requests, gap=0.004, stream_interval=4)
    for i, recorder in enumerate(streams):
        assert (recorder.text, recorder.tokens) == (static["text"][i, 0].decode(), static["new_tokens"][i, 0])
        counts = [n for _, _, n in recorder.pieces]
        assert counts[0] < 4 and all(n >= 4 for n in counts[1:-1]), counts
        assert len(counts) <= 2 + (LENGTHS[i] - 1) // 4, counts
    assert sum(n == 4 for recorder in streams for _, _, n in recorder.pieces[1:-1]) > len(streams), "few pieces of 4"
    with pytest.raises(ValueError, match="stream_interval must be >= 1"):
        Limits(stream_interval=0).check()


class Steps:
    """A model that records each packed step: (tokens, decoding rows, chunks as (slot, start, length))."""

    def __init__(self, model: TextGeneration) -> None:
        self.model, self.seen = model, []

    def packed_forward(self, ids: torch.Tensor, plan: Plan, keep: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        self.seen.append((len(ids), len(plan.decoding), plan.chunks))
        return self.model.packed_forward(ids, plan, keep, cache)

    def running_batch(self, prefill: PrefillBudget | None = None) -> PackedBatch:
        assert self.model.packs
        return PackedBatch(self, prefill)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def chunked_streams_answer_as_generate(model: TextGeneration, through: Steps | None = None) -> PackedBatch:
    """Six streams, 3 rows at a time and 2 prompt tokens a step (scheduled ``through`` a recording wrapper of
    ``model``, if given): each answers as generate on its prompt alone. Returns the batch they ran in."""
    requests = list(zip(PROMPTS[:6], LENGTHS[:6], strict=True))
    recorders = [Recorder() for _ in requests]
    with scheduling(through or model, max_sequences=3, prefill_tokens=2) as scheduler:  # type: ignore[arg-type]
        for (prompt, n), recorder in zip(requests, recorders, strict=True):
            scheduler.submit(model.sequence(prompt, model.parse_options({"max_new_tokens": n}), recorder))
        assert all(r.done.wait(60) for r in recorders)
    for (prompt, n), recorder in zip(requests, recorders, strict=True):
        assert (recorder.text, recorder.tokens) == reference(model, prompt, max_new_tokens=n, do_sample=False)
    assert isinstance(scheduler.batch, PackedBatch)
    return scheduler.batch


def test_prompts_go_in_by_chunks_beside_the_decoding_rows(model: TextGeneration) -> None:
    """Steps of at most 2 prompt tokens besides 3 rows: prompts go in by chunks over several steps, in the same
    forwards as the rows decoding, never more than 2 prompt tokens a step however few rows decode; every answer
    is transformers' generate on its prompt alone."""
    steps = Steps(model)
    chunked_streams_answer_as_generate(model, through=steps)
    assert max(tokens - decoding for tokens, decoding, _ in steps.seen) <= 2
    assert any(decoding < 3 and chunks for _, decoding, chunks in steps.seen), "no step of fewer rows took a chunk"
    assert any(decoding and chunks for _, decoding, chunks in steps.seen), "no step mixed decoding and a prompt"
    assert any(start > 0 for _, _, chunks in steps.seen for _, start, _ in chunks), "no prompt was split"


@dataclasses.dataclass(frozen=True)
class Recorded(PrefillBudget):
    """A budget recording the allowances it gives."""

    given: list[int] = dataclasses.field(default_factory=list)

    def allowance(self, decoding: int) -> int:
        self.given.append(super().allowance(decoding))
        return self.given[-1]


def test_a_steps_prompt_tokens_are_its_budgets_allowance_beside_its_decoding_rows(model: TextGeneration) -> None:
    """A packed step carries as many prompt tokens as its budget allows beside its decoding rows (fewer only where
    the prompts run out), with a cost of 10 ms + 2 ms a row + 1 ms a token and 1.25x slack: 3 beside 1-2 rows, 4
    beside 3-4, the cap of 6 beside none; every answer is generate's on its prompt alone."""
    budget = Recorded(most=6, slack=1.25, cost=StepCost(base=0.010, per_row=0.002, per_prompt=0.0, per_token=0.001))
    steps = Steps(model)
    batch = steps.running_batch(budget)
    first = model.sequence(PROMPTS[2], model.parse_options({"max_new_tokens": 60}))
    later = [model.sequence(PROMPTS[i], model.parse_options({"max_new_tokens": 30})) for i in (10, 1, 9)]
    with torch.inference_mode():
        batch.admit([first])
        while batch.prefilling(first):
            batch.step()
        joined = len(steps.seen)
        batch.admit(later)
        while batch.rows:
            batch.step()
            batch.retire()
    allowed = {0: 6, 1: 3, 2: 3, 3: 4, 4: 4}
    assert budget.given == [allowed[decoding] for _, decoding, _ in steps.seen]
    for admitted, seen in ([first], steps.seen[:joined]), (later, steps.seen[joined:]):
        waiting = sum(len(row.prompt_ids) for row in admitted)  # prompt tokens not yet in
        for tokens, decoding, _ in seen:
            assert tokens - decoding == min(allowed[decoding], waiting)
            waiting -= tokens - decoding
        assert waiting == 0
    assert {decoding for _, decoding, chunks in steps.seen if chunks} >= {0, 1, 2, 3}
    for row in [first, *later]:
        assert (row.answer(), len(row.tokens)) == reference(model, row.prompt, max_new_tokens=len(row.tokens))


SLOW = StepCost(base=0.025, per_row=0.004, per_prompt=0.002, per_token=0.0005)


class Slow(Steps):
    """A packing model whose every step takes SLOW's time (its forward, then a sleep to the end): a device of known
    cost. The tiny model's own forward takes 1-15 ms on a 2-core VM (more when its cores were idle)."""

    def packed_forward(self, ids: torch.Tensor, plan: Plan, keep: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        end = time.perf_counter() + SLOW.seconds(len(plan.decoding), sum(length for _, _, length in plan.chunks))
        logits = super().packed_forward(ids, plan, keep, cache)
        time.sleep(max(0.0, end - time.perf_counter()))
        return logits


def test_a_scheduler_bounds_its_chunks_by_its_steps_cost_timed_at_load(model: TextGeneration) -> None:
    """A stream's scheduler times packed steps as it starts and fits their cost (SLOW's, within 10%); its steps
    then carry, beside d decoding rows, at most the prompt tokens that keep the step within 1.5x the rows' own (the
    first request's whole prompt at once: nobody decodes), and long prompts, chunked so, answer as generate."""
    slow = Slow(model)
    limits = dataclasses.replace(model.limits, max_running_sequences=4, prefill_step_slack=1.5)
    requests = [(PROMPTS[i], 40 if i == 11 else 10) for i in range(11, 15)]  # 47-100 prompt tokens
    recorders = [Recorder() for _ in requests]
    scheduler = Scheduler(slow, limits)  # type: ignore[arg-type]
    try:
        budget = scheduler.batch.prefill
        assert isinstance(budget, PrefillBudget) and budget.cost is not None
        for term in ("base", "per_row", "per_token"):
            assert getattr(budget.cost, term) == pytest.approx(getattr(SLOW, term), rel=0.1), term
        assert "timed at load" in scheduler.describe()
        slow.seen.clear()
        for (prompt, n), recorder in zip(requests, recorders, strict=True):
            scheduler.submit(model.sequence(prompt, model.parse_options({"max_new_tokens": n}), recorder))
            until(lambda: recorders[0].tokens >= 1, what="the first request to be decoding")
        assert all(r.done.wait(60) for r in recorders)
    finally:
        scheduler.close()
    assert all(tokens - decoding <= budget.allowance(decoding) for tokens, decoding, _ in slow.seen)
    assert any(decoding and chunks for _, decoding, chunks in slow.seen), "no step mixed decoding and a prompt"
    assert budget.allowance(1) < max(tokens - decoding for tokens, decoding, _ in slow.seen) <= budget.most
    for (prompt, n), recorder in zip(requests, recorders, strict=True):
        assert (recorder.text, recorder.tokens) == reference(model, prompt, max_new_tokens=n, do_sample=False)


def test_a_scheduler_whose_steps_cannot_be_timed_serves_by_a_fixed_count(model: TextGeneration) -> None:
    """Timing packed steps at start fails (here: every step of more than one decoding row raises while timed):
    the error is logged, the scheduler serves, its steps carrying budget.UNTIMED prompt tokens beside decoding
    rows, and a stream answers as generate."""

    class Untimeable(Steps):
        timing = True

        def packed_forward(self, ids: torch.Tensor, plan: Plan, keep: torch.Tensor, cache: SlotCache) -> torch.Tensor:
            if self.timing and len(plan.decoding) > 1:
                raise RuntimeError("out of memory (a test's)")
            return super().packed_forward(ids, plan, keep, cache)

    untimeable, errors, recorder = Untimeable(model), [], Recorder()
    limits = dataclasses.replace(model.limits, max_running_sequences=4, prefill_step_slack=1.5)
    scheduler = Scheduler(untimeable, limits, log_error=errors.append)  # type: ignore[arg-type]
    untimeable.timing = False
    try:
        assert len(errors) == 1 and "could not time packed steps" in errors[0] and "a test's" in errors[0]
        budget = scheduler.batch.prefill
        assert isinstance(budget, PrefillBudget) and budget.cost is None and budget.allowance(1) == UNTIMED
        assert "untimed" in scheduler.describe()
        scheduler.submit(model.sequence(PROMPTS[4], model.parse_options({"max_new_tokens": 12}), recorder))
        assert recorder.done.wait(60)
    finally:
        scheduler.close()
    assert (recorder.text, recorder.tokens) == reference(model, PROMPTS[4], max_new_tokens=12, do_sample=False)


def test_a_prompt_cancelled_half_way_in_frees_its_slot(model: TextGeneration) -> None:
    """A client that leaves while its prompt is still going in by chunks: cancelled at the next step, its slot
    free, the row beside it unharmed."""
    steps, half_way = Steps(model), threading.Event()

    class Leaving(Recorder):
        def cancelled(self) -> bool:
            return half_way.is_set()

    kept, leaving = Recorder(), Leaving()
    with scheduling(steps, max_sequences=3, prefill_tokens=2) as scheduler:  # type: ignore[arg-type]
        scheduler.submit(model.sequence(PROMPTS[3], model.parse_options({"max_new_tokens": 40}), kept))
        until(lambda: kept.tokens >= 1, what="the first request to be decoding")
        before = len(steps.seen)  # the first row decodes: from here on, every chunk is the second one's
        scheduler.submit(model.sequence(PROMPTS[9], model.parse_options({"max_new_tokens": 5}), leaving))
        until(
            lambda: any(start > 0 for _, _, chunks in steps.seen[before:] for _, start, _ in chunks),
            what="the second prompt to be half in",
        )
        half_way.set()
        assert kept.done.wait(60) and leaving.done.wait(60)
        until(lambda: not scheduler.batch.rows, what="the slots to be freed")
    assert leaving.error == ("request cancelled", "cancelled") and leaving.tokens == 0
    assert (kept.text, kept.tokens) == reference(model, PROMPTS[3], max_new_tokens=40, do_sample=False)


def test_an_emptied_batch_keeps_its_cache_for_the_next_rows(model: TextGeneration) -> None:
    """The reserved KV cache outlives a busy spell: the next rows, no more and no wider, are written over the
    last ones' columns in the same tensors (reserved anew at each spell, the cache cost page faults and copies
    in the inter-token tail), and each answer is still generate's on its prompt alone."""
    batch = model.running_batch(PrefillBudget(4))

    def answered(prompts: list[str]) -> list[Sequence]:
        rows = [model.sequence(prompt, model.parse_options({"max_new_tokens": 5})) for prompt in prompts]
        with torch.inference_mode():
            batch.admit(rows)
            while batch.rows:
                batch.step()
                batch.retire()
        return rows

    answered(sorted(PROMPTS, key=len)[-3:])  # the widest prompts first: the next ones fit their cache
    cache = batch.cache
    assert cache is not None
    later = answered(sorted(PROMPTS, key=len)[:2])
    assert batch.cache is cache
    for row in later:
        assert (row.answer(), len(row.tokens)) == reference(model, row.prompt, max_new_tokens=5, do_sample=False)


@pytest.mark.parametrize(
    ("precision", "kernel"), [(torch.bfloat16, "sdpa"), (torch.float32, "sdpa"), (torch.float32, "matmul")]
)
def test_a_bfloat16_models_packed_attention_answers_as_generate_in_each_precision_and_kernel(
    tiny: dict[str, Path], precision: torch.dtype, kernel: str
) -> None:
    """A model computing in bfloat16 runs its packed attention, and keeps its slot cache, in the precision and by
    the kernel its load timed fastest (packed.attention_choice; float32 ran 3-4x faster on AVX512-BF16 without AMX,
    and its two matmuls faster than torch's fused kernel). Each one passes the packing check, and answers by chunks
    beside decoding rows as the model's own generate does."""
    model = load_task(
        str(tiny["gpt2"]), "text-generation", max_length="8", dtype="bfloat16", verified_dtypes="bfloat16"
    )
    assert isinstance(model, TextGeneration) and model.packs
    chosen = f"{model.cache_dtype} by {model.attention_kernel} (".removeprefix("torch.")
    assert model.attention.startswith(chosen) and model.attention_kernel in KERNELS
    model.cache_dtype, model.attention_kernel = precision, kernel
    use_attention(model.model, "sdpa")  # as it was loaded, before its check
    assert packs(model)
    batch = chunked_streams_answer_as_generate(model)
    assert batch.cache is not None and batch.cache.layers[0].keys.dtype == precision


@pytest.mark.parametrize(
    ("own", "timed", "chosen"),
    [
        (torch.bfloat16, {"bfloat16 sdpa": 1.0, "float32 sdpa": 0.9, "float32 matmul": 0.85}, "bfloat16 by sdpa"),
        (torch.bfloat16, {"bfloat16 sdpa": 4.0, "float32 sdpa": 1.2, "float32 matmul": 1.0}, "float32 by matmul"),
        (torch.bfloat16, {"bfloat16 sdpa": 4.0, "float32 sdpa": 1.0, "float32 matmul": 1.1}, "float32 by sdpa"),
        (torch.float32, {"float32 sdpa": 1.0, "float32 matmul": 0.98}, "float32 by matmul"),
        (torch.float32, {"float32 sdpa": 1.0, "float32 matmul": 1.5}, "float32 by sdpa"),
    ],
)
def test_the_packed_attention_is_the_fastest_timed_and_float32_only_where_clearly_so(
    monkeypatch: pytest.MonkeyPatch, own: torch.dtype, timed: dict[str, float], chosen: str
) -> None:
    """The choice's rule over given timings (the timing itself is the device's): the fastest kernel, in float32
    only where it beats the model's own precision by CLEARLY_FASTER (its cache takes twice the memory)."""

    def given(work: dict, device: torch.device, repeats: int) -> dict:
        assert sorted(f"{p} {k}".removeprefix("torch.") for p, k in work) == sorted(timed)
        return {(p, k): timed[f"{p} {k}".removeprefix("torch.")] for p, k in work}

    monkeypatch.setattr(packed, "best_seconds", given)
    dtype, kernel, described = packed.attention_choice(2, 8, own, torch.device("cpu"))
    assert f"{dtype} by {kernel}".removeprefix("torch.") == chosen and described.startswith(chosen + " (")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_a_grouped_query_attention_model_packs_and_answers_as_generate(
    tiny: dict[str, Path], tmp_path: Path, kernel: str
) -> None:
    """A model with fewer key-value heads than query heads (grouped-query attention: Llama 3, Qwen2, Mistral) packs,
    by either kernel: each key-value head's query heads attend as one longer query over the cache as it is; its
    streams, prompts going in by chunks, answer as its own generate."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["gpt2"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_task(str(tmp_path), "text-generation", max_length="8")
    assert isinstance(model, TextGeneration) and model.packs
    model.attention_kernel = kernel
    chunked_streams_answer_as_generate(model)


def test_a_model_that_does_not_pack_decodes_alike_in_a_padded_batch(model: TextGeneration) -> None:
    """The padded running batch (a model whose packed forward would not give its own logits) answers the same."""
    requests = [(prompt, {"max_new_tokens": n}) for prompt, n in zip(PROMPTS, LENGTHS)]
    packed = [(r.text, r.tokens) for r in stream_all(model, requests, gap=0.004)]
    padded = copy.copy(model)
    padded.packs = False
    assert isinstance(padded.running_batch(), RunningBatch)
    assert [(r.text, r.tokens) for r in stream_all(padded, requests, gap=0.004)] == packed
    assert (
        model([PROMPTS[2]], [model.parse_options({"max_new_tokens": 6})])["text"].tolist()
        == padded([PROMPTS[2]], [model.parse_options({"max_new_tokens": 6})])["text"].tolist()
    )


def test_the_running_batch_is_bounded(model: TextGeneration) -> None:
    seen: list[int] = []

    class Occupancy(Quiet):
        def occupancy(self, running: int, queued: int) -> None:
            seen.append(running)

    recorders = [Recorder() for _ in PROMPTS[:8]]
    with scheduling(model, max_sequences=3, observer=Occupancy()) as scheduler:
        for prompt, recorder in zip(PROMPTS, recorders):
            scheduler.submit(model.sequence(prompt, model.parse_options({"max_new_tokens": 10}), recorder))
        assert all(r.done.wait(60) for r in recorders)
    assert max(seen) == 3 and all(r.tokens == 10 for r in recorders)
    with (
        scheduling(model, max_tokens=20) as scheduler,
        pytest.raises(RequestError, match="exceeds this model's max_running_tokens"),
    ):
        scheduler.submit(model.sequence(PROMPTS[0], model.parse_options({"max_new_tokens": 30})))


def test_a_late_request_streams_before_the_early_ones_finish(model: TextGeneration) -> None:
    early = [Recorder() for _ in range(2)]
    late = Recorder()
    with scheduling(model) as scheduler:
        for recorder in early:
            scheduler.submit(model.sequence(PROMPTS[1], model.parse_options({"max_new_tokens": 200}), recorder))
        until(lambda: early[0].tokens >= 5, what="the early requests to be decoding")
        scheduler.submit(model.sequence(PROMPTS[2], model.parse_options({"max_new_tokens": 3}), late))
        assert late.done.wait(60) and all(r.done.wait(60) for r in early)
    assert late.pieces[0][0] < min(r.pieces[-1][0] for r in early), "admitted at a step boundary, not after the batch"
    assert late.pieces[-1][0] < min(r.pieces[-1][0] for r in early)


def test_a_cancelled_stream_leaves_the_others_intact(model: TextGeneration) -> None:
    kept, cancelled = Recorder(), Recorder(cancel_after=3)
    with scheduling(model) as scheduler:
        scheduler.submit(model.sequence(PROMPTS[3], model.parse_options({"max_new_tokens": 40}), kept))
        scheduler.submit(model.sequence(PROMPTS[7], model.parse_options({"max_new_tokens": 40}), cancelled))
        assert kept.done.wait(60) and cancelled.done.wait(60)
        until(lambda: not scheduler.batch.rows, what="the slot to be freed")
    assert cancelled.error == ("request cancelled", "cancelled") and 3 <= cancelled.tokens < 40
    assert (
        kept.error is None
        and kept.text == model([PROMPTS[3]], [model.parse_options({"max_new_tokens": 40})])["text"][0, 0].decode()
    )


def test_streams_hold_back_what_may_still_change() -> None:
    """A stop string's start, or a character still missing bytes, is not sent until it is settled."""
    recorder = Recorder()
    row = Sequence("prompt", [1], GenerationParams(max_new_tokens=10, stop=("END",), return_full_text=False), recorder)
    sent = []
    for token, piece in enumerate(["Hi E", "x E", "N", None, "D and more"]):  # None: a character still missing bytes
        row.add(token, frozenset())
        row.extend(piece)
        sent.append(row.take())
    assert sent == [Piece("Hi ", 1, 1), Piece("Ex ", 1, 1), None, None, Piece("", 3, 1, "stop")]
    assert row.finish == "stop" and row.text == "Hi Ex "


def test_a_stream_with_a_stop_string_ends_before_it(model: TextGeneration) -> None:
    full = model([PROMPTS[4]], [model.parse_options({"max_new_tokens": 20, "return_full_text": False})])["text"][
        0, 0
    ].decode()
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    [streamed] = stream_all(model, [(PROMPTS[4], {"max_new_tokens": 20, "return_full_text": False, "stop": stop})])
    assert streamed.text == full[: full.index(stop)] and streamed.tokens < 20


# --- the scheduler when something fails ------------------------------------------------------


class Faulty:
    """A model whose prefill fails for one prompt, as an out-of-memory error would: in a padded prefill forward, or
    in a packed step that carries the prompt's end."""

    def __init__(self, model: TextGeneration, poison: list[int]) -> None:
        self.model, self.poison = model, poison

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        if ids.shape[1] > 1 and any(row[-len(self.poison) :].tolist() == self.poison for row in ids):
            raise RuntimeError("out of memory (injected)")
        return self.model.forward(ids, mask, cache)

    def packed_forward(self, ids: torch.Tensor, plan: Plan, keep: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        tokens, n = ids.tolist(), len(self.poison)
        if any(tokens[i : i + n] == self.poison for i in range(len(tokens) - n + 1)):
            raise RuntimeError("out of memory (injected)")
        return self.model.packed_forward(ids, plan, keep, cache)

    def running_batch(self, prefill: PrefillBudget | None = None) -> PackedBatch | RunningBatch:
        return PackedBatch(self, prefill) if self.model.packs else RunningBatch(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def test_a_failed_prefill_fails_only_its_newcomers(model: TextGeneration) -> None:
    poisoned = "Zebras quietly juggle seven violet umbrellas."  # its own tokens, in one chunk: a step's budget holds it
    faulty = Faulty(model, model.sequence(poisoned, model.defaults).prompt_ids[-3:])
    running, bad, later = Recorder(), Recorder(), Recorder()
    with scheduling(faulty) as scheduler:
        scheduler.log_error = lambda message: None
        scheduler.submit(
            model.sequence(PROMPTS[3], model.parse_options({"max_new_tokens": 30, "min_new_tokens": 30}), running)
        )
        until(lambda: running.tokens >= 2, what="the first request to be decoding")
        scheduler.submit(model.sequence(poisoned, model.defaults, bad))
        assert bad.done.wait(60) and running.done.wait(60)
        scheduler.submit(model.sequence(PROMPTS[5], model.parse_options({"max_new_tokens": 4}), later))
        assert later.done.wait(60)
    assert bad.error[1] == "internal" and "out of memory (injected)" in bad.error[0]
    assert running.error is None and running.tokens == 30
    assert later.error is None and later.tokens == 4


def test_a_failing_observer_does_not_stop_the_scheduler(model: TextGeneration) -> None:
    class Broken(Quiet):
        def first_token(self, seconds: float) -> None:
            raise RuntimeError("metrics down")

        def occupancy(self, running: int, queued: int) -> None:
            raise RuntimeError("metrics down")

    recorders = [Recorder() for _ in range(3)]
    with scheduling(model, observer=Broken()) as scheduler:
        scheduler.log_error = lambda message: None
        for recorder in recorders:
            scheduler.submit(model.sequence(PROMPTS[0], model.parse_options({"max_new_tokens": 1}), recorder))
        assert all(r.done.wait(60) for r in recorders)
        assert scheduler.thread.is_alive()
    assert all(r.error is None and r.tokens == 1 for r in recorders)


def test_requests_after_close_get_an_error(model: TextGeneration) -> None:
    with scheduling(model) as scheduler:
        pass
    late = Recorder()
    scheduler.submit(model.sequence(PROMPTS[0], model.defaults, late))
    assert late.done.is_set() and late.error == ("the model is unloading", "unavailable")
