"""Whole processes, side by side: `beam-enrich` against a bare loop, launch to exit.

    python -m benchmarks.whole_process [--rows 2000] [--task sentiment] [--dtype fp32]
        [--repeat 1] [--json FILE]

Each side is a fresh Python process, timed from launch to exit, so start-up, imports,
model load, reading, tokenizing, writing and the interpreter's exit all count:

  bare:        imports torch and transformers, loads the model as beam-enrich places it
               (`benchmarks.throughput.load_placed`), reads the Parquet input, tokenizes,
               runs length-sorted batches of 32 and writes one label per row to Parquet:
               the least a script doing the same job does;
  beam-enrich: `python -m pipelines.cli` on the same input and model, local runner.

Input: `--rows` paragraphs of Python's reference prose, topped up with distinct pairs of
their sentences (`benchmarks.corpus`, as benchmarks/throughput.py), the model a
random-weight checkpoint of the real shape (distilbert-base for `sentiment`, built
offline by `benchmarks.throughput.build_model`). Reported: seconds and rows/s of each,
and beam-enrich's rows/s over the bare loop's (goal >= 0.95 for fp32), with the machine
(CPU flags) they ran on; `--json` writes them (default
benchmarks/results/whole_process.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _bare_child(task: str, model: str, source: str, output: str, dtype: str) -> None:
    import torch
    from transformers import AutoTokenizer

    from benchmarks.throughput import encode, load_placed

    tokenizer = AutoTokenizer.from_pretrained(model)
    placed = load_placed(task, Path(model), dtype)
    texts = pq.read_table(source, columns=["text"]).column("text").to_pylist()
    encoded = encode(task, tokenizer, texts)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    labels: list = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), 32):  # length-sorted batches of 32
            batch = order[start : start + 32]
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            found = placed(**inputs).logits.argmax(-1).tolist()
            for index, label in zip(batch, found, strict=True):
                labels[index] = placed.config.id2label[label]
    pq.write_table(pa.table({"label": labels}), output)


def _timed(command: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--task", default="sentiment", choices=["sentiment"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side (median)")
    parser.add_argument("--json", default=str(RESULTS / "whole_process.json"))
    parser.add_argument("--child-bare", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_bare:
        _bare_child(*args.child_bare)
        return {}

    from benchmarks import report
    from benchmarks.corpus import paragraphs, sentence_pairs
    from benchmarks.throughput import SPEC_TASK, build_model

    machine = report.machine()
    print(f"{report.cpu_label(machine)}; {machine['cores']} cores")
    model = build_model(args.task)
    # Distinct, as in benchmarks/throughput.py: no repeated input for dedup to skip.
    texts = paragraphs(args.rows)
    texts += sentence_pairs(args.rows - len(texts))
    times: dict[str, list[float]] = {"bare": [], "beam-enrich": []}
    with tempfile.TemporaryDirectory(prefix="beam-enrich-whole-") as scratch:
        work = Path(scratch)
        source = work / "input.parquet"
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source)
        name, _, params = SPEC_TASK[args.task]
        spec = work / "job.yaml"
        task = {"name": "t", "task": name, "model": str(model), "dtype": args.dtype}
        spec.write_text(json.dumps({"tasks": [{**task, "params": params}]}))
        for run in range(args.repeat):
            bare_out = str(work / f"bare-{run}.parquet")
            child = [str(args.task), str(model), str(source), bare_out, args.dtype]
            command = [sys.executable, "-m", "benchmarks.whole_process", "--child-bare", *child]
            times["bare"].append(_timed(command))
            output = work / f"out-{run}"
            ours_cmd = [sys.executable, "-m", "pipelines.cli", "--input", str(source)]
            ours_cmd += ["--output", str(output), "--spec", str(spec), "--quiet"]
            times["beam-enrich"].append(_timed(ours_cmd))
            labels = pq.read_table(bare_out).column("label").to_pylist()
            parts = sorted(output.glob("part-*.parquet"))
            ours = pa.concat_tables(map(pq.read_table, parts)).sort_by("id")
            ours = ours.column("t_label").to_pylist()
            agree = sum(a == b for a, b in zip(labels, ours, strict=True)) / len(labels)
    seconds = {side: statistics.median(found) for side, found in times.items()}
    result = {
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "child_bare"},
        "seconds": seconds,
        "runs": times,
        "rows_per_s": {side: args.rows / s for side, s in seconds.items()},
        "ratio": seconds["bare"] / seconds["beam-enrich"],
        "label_agreement": agree,
    }
    for side, s in seconds.items():
        print(f"{side:12s} {s:7.1f} s  {args.rows / s:7.1f} rows/s")
    ratio = result["ratio"]
    print(f"beam-enrich / bare loop, whole processes: {ratio:.2f}x (labels agree {agree:.3f})")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
