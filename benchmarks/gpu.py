"""GPU throughput of beam-enrich's hot path, against a bare loop and transformers' pipeline.

    python benchmarks/gpu.py [--device cuda] [--dtypes fp16,bf16] [--rows 20000]
        [--gen-rows 256] [--new-tokens 64] [--batch-size 64] [--out gpu.json] [--tiny]

Runs without apache_beam and without network: it imports only the Beam-free hot path
(`transforms.inference`: `load_task`, `apply_task`, as each worker runs it per chunk) and
the task adapters, so it runs on a GPU machine that has torch, transformers, pyarrow,
sentence-transformers and pydantic (carry pydantic's wheels where it is missing:
pydantic, pydantic-core, annotated-types, typing-inspection). Models are random-weight
checkpoints with the real shapes, built here from configs (distilbert-base for
sentiment, all-MiniLM-L6-v2 for embeddings, gpt2 and SmolLM2-135M for generation), with
the bert-base-uncased vocabulary shipped in benchmarks/data (padded with unused tokens
to a decoder's vocabulary size, so its output layer has the real width). Text: the prose
paragraphs of `benchmarks.corpus`, topped up with distinct pairs of its sentences.

For each task and dtype, on the same rows and model:
  hot_path:  beam-enrich's per-chunk path (`apply_task` over 512-row Arrow chunks:
             tokenize, plan token-budget micro-batches, forward, post-process, columns),
  bare:      pre-tokenized, length-sorted batches of `--batch-size`, forward only
             (generation: `generate`, greedy), one synchronize at the end,
  pipeline:  transformers' `pipeline(list, batch_size=--batch-size)`.
Encoders report rows/s, generation new tokens/s (no end-of-sequence token, so every row
generates `--new-tokens`); each with the GPU's busy share (NVML utilization sampled
every 20 ms while it ran, through torch.cuda.utilization). One JSON is printed, and
written to `--out` if given. `--tiny` shrinks models and sizes to check the script on a
CPU in seconds (`--device cpu --tiny`).

On the device machine (see the README's Benchmarks section):
    python3 benchmarks/gpu.py --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from any folder

VOCAB = Path(__file__).parent / "data" / "bert-base-uncased-vocab.txt"
TASKS = ("sentiment", "embeddings", "gpt2", "smollm2")
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _vocab(size: int | None = None) -> dict[str, int]:
    tokens = VOCAB.read_text(encoding="utf-8").splitlines()
    if size is not None:  # a decoder's wider vocabulary: never produced by the tokenizer
        tokens += [f"[unused-{i}]" for i in range(size - len(tokens))]
    return {token: i for i, token in enumerate(tokens)}


def _config(task: str, tiny: bool):
    from transformers import BertConfig, DistilBertConfig, GPT2Config, LlamaConfig

    small = {"layers": 2, "hidden": 32, "heads": 2, "ffn": 64}
    if task == "sentiment":  # distilbert-base-uncased-finetuned-sst-2-english
        labels = {0: "NEGATIVE", 1: "POSITIVE"}
        if tiny:
            return DistilBertConfig(n_layers=2, dim=32, n_heads=2, hidden_dim=64, id2label=labels)
        return DistilBertConfig(id2label=labels)
    if task == "embeddings":  # all-MiniLM-L6-v2
        if tiny:
            return BertConfig(
                num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64
            )
        return BertConfig(
            num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536
        )
    if task == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2) if tiny else GPT2Config()
    else:  # SmolLM2-135M
        shape = {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
        }
        if tiny:
            shape = {
                "hidden_size": small["hidden"],
                "intermediate_size": small["ffn"],
                "num_hidden_layers": small["layers"],
                "num_attention_heads": small["heads"],
                "num_key_value_heads": 1,
            }
        config = LlamaConfig(
            vocab_size=49152,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            **shape,
        )
    # No end-of-sequence token: every row generates the same number of new tokens.
    config.eos_token_id = None
    config.bos_token_id = None
    return config


def build_model(task: str, folder: Path, tiny: bool) -> Path:
    """A random-weight checkpoint with the task's real shape, saved under `folder`."""
    import torch
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BertTokenizer,
        DistilBertTokenizer,
    )

    torch.manual_seed(0)
    config = _config(task, tiny)
    target = folder / task
    if task == "sentiment":
        model = AutoModelForSequenceClassification.from_config(config)
        tokenizer = DistilBertTokenizer(vocab=_vocab(), model_max_length=512)
    elif task == "embeddings":
        model = AutoModel.from_config(config)
        tokenizer = BertTokenizer(vocab=_vocab(), model_max_length=256)
    else:
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
        tokenizer = BertTokenizer(
            vocab=_vocab(config.vocab_size), model_max_length=1024, padding_side="left"
        )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


class GpuBusy:
    """The GPU's mean NVML utilization (%) while the block runs; None off CUDA."""

    def __init__(self, device: str):
        self.device = device
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        import torch

        if not self.device.startswith("cuda"):
            return self
        try:
            torch.cuda.utilization(self.device)
        except Exception:  # no NVML bindings: leave the share unknown
            return self

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.samples.append(float(torch.cuda.utilization(self.device)))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def percent(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(device: str, call) -> dict:
    """Runs `call()` once (the caller warmed up), timed and with the GPU watched;
    returns {"seconds", "gpu_busy_percent", "value": what `call` returned}."""
    _sync(device)
    with GpuBusy(device) as busy:
        started = time.perf_counter()
        value = call()
        _sync(device)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "gpu_busy_percent": busy.percent, "value": value}


def _hot_path(task: str, path: Path, texts: list[str], device: str, dtype: str, args) -> dict:
    import pyarrow as pa

    from transforms.inference import TaskBinding, apply_task, load_task
    from transforms.models import resolve_model
    from transforms.tasks.feature_extraction import FeatureExtraction
    from transforms.tasks.text_classification import TextClassification
    from transforms.tasks.text_generation import TextGeneration, TextGenerationParams

    if task == "sentiment":
        adapter = TextClassification("t")
    elif task == "embeddings":
        adapter = FeatureExtraction("t")
    else:
        adapter = TextGeneration(
            "t", TextGenerationParams(max_new_tokens=args.new_tokens, return_full_text=False)
        )
    binding = TaskBinding(adapter, resolve_model(str(path)), device=device, dtype=dtype)
    loaded = load_task(binding)
    chunks = [
        pa.table({"text": texts[i : i + args.chunk_rows]})
        for i in range(0, len(texts), args.chunk_rows)
    ]
    # Warm-up on other texts: the hot path computes repeated inputs once, and the timed
    # rows must all be computed.
    apply_task(binding, loaded, pa.table({"text": [f"warm-up: {t}" for t in texts[:8]]}))

    def run() -> list:
        return [apply_task(binding, loaded, chunk) for chunk in chunks]

    timed = _timed(device, run)
    done = timed.pop("value")
    tables = [table for table, _ in done]
    timed["failed_rows"] = sum(stats.failed for _, stats in done)
    if task == "sentiment":
        timed["labels"] = [label for t in tables for label in t.column("t_label").to_pylist()]
    return timed


def _bare(task: str, path: Path, texts: list[str], device: str, dtype: str, args) -> dict:
    import torch
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    kind = {"sentiment": AutoModelForSequenceClassification, "embeddings": AutoModel}.get(
        task, AutoModelForCausalLM
    )
    model = kind.from_pretrained(path, dtype=getattr(torch, _DTYPES[dtype])).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = tokenizer(texts, truncation=True)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    padded = [
        tokenizer.pad({"input_ids": [encoded[i] for i in b]}, return_tensors="pt") for b in batches
    ]
    padded = [
        {k: v.pin_memory() if device.startswith("cuda") else v for k, v in p.items()}
        for p in padded
    ]

    def forward(inputs):
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        if task in ("sentiment", "embeddings"):
            return model(**inputs)[0]
        return model.generate(
            **inputs,
            max_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )

    with torch.inference_mode():
        forward(padded[-1])  # warm-up: kernel choice, allocator

        def run() -> list:
            return [forward(inputs) for inputs in padded]

        timed = _timed(device, run)
    outputs = timed.pop("value")
    if task == "sentiment":
        labels = [None] * len(texts)
        for indices, logits in zip(batches, outputs, strict=True):
            for row, best in zip(indices, logits.float().argmax(-1).tolist(), strict=True):
                labels[row] = model.config.id2label[best]
        timed["labels"] = labels
    if task not in ("sentiment", "embeddings"):
        timed["new_tokens"] = sum(
            (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
            for inputs, out in zip(padded, outputs, strict=True)
        )
    return timed


def _pipeline(task: str, path: Path, texts: list[str], device: str, dtype: str, args) -> dict:
    import torch
    from transformers import pipeline

    name = {"sentiment": "text-classification", "embeddings": "feature-extraction"}.get(
        task, "text-generation"
    )
    pipe = pipeline(name, model=str(path), device=device, dtype=getattr(torch, _DTYPES[dtype]))
    kwargs = {
        "sentiment": {"truncation": True},
        # Tensors, not nested lists of every token's vector (minutes of Python at 20k rows).
        "embeddings": {"tokenize_kwargs": {"truncation": True}, "return_tensors": True},
    }.get(
        task,
        {"max_new_tokens": args.new_tokens, "do_sample": False, "return_full_text": False},
    )
    pipe(texts[:2], batch_size=args.batch_size, **kwargs)  # warm-up
    timed = _timed(device, lambda: pipe(texts, batch_size=args.batch_size, **kwargs))
    timed.pop("value")
    return timed


def measure(task: str, path: Path, texts: list[str], device: str, dtype: str, args) -> dict:
    """The three methods on one task and dtype; rates and ratios to the bare loop."""
    generation = task not in ("sentiment", "embeddings")
    runs = {
        "hot_path": _hot_path(task, path, texts, device, dtype, args),
        "bare": _bare(task, path, texts, device, dtype, args),
        "pipeline": _pipeline(task, path, texts, device, dtype, args),
    }
    work = len(texts) * args.new_tokens if generation else len(texts)
    unit = "new_tokens_per_s" if generation else "rows_per_s"
    result: dict = {}
    for method, run in runs.items():
        result[method] = {
            unit: work / run["seconds"],
            "seconds": run["seconds"],
            "gpu_busy_percent": run["gpu_busy_percent"],
        }
    if generation:
        # The bare loop's own count, as a check that no row stopped early.
        result["bare"]["new_tokens_counted"] = runs["bare"]["new_tokens"]
    bare_rate = result["bare"][unit]
    for method in ("hot_path", "pipeline"):
        result[method]["x_bare"] = result[method][unit] / bare_rate
    if task == "sentiment":
        pairs = zip(runs["hot_path"]["labels"], runs["bare"]["labels"], strict=True)
        result["hot_path"]["labels_equal_to_bare"] = statistics.fmean(a == b for a, b in pairs)
    result["hot_path"]["failed_rows"] = runs["hot_path"].get("failed_rows", 0)
    return result


def _machine(device: str) -> dict:
    import torch
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "apache_beam_importable": _importable("apache_beam"),
        "cpu_cores": os.cpu_count(),
    }
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(device)
        found.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30))
    return found


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--rows", type=int, default=20000, help="rows per encoder task")
    parser.add_argument("--gen-rows", type=int, default=256, help="prompts per generation task")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="bare loop and pipeline")
    parser.add_argument("--chunk-rows", type=int, default=512, help="rows per Arrow chunk")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU check)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rows, args.gen_rows, args.new_tokens = min(args.rows, 48), min(args.gen_rows, 6), 3
        args.batch_size, args.chunk_rows = min(args.batch_size, 16), min(args.chunk_rows, 32)
    tasks = [t for t in args.tasks.split(",") if t]
    dtypes = [d for d in args.dtypes.split(",") if d]

    from transformers.utils import logging as hf_logging

    from benchmarks.corpus import paragraphs, sentence_pairs

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    texts = paragraphs(args.rows)
    if len(texts) < args.rows:  # the prose has about 1,000 paragraphs; pairs of its
        # sentences make more distinct rows (the hot path computes repeats only once)
        texts += sentence_pairs(args.rows - len(texts))
    # Prompts of at most 48 words, so prompt and new tokens fit gpt2's 1,024 positions.
    prompts = [" ".join(text.split()[:48]) for text in paragraphs(args.gen_rows)]
    started = time.perf_counter()
    results: dict = {"machine": _machine(args.device), "settings": vars(args), "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            path = build_model(task, Path(tmp), args.tiny)
            rows = texts if task in ("sentiment", "embeddings") else prompts
            results["tasks"][task] = {
                dtype: measure(task, path, rows, args.device, dtype, args) for dtype in dtypes
            }
            print(f"{task}: done at {time.perf_counter() - started:.0f}s", file=sys.stderr)
    results["seconds"] = time.perf_counter() - started
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
