"""Generation throughput: text-generation and summarization, in new tokens per second.

Every method generates exactly `NEW_TOKENS` greedy tokens per row (the models'
generation configs set `min_new_tokens` too, since text-generation's spec has no such
parameter), so tokens per second compare like with like:
  per-row: `generate` once per row,
  bare: length-sorted batches of 16, padded once up front, one `generate` per batch
        (the reference),
  beam-enrich: end to end on the local runner (read Parquet, generate, write Parquet).
Models are random-weight checkpoints with the real models' shapes: gpt2 (GPT2Config's
defaults) and bart-base. Their byte-level BPE tokenizers come from the same offline
trainer as the test models (`pipelines.test_models.byte_level_bpe`); it learns a few
thousand tokens from the standard library's docstrings, so the models' embedding and
output layers are padded to the real vocabulary sizes, and prompts run somewhat longer
in tokens than with the real vocabularies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["GEN_TASKS", "NEW_TOKENS", "build_gen_model", "measure_generation"]

NEW_TOKENS = 32
BATCH_SIZE = 16
GEN_TASKS = ("text-generation", "summarization")
MODELS = Path(__file__).parent / "models"
_GPT2_VOCAB = 50257
_BART_BASE_VOCAB = 50265
# The trainer stops when no pair is left to merge; asking for the real size takes all.
_BPE_SIZE = 50257


def build_gen_model(task: str) -> Path:
    """A random-weight gpt2 or bart-base shaped model, cached under benchmarks/models/."""
    target = MODELS / {"text-generation": "gpt2", "summarization": "bart-base"}[task]
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import GenerationConfig

    from pipelines.test_models import byte_level_bpe

    torch.manual_seed(0)
    if task == "text-generation":
        from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

        vocab, merges = byte_level_bpe(_BPE_SIZE, special_tokens=("<|endoftext|>",))
        eos = vocab["<|endoftext|>"]
        ids = {"bos_token_id": eos, "eos_token_id": eos}
        model = GPT2LMHeadModel(GPT2Config(vocab_size=_GPT2_VOCAB, **ids))
        model.generation_config = GenerationConfig(
            **ids, do_sample=False, min_new_tokens=NEW_TOKENS
        )
        tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    else:
        from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

        special = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
        vocab, merges = byte_level_bpe(_BPE_SIZE, special_tokens=special)
        ids = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}
        config = BartConfig(  # facebook/bart-base's shape
            vocab_size=_BART_BASE_VOCAB,
            d_model=768,
            encoder_layers=6,
            decoder_layers=6,
            encoder_attention_heads=12,
            decoder_attention_heads=12,
            encoder_ffn_dim=3072,
            decoder_ffn_dim=3072,
            max_position_embeddings=1024,
            **ids,
        )
        model = BartForConditionalGeneration(config)
        # No forced end token: it would take the last of the 32 tokens min_new_tokens asks for.
        model.generation_config = GenerationConfig(
            **ids, num_beams=1, do_sample=False, min_new_tokens=NEW_TOKENS
        )
        tokenizer = BartTokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _load(task: str, path: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from transforms.models import load_kwargs, place_model, resolve_model

    kind = AutoModelForCausalLM if task == "text-generation" else AutoModelForSeq2SeqLM
    model = kind.from_pretrained(path, **load_kwargs(resolve_model(str(path)), "fp32"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task == "text-generation":
        tokenizer.padding_side = "left"  # decoder-only: every prompt ends at the same place
        tokenizer.pad_token = tokenizer.eos_token
    return place_model(model, "cpu", "fp32"), tokenizer


def _generate_kwargs(tokenizer) -> dict:
    return {
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "num_beams": 1,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _new_tokens(task: str, output, width: int) -> int:
    # Decoder-only outputs repeat the prompt; encoder-decoder outputs start with the
    # decoder's start token.
    return output.shape[1] - (width if task == "text-generation" else 1)


def per_row(task: str, model, tokenizer, texts: list[str]) -> tuple[float, int]:
    """`generate` once per row; returns (seconds, new tokens per row)."""
    encoded = [tokenizer(t, truncation=True, return_tensors="pt") for t in texts]
    return _timed_generate(task, model, tokenizer, encoded)


def bare(task: str, model, tokenizer, texts: list[str]) -> tuple[float, int]:
    """Length-sorted, pre-padded batches of 16, one `generate` each: the reference."""
    encoded = tokenizer(texts, truncation=True)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    padded = [
        tokenizer.pad(
            {"input_ids": [encoded[i] for i in order[s : s + BATCH_SIZE]]}, return_tensors="pt"
        )
        for s in range(0, len(order), BATCH_SIZE)
    ]
    return _timed_generate(task, model, tokenizer, padded)


def _timed_generate(task: str, model, tokenizer, batches: list) -> tuple[float, int]:
    """One `generate` per prepared batch, timed; returns (seconds, new tokens per row)."""
    import torch

    kwargs = _generate_kwargs(tokenizer)
    counts = set()
    started = time.perf_counter()
    with torch.inference_mode():
        for inputs in batches:
            output = model.generate(**inputs, **kwargs)
            counts.add(_new_tokens(task, output, inputs["input_ids"].shape[1]))
    seconds = time.perf_counter() - started
    return seconds, _one_count(counts)


def _one_count(counts: set[int]) -> int:
    if counts != {NEW_TOKENS}:
        raise RuntimeError(f"generated {sorted(counts)} new tokens per row, not {NEW_TOKENS}")
    return NEW_TOKENS


def beam_enrich(
    task: str, path: Path, texts: list[str], workdir: Path, run_name: str = ""
) -> float:
    """beam-enrich end to end; returns seconds."""
    from pipelines.enrich import run

    source = workdir / f"gen-{task}{run_name}.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source)
    if task == "text-generation":
        params = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "num_beams": 1}
    else:
        # max_length and min_length count the decoder's start token.
        params = {"max_length": NEW_TOKENS + 1, "min_length": NEW_TOKENS + 1, "num_beams": 1}
    spec = workdir / f"gen-{task}.yaml"
    spec.write_text(
        json.dumps({"tasks": [{"name": "t", "task": task, "model": str(path), "params": params}]})
    )
    output = workdir / f"gen-out-{task}{run_name}"
    started = time.perf_counter()
    run(["--input", str(source), "--output", str(output), "--spec", str(spec)])
    seconds = time.perf_counter() - started
    written = pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("part-*.parquet")))
    failed = sum(1 for errors in written.column("enrich_errors").to_pylist() if errors)
    if failed:
        raise RuntimeError(f"beam-enrich {task}: {failed} rows failed; see {output}")
    return seconds


def measure_generation(
    task: str, texts: list[str], workdir: Path, *, skip_slow: bool = False
) -> dict:
    """New tokens per second of each method on `texts`, and ratios to the bare loop.

    Returns:
        {"new_tokens_per_s": {method: rate}, "ratio_to_bare": {method: ratio},
        "beam_enrich_x_per_row": ratio or None}.
    """
    path = build_gen_model(task)
    model, tokenizer = _load(task, path)
    if task == "text-generation":
        # beam-enrich refuses prompts that leave no room for the new tokens; so does this.
        room = tokenizer.model_max_length - NEW_TOKENS
        texts = [t for t in texts if len(tokenizer(t)["input_ids"]) <= room]
    bare(task, model, tokenizer, texts[:2])  # warm-up: first-call allocations
    tokens = len(texts) * NEW_TOKENS
    seconds = {"bare": bare(task, model, tokenizer, texts)[0]}
    # Untimed, as the bare loop's warm-up: the first run in a process pays imports.
    beam_enrich(task, path, texts[:2], workdir, run_name="-warm-up")
    seconds["beam-enrich"] = beam_enrich(task, path, texts, workdir)
    if not skip_slow:
        seconds["per-row"] = per_row(task, model, tokenizer, texts)[0]
    rates = {method: tokens / s for method, s in seconds.items()}
    result = {
        "new_tokens_per_s": rates,
        "ratio_to_bare": {method: rate / rates["bare"] for method, rate in rates.items()},
        "beam_enrich_x_per_row": (
            rates["beam-enrich"] / rates["per-row"] if "per-row" in rates else None
        ),
    }
    print(f"\n{task} ({len(texts)} rows, {NEW_TOKENS} new tokens each):")
    for method, rate in rates.items():
        print(f"  {method:22s} {rate:8.1f} new tokens/s   {rate / rates['bare']:5.2f}x bare")
    if result["beam_enrich_x_per_row"] is not None:
        print(f"  beam-enrich vs per-row {result['beam_enrich_x_per_row']:5.2f}x   (target >= 4x)")
    return result
