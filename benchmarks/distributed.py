"""Distributed engines side by side in one run: Dask with 1 vs 2 workers, Beam's portable
runner with 1 vs 2 SDK workers, and the same job on FnApiRunner (in process).

    python -m benchmarks.distributed [--rows 2000] [--files 3] [--only PARTS] [--json FILE]

The model has distilbert-base-uncased-finetuned-sst-2-english's shape (random weights,
benchmarks/throughput.py); inputs are `--rows` rows of natural sentences, as (a) one
Parquet file of 16 row groups and (b) `--files` files of 4 row groups each; every row
group is one work item. Parts (`--only`, comma-separated; default all):

- `dask`: a `dask scheduler` and N `dask worker` processes with one thread each (and
  one torch thread: N workers share the cores), on loopback, N = 1 then 2; then the
  in-process run (FnApiRunner) of the one file.
- `portable`: the portable runner with a job service (`pipelines.job_service`) and an
  external worker pool, with `--sdk_worker_parallelism` 1 then 2, on both inputs.

Every process here, the launcher of the in-process run included, runs one torch thread
(`OMP_NUM_THREADS=1`). Each engine first runs a 16-row job, so Dask workers have
imported torch and transformers before the timed run (a long-lived cluster has); the
timed run still loads the model once per worker process. The portable job service
starts new SDK workers for every job: its timed runs include their start.
Rows/s is rows over the wall time of the whole run, from the driver. Results go to stdout
and, with `--json`, to a file, which keeps the other parts' results (each part records
the CPU it ran on); record them in README with the CPU flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import report
from benchmarks.corpus import sentence_pairs
from benchmarks.scale import _cpu
from benchmarks.throughput import build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["main"]

BIN = Path(sys.executable).parent


def _dask(command: str, *args: str) -> list[str]:
    return [str(BIN / "dask"), command, *args, "--host", "127.0.0.1", "--no-dashboard"]


_JOB_SERVICE = "pipelines.job_service"
_WORKER_POOL = "apache_beam.runners.worker.worker_pool_main"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _start(command: list[str], pattern: str, log: Path) -> tuple[subprocess.Popen, re.Match]:
    """Starts a service; returns it and the first line of its output matching `pattern`."""
    handle = log.open("w")
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in process.stdout:
        handle.write(line)
        found = re.search(pattern, line)
        if found:
            # Keep draining into the log, so the service never blocks on a full pipe.
            threading.Thread(target=handle.writelines, args=(process.stdout,), daemon=True).start()
            return process, found
    raise RuntimeError(f"{command[:4]} exited before printing {pattern!r}; see {log}")


@contextlib.contextmanager
def _dask_cluster(workers: int, logs: Path) -> Iterator[str]:
    processes = []
    try:
        scheduler, found = _start(
            _dask("scheduler", "--port", "0"),
            r"Scheduler at:\s+(tcp://\S+)",
            logs / "scheduler.log",
        )
        processes.append(scheduler)
        address = found[1]
        for i in range(workers):
            worker, _ = _start(
                _dask("worker", address, "--nthreads", "1", "--no-nanny"),
                r"Registered to",
                logs / f"worker-{i}.log",
            )
            processes.append(worker)
        yield address
    finally:
        for process in processes:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _portable(logs: Path) -> Iterator[list[str]]:
    processes = []
    try:
        service, found = _start(
            [sys.executable, "-m", _JOB_SERVICE, "--port", "0"],
            r"Listening for beam jobs on port (\d+)",
            logs / "job-service.log",
        )
        processes.append(service)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        pool, _ = _start(
            [sys.executable, "-m", _WORKER_POOL, "--service_port", str(port)],
            r"Started worker pool servicer",
            logs / "worker-pool.log",
        )
        processes.append(pool)
        yield [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{found[1]}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{port}",
        ]
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _inputs(work: Path, rows: int, files: int) -> dict[str, list[Path]]:
    texts = sentence_pairs(rows)
    table = pa.table({"id": list(range(rows)), "text": texts})
    one = work / "one" / "rows.parquet"
    one.parent.mkdir()
    pq.write_table(table, one, row_group_size=max(1, rows // 16))
    several = []
    (work / "several").mkdir()
    per_file = -(-rows // files)
    for i in range(files):
        several.append(work / "several" / f"rows-{i}.parquet")
        part = table.slice(i * per_file, per_file)
        pq.write_table(part, several[-1], row_group_size=max(1, part.num_rows // 4))
    warm = work / "warm.parquet"
    pq.write_table(table.slice(0, 16), warm)
    return {"one file": [one], f"{files} files": several, "warm": [warm]}


def _run(inputs: list[Path], output: Path, spec: Path, runner: list[str]) -> float:
    """Seconds of one run, from the driver, in a fresh driver process."""
    command = [sys.executable, "-m", "pipelines.enrich", "--spec", str(spec), "--quiet"]
    command += [f"--input={path}" for path in inputs]
    command += ["--output", str(output), "--work-item-mb", "0.000001", *runner]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_env())
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{runner} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


_PARTS = ("dask", "portable")


def main(argv: list[str] | None = None) -> dict:
    """Runs the measurements; returns them (and prints each as it comes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows per input set")
    parser.add_argument("--files", type=int, default=3, help="files of the several-files set")
    report.add_parts_options(parser, _PARTS)
    args = parser.parse_args(argv)
    parts = report.chosen_parts(parser, args, _PARTS)
    spec_task = {
        "name": "sentiment",
        "task": "sentiment-analysis",
        "model": str(build_model("sentiment")),
    }
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="beam-enrich-distributed-") as scratch:
        work = Path(scratch)
        spec = work / "job.yaml"
        spec.write_text(json.dumps({"tasks": [spec_task]}))
        sets = _inputs(work, args.rows, args.files)
        inputs = [name for name in sets if name != "warm"]
        runs = 0

        def measure(engine: str, runner: list[str], names: list[str]) -> list[dict]:
            nonlocal runs
            runs += 1
            _run(sets["warm"], work / f"warm-{runs}", spec, runner)
            entries = []
            for name in names:
                runs += 1
                seconds = _run(sets[name], work / f"out-{runs}", spec, runner)
                entry = {"engine": engine, "input": name, "seconds": seconds}
                entry["rows_per_s"] = args.rows / seconds
                entries.append(entry)
                speed = f"{seconds:7.1f} s | {entry['rows_per_s']:6.1f} rows/s"
                print(f"{engine:>20} | {name:>8} | {speed}")
            return entries

        if "dask" in parts:
            results.update(cpu=_cpu(), rows=args.rows, runs=[])
            for workers in (1, 2):
                logs = work / f"dask-{workers}"
                logs.mkdir()
                with _dask_cluster(workers, logs) as address:
                    runner = ["--runner=dask", f"--dask_client_address={address}"]
                    results["runs"] += measure(f"Dask, {workers} worker(s)", runner, inputs)
            results["runs"] += measure("FnApiRunner", [], inputs[:1])
            results["dask_speedup_2_vs_1"] = _speedups(results["runs"], "Dask", inputs)
        if "portable" in parts:
            portable = results["portable"] = {"cpu": _cpu(), "rows": args.rows, "runs": []}
            logs = work / "portable"
            logs.mkdir()
            with _portable(logs) as runner:
                for workers in (1, 2):
                    engine = f"portable, {workers} SDK worker(s)"
                    option = f"--sdk_worker_parallelism={workers}"
                    portable["runs"] += measure(engine, [*runner, option], inputs)
            portable["speedup_2_vs_1"] = _speedups(portable["runs"], "portable", inputs)
    if args.json:
        path = Path(args.json)
        kept = json.loads(path.read_text()) if path.exists() else {}
        if "dask" in parts:  # the top-level entries are the Dask part's
            kept = {key: value for key, value in kept.items() if key == "portable"}
        path.write_text(json.dumps({**kept, **results}, indent=2) + "\n")
    return results


def _speedups(runs: list[dict], engine: str, inputs: list[str]) -> dict[str, float]:
    """Input -> rows/s with 2 workers over rows/s with 1, for the engine's runs."""

    def rate(workers: int, name: str) -> float:
        return next(
            r["rows_per_s"]
            for r in runs
            if r["engine"].startswith(f"{engine}, {workers} ") and r["input"] == name
        )

    found = {name: rate(2, name) / rate(1, name) for name in inputs}
    for name, speedup in found.items():
        print(f"{engine} 2 vs 1 worker(s), {name}: {speedup:.2f}x")
    return found


if __name__ == "__main__":
    main()
