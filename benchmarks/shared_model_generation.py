"""The model server's CPU time per row for text-generation: whole chunks against `generate` only.

    python -m benchmarks.shared_model_generation [--rows 1000] [--rounds 1] [--model tiny|gpt2]

With `share_model: machine` one process serves the model to every SDK process through
Beam's `MultiProcessShared`. This starts such a server for text-generation and sends it
the same prompts (two sentences of Python's reference prose each, a prompt template
around them, chunks of 256 rows, greedy) three ways:
  server runs chunks: the server tokenizes, generates and decodes (before the split);
  forward only:       this process tokenizes, collates left-padded ids and decodes (the
                      front); the server gets a chunk's micro-batches in one call and
                      answers with the generated ids;
  in process:         no server, the model in this process, for reference.
For each: rows/s, new tokens/s and CPU seconds per 1,000 rows of the server process and
of this one (see `benchmarks.shared_model`). Best of `--rounds`. Results, with the
CPU's flags, to benchmarks/results/shared_model_generation-<model>.json.

`--model tiny` (default): the tiny test model, whose decoding steps cost about what
tokenizing and decoding do, as a GPU's do; `--model gpt2`: a random-weight gpt2 shape
(benchmarks/generation.py), where on CPU the forward passes are nearly all of a row.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.shared_model import measure_ways, start_server

RESULTS = Path(__file__).parent / "results"
TINY = Path(__file__).parent / "models" / "tiny-text-generation"
CHUNK = 256
PROMPT = "Passage: {text}\nIn short:"


def _model_dir(kind: str) -> Path:
    if kind == "gpt2":
        from benchmarks.generation import build_gen_model

        return build_gen_model("text-generation")
    if not (TINY / "config.json").exists():
        from pipelines.test_models import BUILDERS

        BUILDERS["text-generation"](TINY, 0)
    return TINY


def _task(model: str, new_tokens: int):
    from transforms.inference import TaskBinding
    from transforms.models import resolve_model
    from transforms.tasks.text_generation import TextGeneration, TextGenerationParams

    params = TextGenerationParams(prompt=PROMPT, max_new_tokens=new_tokens)
    return TaskBinding(
        TextGeneration("gen", params), resolve_model(model), device="cpu", dtype="fp32"
    )


def main(argv: list[str] | None = None) -> dict:
    """Runs the measurements, prints them and writes the results file."""
    from benchmarks.corpus import sentence_pairs
    from benchmarks.dedup import cpu
    from benchmarks.report import machine, save_results
    from transforms.batching import max_batch_tokens_for
    from transforms.inference import load_task
    from transforms.model_server import with_local_front

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="rows per way (default 1000)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each way (default 1)")
    parser.add_argument("--model", choices=("tiny", "gpt2"), default="tiny")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="max_new_tokens (tiny 16, gpt2 32)"
    )
    parser.add_argument("--output", help="where to write the results")
    args = parser.parse_args(argv)
    new_tokens = args.new_tokens or (32 if args.model == "gpt2" else 16)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model = str(_model_dir(args.model))
    task = _task(model, new_tokens)
    rows = task.adapter.row_inputs({"text": sentence_pairs(args.rows)})
    chunks = [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]
    budget = max_batch_tokens_for(None, "cpu", task.adapter.batch_tokens_factor)

    server = start_server(task, "beam-enrich-bench-generation")
    server_pid = server.pid()
    front = with_local_front(task, server)
    assert front is not server, "the text-generation front did not load"
    local = load_task(task)
    ways = {
        "server runs chunks": lambda: server,
        "forward only": lambda: front,
        "in process": lambda: local,
    }
    measured, outputs = measure_ways(ways, chunks, budget, server_pid, args.rounds)
    same = outputs["forward only"] == outputs["server runs chunks"] == outputs["in process"]
    best = {way: min(runs, key=lambda e: e["seconds"]) for way, runs in measured.items()}
    before = best["server runs chunks"]["server_cpu_s_per_1000_rows"]
    after = best["forward only"]["server_cpu_s_per_1000_rows"]
    results = {
        "machine": machine(),
        "cpu": cpu(),
        "settings": {
            **vars(args),
            "new_tokens": new_tokens,
            "prompt": PROMPT,
            "chunk_rows": CHUNK,
            "max_batch_tokens": budget,
            "torch_threads_caller": __import__("torch").get_num_threads(),
        },
        "model": (
            "random-weight gpt2 shape (benchmarks/generation.py)"
            if args.model == "gpt2"
            else "tiny test model (pipelines/test_models.py text-generation)"
        ),
        "outputs_equal_across_ways": same,
        "runs": measured,
        "best": best,
        "server_cpu_after_x_before": round(after / before, 3),
        "forward_only_x_server_runs_chunks": round(
            best["forward only"]["rows_per_s"] / best["server runs chunks"]["rows_per_s"], 3
        ),
    }
    print(
        f"\noutputs equal: {same}; server CPU per row: forward only / whole chunks "
        f"{results['server_cpu_after_x_before']}; rows/s: forward only / whole chunks "
        f"{results['forward_only_x_server_runs_chunks']}"
    )
    default = RESULTS / f"shared_model_generation-{args.model}.json"
    save_results(Path(args.output or default), results)
    return results


if __name__ == "__main__":
    main()
