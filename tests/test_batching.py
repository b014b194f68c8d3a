"""Unit tier, no server: collect -> pad -> forward -> split, and the task heads in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tritonhf.backends.python_hf.batching import (
    Failure,
    RequestError,
    attempt,
    collect,
    decode_rows,
    length_buckets,
    merge,
    run_batch,
    run_tensor_batch,
    split,
)
from tritonhf.backends.python_hf.tasks import ConfigError, load_task

from .conftest import CLASSIFIER


def prompt(*rows: str | bytes) -> np.ndarray:
    return np.array([r.encode() if isinstance(r, str) else r for r in rows], dtype=object).reshape(-1, 1)


def echo(texts: list[str]) -> dict[str, np.ndarray]:
    """A forward whose output names its input row: shows where every row went."""
    return {
        "text": np.array([t.upper().encode() for t in texts], dtype=object).reshape(-1, 1),
        "n": np.arange(len(texts)),
    }


def test_collect_flattens_uneven_requests_in_order() -> None:
    batch = collect([prompt("a", "b"), prompt("c", "d", "e"), prompt("f")])
    assert batch.texts == ["a", "b", "c", "d", "e", "f"]
    assert batch.counts == [2, 3, 1]
    assert batch.failures == {}


def test_a_request_whose_options_break_the_reader_fails_alone() -> None:
    def read(rows: list[str], options: dict) -> list[int]:
        if rows == ["bad"]:
            raise RequestError("bad row")
        return [int(options["n"])] * len(rows)  # int("²") raises ValueError, not RequestError

    requests = [prompt("a"), prompt("b"), prompt("c", "d"), prompt("bad")]
    batch = collect(requests, [{"n": "1"}, {"n": "²"}, {"n": "3"}, {"n": "4"}], read)
    assert batch.texts == ["a", "c", "d"] and batch.options == [1, 3, 3] and batch.counts == [1, 0, 2, 0]
    assert batch.failures[1].internal and "ValueError" in batch.failures[1].message
    assert batch.failures[3] == Failure("bad row")


def test_split_gives_each_request_its_rows() -> None:
    parts = split({"n": np.arange(6)}, [2, 3, 1])
    assert [p["n"].tolist() for p in parts] == [[0, 1], [2, 3, 4], [5]]


def test_split_checks_the_totals() -> None:
    with pytest.raises(RuntimeError, match="5 rows for 6 input rows"):
        split({"n": np.arange(5)}, [2, 3, 1])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (None, "missing input 'prompt'"),
        (prompt(b"\xff\xfeok"), "not valid UTF-8"),
        (prompt(""), "row 0 is empty"),
        (prompt("fine", "   "), "row 1 is empty"),
        (np.array([b"a", b"b"], dtype=object), r"shape \[rows, 1\]"),
        (np.empty((0, 1), dtype=object), "no rows"),
        (np.array([[1]], dtype=object), "not a string"),
    ],
)
def test_decode_rows_rejects_bad_input(tensor: np.ndarray | None, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        decode_rows(tensor)


def test_run_batch_isolates_a_bad_request() -> None:
    calls = []

    def forward(texts: list[str]) -> dict[str, np.ndarray]:
        calls.append(texts)
        return echo(texts)

    results = run_batch(forward, [prompt("a", "b"), prompt(b"\xff"), None, prompt("c", "d", "e"), prompt("f")])
    assert calls == [["a", "b", "c", "d", "e", "f"]], "one forward over the valid rows only"
    assert [r["text"][:, 0].tolist() if isinstance(r, dict) else r for r in results] == [
        [b"A", b"B"],
        Failure("prompt row 0 is not valid UTF-8 (invalid start byte at byte 0)"),
        Failure("missing input 'prompt'"),
        [b"C", b"D", b"E"],
        [b"F"],
    ]


def test_a_request_that_cannot_be_read_fails_alone() -> None:
    """Reading a request (its tensors, its parameters) happens inside its own guard: the batch goes on."""

    def unreadable() -> np.ndarray:
        raise KeyError("parameters")

    read = [attempt(lambda: prompt("a")), attempt(unreadable), attempt(lambda: prompt("b"))]
    results = run_batch(echo, read)
    assert results[1] == Failure("could not read the request: KeyError: 'parameters'")
    assert [results[0]["text"][:, 0].tolist(), results[2]["text"][:, 0].tolist()] == [[b"A"], [b"B"]]
    tensors = [{"x": np.ones((2, 3))}, attempt(unreadable), {"x": np.zeros((1, 3))}]
    answered = run_tensor_batch(lambda batch: {"sum": batch["x"].sum(-1)}, tensors)
    assert answered[0]["sum"].tolist() == [3.0, 3.0] and answered[2]["sum"].tolist() == [0.0]
    assert answered[1] == Failure("could not read the request: KeyError: 'parameters'")


def test_run_batch_turns_a_failed_forward_into_internal_errors() -> None:
    logged = []

    def broken(texts: list[str]) -> dict[str, np.ndarray]:
        raise RuntimeError("out of memory\nsecond line")

    results = run_batch(broken, [prompt("a"), prompt(""), prompt("b")], logged.append)
    assert results[0] == results[2] == Failure("inference failed: RuntimeError: out of memory", internal=True)
    assert results[1] == Failure("prompt row 0 is empty")
    assert "Traceback" in logged[0] and "second line" in logged[0]


def test_run_batch_with_only_bad_requests_runs_no_forward() -> None:
    def never(texts: list[str]) -> dict[str, np.ndarray]:
        raise AssertionError("forward called")

    assert run_batch(never, [prompt("")]) == [Failure("prompt row 0 is empty")]


def test_length_buckets_group_rows_of_similar_length() -> None:
    lengths = [40, 5, 41, 6, 5, 39, 7, 42]
    assert length_buckets(lengths, overhead_tokens=1e9) == [[1, 4, 3, 6, 5, 0, 2, 7]], "huge overhead: one forward"
    assert length_buckets(lengths, overhead_tokens=35) == [[1, 4, 3, 6], [5, 0, 2, 7]]
    assert length_buckets([9, 9, 9], overhead_tokens=0) == [[0, 1, 2]]
    assert length_buckets([], overhead_tokens=35) == []
    groups = length_buckets(lengths, overhead_tokens=0)
    assert sorted(i for g in groups for i in g) == list(range(8)), "every row exactly once"


def test_merge_puts_rows_back_in_order() -> None:
    parts = [([1, 3], {"n": np.array([[10], [30]])}), ([2, 0], {"n": np.array([[20], [0]])})]
    assert merge(parts, 4)["n"][:, 0].tolist() == [0, 10, 20, 30]


def test_bucketed_forward_equals_one_forward(tiny: dict[str, Path]) -> None:
    bucketed = load_task(str(tiny[CLASSIFIER]), "text-classification")
    single = load_task(str(tiny[CLASSIFIER]), "text-classification", forward_overhead_tokens="1e9")
    texts = [*PROMPTS, "word " * 300]
    np.testing.assert_allclose(bucketed(texts)["score"], single(texts)["score"], atol=1e-5)
    assert bucketed(texts)["label"].tolist() == single(texts)["label"].tolist()


# --- the task heads, in-process, on tiny models -------------------------------------------

PROMPTS = ["short", "a somewhat longer prompt with more words in it", "mid length one", "x " * 40]


@pytest.mark.parametrize("name", ["gpt2", "facebook/opt-125m"])
def test_generation_batch_equals_one_at_a_time(tiny: dict[str, Path], name: str) -> None:
    task = load_task(str(tiny[name]), "text-generation", max_length="8")
    assert task.tokenizer.padding_side == "left"
    batched = task(PROMPTS)["text"][:, 0]
    assert batched.tolist() == [task([p])["text"][0, 0] for p in PROMPTS]
    assert all(text.decode().startswith(p) for text, p in zip(batched, PROMPTS)), "text starts with the prompt"


def test_classification_matches_the_pipeline(tiny: dict[str, Path]) -> None:
    from transformers import pipeline

    task = load_task(str(tiny[CLASSIFIER]), "text-classification")
    out = task(PROMPTS)
    reference = pipeline("text-classification", model=str(tiny[CLASSIFIER]), device="cpu")(PROMPTS)
    assert [label.decode() for label in out["label"][:, 0]] == [r["label"] for r in reference]
    np.testing.assert_allclose(out["score"][:, 0], [r["score"] for r in reference], atol=1e-5)


def test_embedding_matches_sentence_transformers(tiny: dict[str, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    path = str(tiny["all-MiniLM-L6-v2"])
    task = load_task(path, "feature-extraction")
    assert task.max_tokens == 256, "sentence_bert_config.json's max_seq_length"
    long_prompts = [*PROMPTS, "word " * 400]  # past 256 tokens: truncated the same way
    reference = SentenceTransformer(path, device="cpu").encode(long_prompts, normalize_embeddings=True)
    cosine = (task(long_prompts)["embedding"] * reference).sum(axis=1)
    assert cosine.min() >= 0.9999


def test_long_input_is_truncated_not_rejected(tiny: dict[str, Path]) -> None:
    task = load_task(str(tiny[CLASSIFIER]), "text-classification")
    assert task.max_tokens == 512
    assert task(["word " * 100_000])["label"].shape == (1, 1)
    gen = load_task(str(tiny["gpt2"]), "text-generation", max_length="8")
    for new_tokens in (8, 100):
        ids = gen.sequence(
            "start " + "middle " * 1000 + "end", gen.parse_options({"max_new_tokens": new_tokens})
        ).prompt_ids
        assert len(ids) == 256 - new_tokens, "room for the new tokens within the model's 256 positions"
        assert gen.tokenizer.decode(ids).endswith("end"), "generation keeps the end of a long prompt"


@pytest.mark.parametrize(
    ("task", "options", "message"),
    [
        ("summarization", {}, "unknown task"),
        ("text-generation", {"max_length": "0"}, "max_length"),
        ("text-generation", {"max_length": "100000"}, "max_length"),
        ("text-generation", {"temperature": "-1"}, "temperature"),
        ("text-generation", {"max_running_sequences": "0"}, "max_running_sequences"),
        ("text-classification", {"max_length": "8"}, "takes no option max_length"),
    ],
)
def test_bad_configuration_fails_at_load(
    tiny: dict[str, Path], task: str, options: dict[str, str], message: str
) -> None:
    source = tiny["gpt2"] if task == "text-generation" else tiny[CLASSIFIER]
    with pytest.raises(ConfigError, match=message):
        load_task(str(source), task, **options)


def test_bad_dtype_fails_at_load(tiny: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        load_task(str(tiny[CLASSIFIER]), "text-classification", dtype="float8")


def test_dtype_is_honoured(tiny: dict[str, Path]) -> None:
    task = load_task(str(tiny[CLASSIFIER]), "text-classification", dtype="bfloat16")
    assert task.model.dtype == torch.bfloat16
    assert task(["fine"])["score"].dtype == np.float32, "scores are computed in float32"
