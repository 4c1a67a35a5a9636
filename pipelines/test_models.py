"""`beam-enrich make-test-models DIR`: tiny offline models for every supported task.

Random weights, real tokenizers: a WordPiece vocabulary is trained on the docstrings
of Python's own standard library, so nothing is downloaded and tokenization behaves as
it does for real models (sub-words, offsets, special tokens). The models' outputs are
meaningless; they exist so pipelines and ETL jobs can be tested without a network.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "BUILDERS",
    "NER_LABELS",
    "SENTIMENT_LABELS",
    "builder",
    "byte_level_bpe",
    "make_test_models",
    "save",
    "wordpiece_vocab",
]

SENTIMENT_LABELS = ("NEGATIVE", "POSITIVE")
NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_README = """Tiny test models written by `beam-enrich make-test-models`.

Random weights and small vocabularies: their outputs are MEANINGLESS. Use them to test
pipelines, specs and ETL plumbing offline, never to judge results.
"""


def _corpus() -> list[str]:
    # Docstrings of standard-library modules: English prose every Python ships with.
    import argparse as m1
    import collections as m2
    import csv as m3
    import datetime as m4
    import email as m5
    import json as m6
    import logging as m7
    import string as m8
    import textwrap as m9

    texts = []
    for module in (m1, m2, m3, m4, m5, m6, m7, m8, m9):
        for value in [module, *vars(module).values()]:
            doc = getattr(value, "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return texts


def _labels(names: Sequence[str]) -> dict:
    return {
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


@functools.cache
def wordpiece_vocab(size: int = 2000) -> dict[str, int]:
    """A lower-cased BERT-style WordPiece vocabulary trained on the corpus."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=size, special_tokens=list(_SPECIAL))
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer.get_vocab()


@functools.cache
def byte_level_bpe(size: int = 2000, special_tokens: tuple[str, ...] = ()) -> tuple[dict, list]:
    """A GPT-2 style byte-level BPE (vocab, merges) trained on the corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    state = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return state["vocab"], merges


# A wide weight spread keeps scores far from uniform, so float noise from padding
# cannot flip an argmax between batched and unbatched runs.
BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
    "initializer_range": 0.5,
}
DISTILBERT = {
    "dim": 32,
    "hidden_dim": 64,
    "n_layers": 2,
    "n_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.5,
}

#: Model folder name -> function(target, seed) that writes a tiny model there.
BUILDERS: dict[str, Callable[[Path, int], None]] = {}


def builder(name: str):
    """Registers a function that writes the tiny model `name`."""

    def register(function):
        BUILDERS[name] = function
        return function

    return register


def save(model, tokenizer, target: Path) -> None:
    """Saves a model and its tokenizer with the README that says they are meaningless."""
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "README.txt").write_text(_README, encoding="utf-8")


# Model and tokenizer classes match, so the tokenizer feeds only inputs the model
# accepts (DistilBERT takes no token_type_ids).


@builder("text-classification")
def _text_classification(target: Path, seed: int) -> None:
    import torch
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertTokenizer,
    )

    vocab = wordpiece_vocab()
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=len(vocab), **DISTILBERT, **_labels(SENTIMENT_LABELS))
    model = DistilBertForSequenceClassification(config)
    save(model, DistilBertTokenizer(vocab=vocab, model_max_length=512), target)


@builder("token-classification")
def _token_classification(target: Path, seed: int) -> None:
    import torch
    from transformers import BertConfig, BertForTokenClassification, BertTokenizer

    vocab = wordpiece_vocab()
    torch.manual_seed(seed)
    model = BertForTokenClassification(
        BertConfig(vocab_size=len(vocab), **BERT, **_labels(NER_LABELS))
    )
    save(model, BertTokenizer(vocab=vocab, model_max_length=512), target)


@builder("feature-extraction")
def _feature_extraction(target: Path, seed: int) -> None:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = wordpiece_vocab()
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocab), **BERT))
    save(model, BertTokenizer(vocab=vocab, model_max_length=512), target)


def make_test_models(
    directory: str | Path, *, seed: int = 0, only: Sequence[str] | None = None
) -> dict[str, Path]:
    """Writes one tiny model per entry of `BUILDERS` under `directory`.

    Args:
        directory: the parent folder; each model gets a folder named after its entry.
        seed: the torch seed for the random weights.
        only: build just these entries.

    Returns:
        Entry name -> model directory.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, build in BUILDERS.items():
        if only is not None and name not in only:
            continue
        build(root / name, seed)
        written[name] = root / name
    (root / "README.txt").write_text(_README, encoding="utf-8")
    (root / "models.json").write_text(
        json.dumps({name: str(path) for name, path in written.items()}, indent=2) + "\n",
        encoding="utf-8",
    )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """`beam-enrich make-test-models DIR`."""
    parser = argparse.ArgumentParser(
        prog="beam-enrich make-test-models",
        description="Write tiny random-weight models (real tokenizers) for offline tests. "
        "Their outputs are meaningless.",
    )
    parser.add_argument("directory", help="where to write one folder per task family")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for task, path in make_test_models(args.directory, seed=args.seed).items():
        print(f"{task}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
