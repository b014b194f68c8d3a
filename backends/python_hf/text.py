"""Tokenizers: loading, chat prompts, and the ensembles' tokenize step (transformers' tokenizers only, no torch)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import transformers

from .batching import BatchFn, RequestError, length_buckets
from .steps import StepContext

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
)  # what every served network takes; GPT-2 would add token_type_ids to its embeddings
PAD_MULTIPLE = 16


def load_tokenizer(source: str, side: str = "right") -> transformers.PreTrainedTokenizerBase:
    """A tokenizer that pads and truncates on ``side`` and returns only MODEL_INPUTS."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = tokenizer.truncation_side = side
    tokenizer.model_input_names = [name for name in tokenizer.model_input_names if name in MODEL_INPUTS]
    return tokenizer


# For models whose tokenizer has no chat template (gpt2, opt-125m): a system message as a first paragraph, then
# "User: ..." / "Assistant: ..." lines, ending with "Assistant:" for the model to go on from (README, "OpenAI API").
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] in ('system', 'developer') -%}{{ message['content'] ~ '\\n\\n' }}"
    "{%- else -%}{{ (message['role'] | capitalize) ~ ': ' ~ message['content'] ~ '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


def render_chat(tokenizer: transformers.PreTrainedTokenizerBase, messages_json: str) -> tuple[str, bool]:
    """A JSON list of chat messages ({"role", "content"} with text content) as the prompt the model's chat template
    makes of it, ready for the answer; and whether to add the tokenizer's special tokens when encoding it (a model's
    own template writes them itself; the plain one does not)."""
    try:
        messages = json.loads(messages_json)
    except ValueError as err:
        raise RequestError(f"chat: the prompt must be a JSON list of messages ({err})") from None
    if not isinstance(messages, list) or not messages:
        raise RequestError("chat: the prompt must be a non-empty JSON list of messages")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
            raise RequestError(f"chat: message {i} must be an object with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"chat: message {i}'s content must be text")
    own = tokenizer.chat_template is not None
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=None if own else PLAIN_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
    except Exception as err:  # noqa: BLE001 - a template may raise on what it does not accept (roles, order)
        raise RequestError(f"chat: the model's chat template refused the messages: {err}".splitlines()[0]) from None
    return text, not own


def token_ids(text: str, vocabulary: int) -> list[int]:
    """A prompt given as token ids (a JSON list of integers, as the model's tokenizer makes them, special tokens
    included): the ids, checked against the vocabulary."""
    try:
        ids = json.loads(text)
    except ValueError as err:
        raise RequestError(f"token_ids: the prompt must be a JSON list of token ids ({err})") from None
    if not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids):
        raise RequestError("token_ids: the prompt must be a non-empty JSON list of integers")
    if bad := [i for i in ids if not 0 <= i < vocabulary]:
        raise RequestError(f"token_ids: {bad[0]} is not a token id of this model (0 to {vocabulary - 1})")
    return ids


def length_groups(
    tokenizer: transformers.PreTrainedTokenizerBase, encoded: Mapping[str, list], overhead_tokens: float, tensors: str
) -> Iterator[tuple[list[int], Mapping[str, Any]]]:
    """Encoded rows in groups of similar length (batching.length_buckets), each padded to its longest row:
    (row indices, padded ``tensors``: "pt" or "np")."""
    for rows in length_buckets([len(ids) for ids in encoded["input_ids"]], overhead_tokens):
        yield rows, tokenizer.pad({name: [encoded[name][i] for i in rows] for name in encoded}, return_tensors=tensors)


def tokenize(context: StepContext) -> BatchFn:
    """The ensembles' first step: prompts -> INT64 input_ids / attention_mask, padded per batch.

    Triton batches two requests only when their shapes match past the batch axis.
    Padding to the longest row of the tokenizer's batch gives every request of
    that batch the same shape, so they batch together again in the network step
    right after; rounding the length up to a multiple of 16 lets requests from
    neighbouring tokenizer batches match too, for at most 15 padding tokens a
    row. Padding every request to the model's maximum (the usual recipe) would
    always batch, but costs up to 512 tokens of compute for a 10-token prompt.
    """
    tokenizer = load_tokenizer(context.source())
    limit = int(context.parameters["max_tokens"])
    names = context.output_names or MODEL_INPUTS
    multiple = math.gcd(PAD_MULTIPLE, limit)  # 16, unless rounding up to 16 could pass the model's limit
    options = {"return_token_type_ids": "token_type_ids" in names, "return_tensors": "np"}

    def forward(texts: list[str]) -> dict[str, np.ndarray]:
        padded = tokenizer(
            texts, padding=True, pad_to_multiple_of=multiple, truncation=True, max_length=limit, **options
        )
        return {name: padded[name].astype(np.int64) for name in names}

    return forward
