"""`beam-enrich make-test-models DIR`: tiny offline models for every supported task.

Random weights, real tokenizers: a WordPiece vocabulary is trained on the docstrings
of Python's own standard library, so nothing is downloaded and tokenization behaves as
it does for real models (sub-words, offsets, special tokens). The models' outputs are
meaningless; they exist so pipelines and ETL jobs can be tested without a network.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["NER_LABELS", "SENTIMENT_LABELS", "make_test_models"]

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


def _wordpiece_vocab(size: int) -> dict[str, int]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=size, special_tokens=list(_SPECIAL))
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer.get_vocab()


def _labels(names: Sequence[str]) -> dict:
    return {
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def make_test_models(directory: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """Writes one tiny model per task family under `directory`.

    Returns:
        Task name -> model directory (`text-classification`, `token-classification`,
        `feature-extraction`; the sentiment-analysis and ner tasks use the first two).
    """
    import torch
    from transformers import (
        BertConfig,
        BertForTokenClassification,
        BertModel,
        BertTokenizer,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertTokenizer,
    )

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    vocab = _wordpiece_vocab(2000)
    # A wide weight spread keeps scores far from uniform, so float noise from padding
    # cannot flip an argmax between batched and unbatched runs.
    bert = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "initializer_range": 0.5,
    }
    distilbert = {
        "vocab_size": len(vocab),
        "dim": 32,
        "hidden_dim": 64,
        "n_layers": 2,
        "n_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.5,
    }
    # Model and tokenizer classes match, so the tokenizer feeds only inputs the
    # model accepts (DistilBERT takes no token_type_ids).
    builds = {
        "text-classification": (
            DistilBertForSequenceClassification,
            DistilBertConfig(**distilbert, **_labels(SENTIMENT_LABELS)),
            DistilBertTokenizer,
        ),
        "token-classification": (
            BertForTokenClassification,
            BertConfig(**bert, **_labels(NER_LABELS)),
            BertTokenizer,
        ),
        "feature-extraction": (BertModel, BertConfig(**bert), BertTokenizer),
    }
    written = {}
    for task, (model_class, config, tokenizer_class) in builds.items():
        torch.manual_seed(seed)
        model = model_class(config)
        target = root / task
        model.save_pretrained(target)
        tokenizer_class(vocab=vocab, model_max_length=512).save_pretrained(target)
        (target / "README.txt").write_text(_README, encoding="utf-8")
        written[task] = target
    (root / "README.txt").write_text(_README, encoding="utf-8")
    (root / "models.json").write_text(
        json.dumps({task: str(path) for task, path in written.items()}, indent=2) + "\n",
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
