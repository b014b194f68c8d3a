"""The three task heads served by the generic model, as data plus one forward each.

A task turns a list of texts into output arrays whose first axis is the text:
the *pad* and *forward* steps of collect -> pad -> forward -> split. Each task
declares its Triton outputs once (:meth:`HFTask.outputs`); the repository
builder writes config.pbtxt from the same declaration.

Semantics kept from the Triton tutorial, and what we changed (README, "Models"):
- text-generation: greedy by default; the config parameter ``max_length`` is the
  default number of *new* tokens (the tutorial's ``max_length=15`` was silently
  overridden by the pipeline's ``max_new_tokens=256``; counting the prompt
  would also make a short prompt's answer depend on the longest prompt in its
  batch). Each request may set its own ``max_new_tokens``, sampling, seed and
  stop strings (parameters.GenerationParams). ``text`` is the prompt followed by
  the generated text, as the tutorial's pipeline returned it; ``new_tokens``
  counts the generated tokens. Prompts are truncated from the left to leave
  room for the new tokens.
- text-classification: ``label`` from the model's ``id2label``; ``score`` is the
  probability of that label (softmax, or sigmoid for one-label and multi-label
  models, as the transformers pipeline does).
- feature-extraction: attention-masked mean pooling, L2-normalised (what
  sentence-transformers' all-MiniLM-L6-v2 does).
Inputs longer than the model's maximum are truncated to it, not rejected.
Encoders pad rows of similar length together (batching.length_buckets);
generation is one forward per decoding step for the whole batch
(running_batch.py), and the streaming variant's scheduler (scheduler.py)
admits new requests at every step.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import transformers
from tokenizers.decoders import DecodeStream
from transformers import DynamicCache
from transformers.utils import cached_file

from .batching import FORWARD_OVERHEAD_TOKENS, BatchFn, RequestError, merge
from .budget import PrefillBudget
from .hardware import FLOAT32, Choice, choose
from .heads import GENERATION_OUTPUTS, ClassificationHead, generation_outputs, mean_pool
from .packed import PackedBatch, Plan, SlotCache, attention_choice, packs
from .parameters import (
    CONFIG_NAMES,
    OPTIONAL_INPUTS,
    PARAMETERS,
    PER_REQUEST_ONLY,
    GenerationParams,
    Limits,
    Options,
    as_bool,
    combine,
)
from .running_batch import RunningBatch, generate_all
from .scheduler import Observer, Scheduler
from .sequence import Sequence, Stream
from .steps import StepContext
from .tensors import TensorSpec
from .text import length_groups, load_tokenizer, render_chat, token_ids


class ConfigError(ValueError):
    """A model configuration that can't be served; raised at load time, never per request."""


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UNBOUNDED = 1_000_000  # tokenizers without a length limit report ~1e30


def resolve_dtype(name: str, device: str, verified_dtypes: str | None = None) -> Choice:
    """The precision a model loads in (hardware.choose).

    ``verified_dtypes``: the reduced precisions the builder's parity gate passed
    for this model, comma-separated (a parameter of every built model's config).
    None: an in-process caller that ran no gate gets what it names, and float32
    for ``auto``.
    """
    if name != "auto" and name not in DTYPES:
        raise ConfigError(f"dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    if verified_dtypes is None:
        return Choice(name, "requested") if name != "auto" else Choice(FLOAT32, "auto without a parity gate")
    return choose(name, device, [d for d in verified_dtypes.split(",") if d])


class HFTask:
    """A Hugging Face model and tokenizer that serve one task over padded batches.

    Encoder tasks pad rows of similar length together (``length_buckets``): on a
    CPU that is a few padded forwards per batch instead of one, ~1.4x the
    throughput on prompts of mixed length; on a GPU it is one forward.
    ``forward_overhead_tokens`` overrides the device's default; 1e9 forces one forward.
    """

    task: ClassVar[str]
    auto_model: ClassVar[type]
    padding_side: ClassVar[str] = "right"
    options: ClassVar[tuple[str, ...]] = ("forward_overhead_tokens",)  # config parameters the task reads

    def __init__(
        self,
        model_id: str,
        device: str = "cpu",
        dtype: str = "auto",
        verified_dtypes: str | None = None,
        forward_overhead_tokens: str | float | None = None,
    ) -> None:
        self.model_id = model_id
        self.device = torch.device(device)
        self.overhead_tokens = float(forward_overhead_tokens or FORWARD_OVERHEAD_TOKENS[self.device.type])
        self.tokenizer = load_tokenizer(model_id, self.padding_side)
        self.precision = resolve_dtype(dtype, device, verified_dtypes)
        self.model = self.auto_model.from_pretrained(model_id, dtype=DTYPES[self.precision.dtype])
        self.model.to(self.device).eval()
        self.max_tokens = self.max_positions()
        self.vocabulary = min(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)  # valid ids

    def max_positions(self) -> int:
        """The longest input the model takes, in tokens."""
        config = self.model.config
        limits = [self.tokenizer.model_max_length]
        limits += [getattr(config, key) for key in ("max_position_embeddings", "n_positions") if hasattr(config, key)]
        limits = [int(limit) for limit in limits if limit and 0 < limit < UNBOUNDED]  # XLNet says -1: none
        if not limits:
            raise ConfigError(f"{self.model_id}: neither the tokenizer nor the config gives a maximum length")
        return min(limits)

    def __call__(self, texts: list[str], ids: list[list[int] | None] | None = None) -> dict[str, np.ndarray]:
        """Padded forwards over rows of similar length; arrays with one row per text, in order."""
        encoded = self.encode(texts, ids)
        with torch.inference_mode():
            parts = [
                (rows, self.forward([texts[i] for i in rows], {name: t.to(self.device) for name, t in padded.items()}))
                for rows, padded in length_groups(self.tokenizer, encoded, self.overhead_tokens, "pt")
            ]
        return merge(parts, len(texts))

    def encode(self, texts: list[str], ids: list[list[int] | None] | None = None) -> dict[str, list[list[int]]]:
        """Each row's tokens: the tokenizer's for a text, truncated to the model's length; or the ids its request
        gave (``ids``, None for a text row)."""
        rows = list(ids or [None] * len(texts))
        if plain := [i for i, row in enumerate(rows) if row is None]:
            tokenized = self.tokenizer([texts[i] for i in plain], truncation=True, max_length=self.max_tokens)
            for i, row in zip(plain, tokenized["input_ids"], strict=True):
                rows[i] = row
        return {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}

    def forward(self, texts: list[str], batch: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def outputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def parameters(self) -> dict[str, str]:
        """Task options worth recording in config.pbtxt ``parameters``."""
        return {}


class TextGeneration(HFTask):
    """Causal LM generation with per-request parameters; config parameters give the defaults.

    The defaults are parameters.GenerationParams' (``max_length`` / ``min_length``
    keep the tutorial's names for ``max_new_tokens`` / ``min_new_tokens``); the
    streaming model's running batch is bounded and admitted by scheduler.Limits.
    """

    task = "text-generation"
    auto_model = transformers.AutoModelForCausalLM
    padding_side = "left"  # decoder-only: new tokens follow the last real prompt token
    options = (
        *(CONFIG_NAMES.get(name, name) for name in PARAMETERS if name not in PER_REQUEST_ONLY),
        *Limits().as_config(),
        "packed",  # auto (packed steps where the model's own logits come out of them) or false (the padded batch)
    )

    def __init__(
        self, model_id: str, device: str = "cpu", dtype: str = "auto", verified_dtypes: str | None = None, **config: str
    ) -> None:
        super().__init__(model_id, device, dtype, verified_dtypes)
        try:
            self.defaults = GenerationParams.from_config(config, self.max_tokens - 1)
        except RequestError as err:
            raise ConfigError(
                f"generation defaults (max_length = max_new_tokens, min_length = min_new_tokens): {err}"
            ) from None
        if not self.tokenizer.is_fast:  # streaming text comes from tokenizers' DecodeStream
            raise ConfigError(f"{model_id}: generation needs a fast (tokenizers) tokenizer")
        try:
            self.limits = Limits.from_config(config)
        except ValueError as err:
            raise ConfigError(f"scheduling limits: {err}") from None
        if self.limits.max_running_tokens < self.max_tokens:
            raise ConfigError(
                f"max_running_tokens must be >= the model's length ({self.max_tokens}),"
                f" got {self.limits.max_running_tokens}"
            )
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos = frozenset([eos] if isinstance(eos, int) else eos or [])
        starts = (self.model.generation_config.bos_token_id, self.tokenizer.bos_token_id, *sorted(self.eos))
        self.start = [token for token in starts if token is not None][:1]
        accepted = inspect.signature(self.model.forward).parameters
        self.takes_positions, self.keeps_logits = "position_ids" in accepted, "logits_to_keep" in accepted
        if config.get("packed", "auto") not in ("auto", "false"):
            raise ConfigError(f"packed must be auto or false, got {config['packed']!r}")
        packing = config.get("packed", "auto") == "auto" and self.takes_positions
        own = self.cache_dtype = next(self.model.parameters()).dtype
        self.attention_kernel, self.attention = "sdpa", f"{own} by sdpa, the model's own".removeprefix("torch.")
        if packing:  # chosen before the check, which then runs in it
            heads, dim, _ = self.cache_shapes()[0]
            try:
                self.cache_dtype, self.attention_kernel, self.attention = attention_choice(
                    heads, dim, own, self.device, self.limits.max_running_sequences
                )
            except Exception as err:  # noqa: BLE001 - a device that can't time it keeps the model's precision
                self.attention += f" (not timed: {type(err).__name__}: {err})".splitlines()[0]
        self.packs = packing and packs(self)

    # --- what running_batch.RunningBatch needs (running_batch.LanguageModel) ---

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One forward over a left-padded batch; positions count real tokens only, as ``generate`` does."""
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "past_key_values": cache, "use_cache": True}
        if self.takes_positions:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1] :]
        if self.keeps_logits:
            inputs["logits_to_keep"] = 1
        output = self.model(**inputs)
        return output.logits[:, -1].float(), output.past_key_values

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    def running_batch(self, prefill: PrefillBudget | None = None) -> RunningBatch | PackedBatch:
        """The packed batch (packed.py: one forward a step, chunked prefill within ``prefill``) where this model
        packs, else the padded one."""
        return PackedBatch(self, prefill) if self.packs else RunningBatch(self)

    def cache_shapes(self) -> list[tuple[int, int, torch.dtype]]:
        config = self.model.config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        shape = (getattr(config, "num_key_value_heads", None) or heads, getattr(config, "head_dim", None))
        return [(shape[0], shape[1] or config.hidden_size // heads, self.cache_dtype)] * config.num_hidden_layers

    def packed_forward(self, ids: torch.Tensor, plan: Plan, keep: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        inputs: dict[str, Any] = {"input_ids": ids[None], "position_ids": plan.positions[None], "use_cache": True}
        inputs.update(past_key_values=cache, cache_position=plan.positions)
        if self.keeps_logits:
            return self.model(**inputs, logits_to_keep=keep).logits[0].float()
        return self.model(**inputs).logits[0, keep].float()

    def decode(self, tokens: list[list[int]]) -> list[str]:
        """Whole completions. Without the legacy space clean-up, as DecodeStream decodes: the streamed
        pieces always add up to the final text (the clean-up is off by default in transformers)."""
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def decode_step(self, decoder: DecodeStream, token: int) -> str | None:
        return decoder.step(self.tokenizer.backend_tokenizer, token)

    # --- requests ---

    def parse_options(self, raw: Options) -> GenerationParams:
        """A request's generation parameters over the defaults: (request parameters, optional input tensors)."""
        return self.defaults.updated(combine(raw), self.max_tokens - 1)

    def read_rows(self, texts: list[str], raw: Options) -> list[GenerationParams]:
        """A request's parameters, for each of its rows; every row's prompt checked here (chat messages, token ids,
        the context), so that a bad one fails its own request, not the batch. The forward tokenises again:
        microseconds, against a generation's seconds."""
        params = self.parse_options(raw)
        for text in texts:
            self.sequence(text, params)
        return [params] * len(texts)

    def sequence(self, prompt: str, params: GenerationParams, stream: Stream | None = None) -> Sequence:
        """A prompt (a chat's, rendered through the chat template; or token ids), tokenised and truncated from the
        left to leave room for its new tokens, or refused if it does not fit and the request said ``truncate`` false.

        A prompt that makes no tokens starts from BOS (EOS if none), as ``generate`` does without input.
        """
        if params.token_ids:
            ids = token_ids(prompt, self.vocabulary)
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        else:
            prompt, special = render_chat(self.tokenizer, prompt) if params.chat else (prompt, True)
            ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"] or self.start
        if not ids:
            raise RequestError("the prompt makes no tokens, and the model has no BOS or EOS token to start from")
        room = self.max_tokens - params.max_new_tokens
        if len(ids) > room and not params.truncate:
            raise RequestError(
                f"this model's maximum context length is {self.max_tokens} tokens; the prompt has {len(ids)}"
                f" and max_new_tokens asks for {params.max_new_tokens}"
            )
        return Sequence(prompt, ids[-room:], params, stream)

    def __call__(self, texts: list[str], options: list[GenerationParams] | None = None) -> dict[str, np.ndarray]:
        """Static batching: every row of the batch decodes in one forward per step (running_batch.generate_all)."""
        rows = [self.sequence(text, params) for text, params in zip(texts, options or [self.defaults] * len(texts))]
        generate_all(self, rows)
        return generation_outputs([row.whole() for row in rows])

    def scheduler(self, observer: Observer | None = None, log_error: Callable[[str], None] | None = None) -> Scheduler:
        """Continuous batching over this model, for the streaming variant."""
        return Scheduler(self, self.limits, observer, log_error)

    def outputs(self) -> list[TensorSpec]:
        return list(GENERATION_OUTPUTS)

    def optional_inputs(self) -> list[TensorSpec]:
        """Generation parameters for clients that send tensors rather than request parameters."""
        return list(OPTIONAL_INPUTS)

    def parameters(self) -> dict[str, str]:
        return self.defaults.as_config()


class TextClassification(HFTask):
    task = "text-classification"
    auto_model = transformers.AutoModelForSequenceClassification

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head = ClassificationHead.from_config(self.model.config)

    def forward(self, texts: list[str], batch: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return self.head(self.model(**batch).logits.float().cpu().numpy())

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("label", "bytes"), TensorSpec("score", "float32")]


class FeatureExtraction(HFTask):
    task = "feature-extraction"
    auto_model = transformers.AutoModel

    def max_positions(self) -> int:
        """sentence-transformers models cap their input below the architecture's limit (256 for MiniLM)."""
        path = cached_file(self.model_id, "sentence_bert_config.json", _raise_exceptions_for_missing_entries=False)
        limit = json.loads(Path(path).read_text()).get("max_seq_length") if path else None
        return min(super().max_positions(), limit or UNBOUNDED)

    def read_rows(self, texts: list[str], raw: Options) -> list[list[int] | None]:
        """Each row's token ids where its request says ``token_ids`` (a JSON list a row, as the model's tokenizer
        makes them, special tokens included; refused past the model's length, which text is cut to), else None."""
        given = combine(raw)
        if unknown := sorted(set(given) - {"token_ids"}):
            raise RequestError(f"unknown parameter {', '.join(map(repr, unknown))}; {self.task} takes 'token_ids'")
        if not as_bool("token_ids", given.get("token_ids", False)):
            return [None] * len(texts)
        rows = [token_ids(text, self.vocabulary) for text in texts]
        if (long := next((i for i, ids in enumerate(rows) if len(ids) > self.max_tokens), None)) is not None:
            raise RequestError(
                f"token_ids: row {long} has {len(rows[long])} tokens; this model takes at most {self.max_tokens}"
            )
        return rows

    def forward(self, texts: list[str], batch: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        hidden = self.model(**batch).last_hidden_state.float().cpu().numpy()
        return mean_pool(hidden, batch["attention_mask"].cpu().numpy())

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("embedding", "float32", (self.model.config.hidden_size,)), TensorSpec("tokens", "int32")]


TASKS: dict[str, type[HFTask]] = {cls.task: cls for cls in (TextGeneration, TextClassification, FeatureExtraction)}


def load_task(
    model_id: str,
    task: str,
    device: str = "cpu",
    dtype: str = "auto",
    verified_dtypes: str | None = None,
    **options: str,
) -> HFTask:
    """Load a model for a task by name; options are the task's own (``max_length`` for generation)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    accepted = set(TASKS[task].options)
    if unknown := set(options) - accepted:
        raise ConfigError(
            f"{task} takes no option {', '.join(sorted(unknown))}; it takes: {', '.join(sorted(accepted)) or 'none'}"
        )
    return TASKS[task](model_id, device=device, dtype=dtype, verified_dtypes=verified_dtypes, **options)


def from_context(context: StepContext) -> BatchFn:
    """The generic model's default step: a whole Hugging Face model for its task, in PyTorch."""
    ignored = ("huggingface_model", "step", "cpu_threads")  # cpu_threads: applied by steps.load_step
    options = {key: value for key, value in context.parameters.items() if key not in ignored}
    return load_task(context.source(), options.pop("task"), device=context.device, **options)
