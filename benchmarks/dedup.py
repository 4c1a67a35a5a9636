"""Repeated inputs computed once: a corpus with duplicates against one without, end to end.

    python -m benchmarks.dedup [--rows 2000] [--rounds 2]

Two inputs of the same size and length spread, sentiment with the distilbert-base-shaped
model of benchmarks/throughput.py, beam-enrich end to end on the local runner (read
Parquet, enrich, write Parquet, manifest):
  distinct:   `--rows` distinct rows (two sentences of Python's reference prose each);
  duplicated: a random half of them, each twice, shuffled: 50 % of the rows repeat one.
Each runs with dedup on (the default for a deterministic task) and off (the adapter
made to report itself non-deterministic, as a sampling task does), alternating, for
`--rounds` rounds; the best of each is kept (the least disturbed run). Printed and
written to benchmarks/results/dedup.json with the CPU's model name and flags:
  duplicated, on / off   goal >= 1.8x
  distinct, on / off     goal >= 0.97x (no slower, within noise)
The duplicated runs' outputs with and without dedup are compared row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.corpus import sentence_pairs

RESULTS = Path(__file__).parent / "results" / "dedup.json"
GOALS = {"duplicated": 1.8, "distinct": 0.97}


def cpu() -> dict:
    """The CPU's model name and flags, as /proc/cpuinfo gives them."""
    found = {}
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags") and key.strip() not in found:
                found[key.strip()] = value.strip()
    return {**found, "cpus": os.cpu_count()}


def corpora(rows: int) -> dict[str, list[str]]:
    """The two inputs: `rows` distinct texts, and a random half of them each twice."""
    distinct = sentence_pairs(rows)
    picker = random.Random(0)
    half = picker.sample(distinct, rows // 2)
    duplicated = half * 2 + half[: rows % 2]
    picker.shuffle(duplicated)
    return {"distinct": distinct, "duplicated": duplicated}


def run_once(model: Path, texts: list[str], workdir: Path, name: str) -> dict:
    """beam-enrich end to end over `texts`: seconds, rows served from the cache, outputs."""
    from pipelines.enrich import run

    source = workdir / f"{name}.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source)
    spec = workdir / "job.yaml"
    task = {"name": "t", "task": "sentiment-analysis", "model": str(model)}
    spec.write_text(json.dumps({"tasks": [task]}))
    output = workdir / f"out-{name}"
    started = time.perf_counter()
    run(["--input", str(source), "--output", str(output), "--spec", str(spec)])
    seconds = time.perf_counter() - started
    manifest = json.loads((output / "manifest.json").read_text())
    table = pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("part-*.parquet")))
    table = table.sort_by("id")
    return {
        "seconds": seconds,
        "cached": manifest["tasks"][0]["cached"],
        "labels": table.column("t_label").to_pylist(),
        "scores": table.column("t_score").to_pylist(),
    }


def _set_dedup(on: bool) -> None:
    # Off: the adapter says what a sampling task says, so every row runs. The local
    # runner runs in this process, so the class attribute reaches its workers.
    from transforms.tasks.text_classification import TextClassification

    TextClassification.deterministic = property(lambda self: on)


def main(argv: list[str] | None = None) -> dict:
    """Runs the measurements, prints them and writes benchmarks/results/dedup.json."""
    from benchmarks.report import machine, save_results
    from benchmarks.throughput import build_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows per input (default 2000)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each kind (default 2)")
    parser.add_argument("--output", default=str(RESULTS), help="where to write the results")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model = build_model("sentiment")
    inputs = corpora(args.rows)
    seconds: dict[str, list[float]] = {}
    cached: dict[str, int] = {}
    outputs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # Untimed: the first run in a process imports Beam's runner and the task's code.
        run_once(model, inputs["distinct"][:32], workdir, "warm-up")
        for round_ in range(args.rounds):
            for corpus in ("distinct", "duplicated"):
                for dedup in (True, False):
                    key = f"{corpus}/{'on' if dedup else 'off'}"
                    _set_dedup(dedup)
                    done = run_once(
                        model, inputs[corpus], workdir, f"{key}-{round_}".replace("/", "-")
                    )
                    seconds.setdefault(key, []).append(done["seconds"])
                    cached[key] = done["cached"]
                    outputs[key] = done
                    print(
                        f"round {round_ + 1} {key:15s} {args.rows / done['seconds']:7.1f} rows/s"
                        f"  ({done['cached']} rows from the cache)",
                        flush=True,
                    )
    _set_dedup(True)
    best = {key: min(values) for key, values in seconds.items()}
    rows_per_s = {key: round(args.rows / s, 2) for key, s in best.items()}
    ratios = {
        corpus: round(rows_per_s[f"{corpus}/on"] / rows_per_s[f"{corpus}/off"], 3)
        for corpus in ("distinct", "duplicated")
    }
    on, off = outputs["duplicated/on"], outputs["duplicated/off"]
    same_labels = sum(a == b for a, b in zip(on["labels"], off["labels"], strict=True))
    score_gap = max(abs(a - b) for a, b in zip(on["scores"], off["scores"], strict=True))
    results = {
        "machine": machine(),
        "cpu": cpu(),
        "settings": vars(args),
        "model": "random-weight distilbert-base-uncased-finetuned-sst-2-english shape",
        "rows": args.rows,
        "seconds": seconds,
        "rows_per_s_best": rows_per_s,
        "cached_rows": cached,
        "on_x_off": ratios,
        "goals": GOALS,
        "duplicated_outputs": {
            "labels_equal": same_labels / args.rows,
            "max_score_difference": score_gap,
        },
    }
    print(
        f"\nduplicated: dedup on / off {ratios['duplicated']:.2f}x (goal >= 1.8x); "
        f"distinct: {ratios['distinct']:.2f}x (goal >= 0.97x)\n"
        f"duplicated outputs, on vs off: labels equal {same_labels}/{args.rows}, "
        f"largest score difference {score_gap:.2e}"
    )
    save_results(Path(args.output), results)
    return results


if __name__ == "__main__":
    main()
