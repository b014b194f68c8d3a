"""Offline stand-ins for the tutorial's models (``tritonhf standins``).

The Hugging Face Hub can't be reached from CI or the dev machines, so demo and
tests load local directories written here, through the same
``from_pretrained`` path that loads hub models. Each stand-in has its real
model's architecture and config (``full``: full size, so speed figures carry
over; ``tiny``: a few layers, for tests), random weights, and a tokenizer
trained on the spot: byte-level BPE for GPT-2/OPT, WordPiece for DistilBERT.
Random weights give gibberish text and coin-flip labels; the shapes, the FLOPs
and the serving path are the real ones.

The tokenizer's vocabulary is trained on the Python sources of ``transformers``
(a few tens of MB of English docstrings and code that every install has); the
model's ``vocab_size`` is set to what the trainer reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

SIZES = {
    "full": {"corpus_mb": 30, "bpe_vocab": 50257, "wordpiece_vocab": 30522},
    "tiny": {"corpus_mb": 1, "bpe_vocab": 2000, "wordpiece_vocab": 2000},
}
TINY = {"n_layer": 2, "n_head": 2, "hidden": 64}


def corpus(megabytes: float) -> Iterator[str]:
    """Deterministic text: the sorted Python sources of the installed transformers package."""
    budget = megabytes * 1e6
    for path in sorted(Path(transformers.__file__).parent.rglob("*.py")):
        text = path.read_text(errors="ignore")
        yield text
        budget -= len(text)
        if budget <= 0:
            return


def byte_level_bpe(vocab_size: int, megabytes: float, bos: str | None = None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"] if bos is None else ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(megabytes), trainer)
    if bos is not None:  # OPT's tokenizer starts every input with </s>
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return tokenizer


def wordpiece(vocab_size: int, megabytes: float) -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(
        corpus(megabytes), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tokenizer


def gpt2(size: str) -> tuple[PreTrainedTokenizerFast, transformers.PretrainedConfig, type]:
    s = SIZES[size]
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(s["bpe_vocab"], s["corpus_mb"]),
        bos_token=eos,
        eos_token=eos,
        unk_token=eos,
        model_max_length=1024,
        model_input_names=["input_ids", "attention_mask"],
    )
    small = (
        {"n_layer": TINY["n_layer"], "n_head": TINY["n_head"], "n_embd": TINY["hidden"], "n_positions": 256}
        if size == "tiny"
        else {}
    )
    return (
        tokenizer,
        transformers.GPT2Config(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, **small),
        transformers.GPT2LMHeadModel,
    )


def opt(size: str) -> tuple[PreTrainedTokenizerFast, transformers.PretrainedConfig, type]:
    s = SIZES[size]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(s["bpe_vocab"], s["corpus_mb"], bos="</s>"),
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=2048,
        model_input_names=["input_ids", "attention_mask"],
    )
    small = (
        {
            "num_hidden_layers": TINY["n_layer"],
            "num_attention_heads": TINY["n_head"],
            "hidden_size": TINY["hidden"],
            "word_embed_proj_dim": TINY["hidden"],
            "ffn_dim": 4 * TINY["hidden"],
            "max_position_embeddings": 256,
        }
        if size == "tiny"
        else {}
    )
    config = transformers.OPTConfig(vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=2, eos_token_id=2, **small)
    return tokenizer, config, transformers.OPTForCausalLM


def distilbert_sst2(size: str) -> tuple[PreTrainedTokenizerFast, transformers.PretrainedConfig, type]:
    s = SIZES[size]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece(s["wordpiece_vocab"], s["corpus_mb"]),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )
    small = (
        {
            "n_layers": TINY["n_layer"],
            "n_heads": TINY["n_head"],
            "dim": TINY["hidden"],
            "hidden_dim": 4 * TINY["hidden"],
        }
        if size == "tiny"
        else {}
    )
    config = transformers.DistilBertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        **small,
    )
    return tokenizer, config, transformers.DistilBertForSequenceClassification


@dataclass(frozen=True)
class StandIn:
    hub_id: str
    make: Callable[[str], tuple[PreTrainedTokenizerFast, transformers.PretrainedConfig, type]]
    flag: str  # the build flag that takes it: its task


STANDINS = (
    StandIn("facebook/opt-125m", opt, "--gen-models"),
    StandIn("gpt2", gpt2, "--gen-models"),
    StandIn("distilbert-base-uncased-finetuned-sst-2-english", distilbert_sst2, "--class-models"),
)


def build_command(paths: dict[str, Path]) -> str:
    """``tritonhf build`` for the stand-ins at ``paths`` (hub id -> directory): the tutorial's models, offline."""
    flags: dict[str, list[str]] = {}
    for standin in STANDINS:
        flags.setdefault(standin.flag, []).append(str(paths[standin.hub_id]))
    return " ".join(["tritonhf build", *(f"{flag} {','.join(where)}" for flag, where in flags.items())])


def write_standins(output: Path, size: str = "full", seed: int = 0) -> dict[str, Path]:
    """Write every stand-in under ``output/<hub id>``; existing ones are kept. Returns hub id -> path."""
    paths = {}
    for standin in tqdm(STANDINS, desc=f"{size} stand-ins", unit="model"):
        path = output / standin.hub_id
        if not path.exists():
            tokenizer, config, model_class = standin.make(size)
            torch.manual_seed(seed)
            partial = path.with_name(path.name + ".partial")  # renamed in when whole
            model_class(config).save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            partial.rename(path)
        paths[standin.hub_id] = path
    return paths
