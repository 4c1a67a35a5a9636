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
    "NLI_LABELS",
    "SENTIMENT_LABELS",
    "TOXICITY_LABELS",
    "builder",
    "byte_level_bpe",
    "make_test_models",
    "save",
    "wordpiece_vocab",
]

SENTIMENT_LABELS = ("NEGATIVE", "POSITIVE")
NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
# facebook/bart-large-mnli's order: the entailment id is found by name, not position.
NLI_LABELS = ("contradiction", "neutral", "entailment")
TOXICITY_LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
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


@builder("question-answering")
def _question_answering(target: Path, seed: int) -> None:
    import torch
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizer

    vocab = wordpiece_vocab()
    torch.manual_seed(seed)
    # BERT, so question/context pairs carry token_type_ids the adapter must pass on.
    model = BertForQuestionAnswering(BertConfig(vocab_size=len(vocab), **BERT))
    save(model, BertTokenizer(vocab=vocab, model_max_length=512), target)


@builder("multi-label-classification")
def _multi_label_classification(target: Path, seed: int) -> None:
    import torch
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertTokenizer,
    )

    vocab = wordpiece_vocab()
    torch.manual_seed(seed)
    # Like a toxicity classifier: independent labels, sigmoid scores by default.
    config = DistilBertConfig(
        vocab_size=len(vocab),
        problem_type="multi_label_classification",
        **DISTILBERT,
        **_labels(TOXICITY_LABELS),
    )
    model = DistilBertForSequenceClassification(config)
    save(model, DistilBertTokenizer(vocab=vocab, model_max_length=512), target)


@builder("zero-shot-classification")
def _zero_shot_classification(target: Path, seed: int) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = wordpiece_vocab()
    torch.manual_seed(seed)
    # A BERT NLI model: pairs carry token_type_ids, which the adapter must pass on.
    model = BertForSequenceClassification(
        BertConfig(vocab_size=len(vocab), **BERT, **_labels(NLI_LABELS))
    )
    save(model, BertTokenizer(vocab=vocab, model_max_length=512), target)


@builder("fill-mask")
def _fill_mask(target: Path, seed: int) -> None:
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertTokenizer

    vocab = wordpiece_vocab()
    torch.manual_seed(seed)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(vocab), **DISTILBERT))
    save(model, DistilBertTokenizer(vocab=vocab, model_max_length=512), target)


@builder("text-generation")
def _text_generation(target: Path, seed: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    vocab, merges = byte_level_bpe(special_tokens=("<|endoftext|>",))
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(seed)
    # A short context (256 positions) lets tests reach the too-long-prompt rule cheaply.
    config = GPT2Config(
        vocab_size=len(vocab),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        initializer_range=0.5,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=256)
    save(GPT2LMHeadModel(config), tokenizer, target)


# Sequence-to-sequence models (summarization, translation). Their generation configs set
# a short max_length (24, not the library's 20, which transformers 4.x pipelines treated
# as "unset") so tests stay fast.
SEQ2SEQ = {
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 512,
    "init_std": 0.5,
}
_SEQ2SEQ_MAX_LENGTH = 24


@functools.cache
def _unigram_model(size: int = 1000) -> bytes:
    # A serialized SentencePiece unigram model trained on the corpus: Marian reads the
    # .spm file itself; T5 and mBART take its (piece, score) list.
    import io

    import sentencepiece

    lines = [line.strip() for doc in _corpus() for line in doc.splitlines() if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=size,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
    )
    return model.getvalue()


def _unigram_pieces() -> list[tuple[str, float]]:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=_unigram_model())
    return [
        (processor.id_to_piece(i), processor.get_score(i))
        for i in range(processor.get_piece_size())
        if not (processor.is_control(i) or processor.is_unknown(i))
    ]


def _generation_config(**ids):
    from transformers import GenerationConfig

    return GenerationConfig(max_length=_SEQ2SEQ_MAX_LENGTH, **ids)


@builder("summarization")
def _summarization(target: Path, seed: int) -> None:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

    vocab, merges = byte_level_bpe(special_tokens=("<s>", "<pad>", "</s>", "<unk>", "<mask>"))
    torch.manual_seed(seed)
    ids = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}
    model = BartForConditionalGeneration(
        BartConfig(vocab_size=len(vocab), forced_eos_token_id=2, **ids, **SEQ2SEQ)
    )
    model.generation_config = _generation_config(forced_eos_token_id=2, **ids)
    save(model, BartTokenizer(vocab=vocab, merges=merges, model_max_length=512), target)


@builder("translation")
def _translation(target: Path, seed: int) -> None:
    import tempfile

    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    # Marian's layout: </s> 0, <unk> 1, the pieces, <pad> last (also the decoder start).
    pieces = [piece for piece, _ in _unigram_pieces()]
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    pad = vocab["<pad>"] = len(vocab)
    with tempfile.TemporaryDirectory() as scratch:
        spm_file = Path(scratch) / "source.spm"
        spm_file.write_bytes(_unigram_model())
        vocab_file = Path(scratch) / "vocab.json"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        tokenizer = MarianTokenizer(
            source_spm=str(spm_file),
            target_spm=str(spm_file),
            vocab=str(vocab_file),
            source_lang="en",
            target_lang="de",
            model_max_length=512,
        )
        torch.manual_seed(seed)
        ids = {"pad_token_id": pad, "eos_token_id": 0, "decoder_start_token_id": pad}
        model = MarianMTModel(
            MarianConfig(vocab_size=len(vocab), forced_eos_token_id=0, **ids, **SEQ2SEQ)
        )
        model.generation_config = _generation_config(forced_eos_token_id=0, **ids)
        save(model, tokenizer, target)


@builder("t5")
def _t5(target: Path, seed: int) -> None:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *_unigram_pieces()]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    torch.manual_seed(seed)
    ids = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    config = T5Config(
        vocab_size=len(vocab),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        initializer_factor=4.0,
        # As the public T5 checkpoints do: the task's prefix lives in the config.
        task_specific_params={
            "summarization": {"prefix": "summarize: "},
            "translation_en_to_de": {"prefix": "translate English to German: "},
        },
        **ids,
    )
    model = T5ForConditionalGeneration(config)
    model.generation_config = _generation_config(**ids)
    save(model, tokenizer, target)


@builder("translation-multilingual")
def _translation_multilingual(target: Path, seed: int) -> None:
    import torch
    from transformers import MBartConfig, MBartForConditionalGeneration, MBartTokenizer
    from transformers.models.mbart.tokenization_mbart import FAIRSEQ_LANGUAGE_CODES

    # mBART-50 style: the decoder starts with </s>, then the target language's code is
    # forced as the first generated token (forced_bos_token_id, set per request).
    special = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    codes = [(code, 0.0) for code in FAIRSEQ_LANGUAGE_CODES]
    vocab = [*special, *_unigram_pieces(), *codes, ("<mask>", 0.0)]
    tokenizer = MBartTokenizer(vocab=vocab, src_lang="en_XX", model_max_length=512)
    torch.manual_seed(seed)
    ids = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}
    model = MBartForConditionalGeneration(
        MBartConfig(vocab_size=len(vocab), forced_eos_token_id=2, **ids, **SEQ2SEQ)
    )
    model.generation_config = _generation_config(forced_eos_token_id=2, **ids)
    save(model, tokenizer, target)


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
