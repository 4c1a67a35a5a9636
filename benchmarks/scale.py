"""Scale, side by side in one run: what the launcher reads, spreading, writes, memory.

    python -m benchmarks.scale [--launcher-mb 10,1000] [--rows 4000] [--workers 1,2]
        [--memory-rows 2000,8000] [--spread-items 2000] [--only PARTS] [--json FILE]

  (a) launcher: bytes read (`/proc/self/io` rchar) and seconds from `prepare_job` to a
      built pipeline (the moment it would be submitted), for Parquet inputs of each
      size in `--launcher-mb`; flat means the launcher reads metadata only;
  (b) one Parquet file of `--rows` rows (the tiny text-classification test model) on
      1 vs 2 local worker processes (`--direct_running_mode=multi_processing`), with
      work items small enough that the file spreads over both;
  (c) bytes the run writes (`/proc/self/io` wchar, one in-process run) over the size of
      its final output folder;
  (d) peak RSS at each of `--memory-rows` (benchmarks/memory.py, fresh processes);
  (e) what reshuffling work items costs on the local runner: reading (no model) a file
      cut into `--spread-items` work items, with and without the reshuffle.

Each measurement runs in its own process where it reads process counters. Results go to
stdout and, with `--json`, to a file; record them in README with the CPU flags. `--only`
runs some parts (`launcher,workers,writes,spread,memory`); `--json` then keeps the other
parts' results already in the file, so a long benchmark can run as two quiet runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import report
from benchmarks.corpus import sentence_pairs
from benchmarks.memory import _tiny_model, measure_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["main"]


def _io(field: str) -> int:
    with open("/proc/self/io", encoding="ascii") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name == field:
                return int(value)
    raise RuntimeError(f"no {field} in /proc/self/io")


def _write_spec(folder: Path) -> Path:
    spec = folder / "job.yaml"
    task = {"name": "t", "task": "text-classification", "model": str(_tiny_model())}
    spec.write_text(json.dumps({"tasks": [task]}))
    return spec


def _random_text_parquet(path: Path, megabytes: int) -> None:
    """About `megabytes` MB of incompressible text rows, uncompressed, 1M rows a group."""
    row_bytes, group_rows = 100, 1 << 20
    rows = max(1, megabytes * (1 << 20) // row_bytes)
    rng = np.random.default_rng(0)
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, rows, group_rows):
            count = min(group_rows, rows - start)
            data = rng.integers(97, 123, size=count * row_bytes, dtype=np.uint8)
            offsets = np.arange(0, (count + 1) * row_bytes, row_bytes, dtype=np.int32)
            text = pa.Array.from_buffers(
                pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
            )
            writer.write_table(pa.table([text], schema=schema), row_group_size=count)


def _probe_launcher(spec: str, workdir: str, *inputs: str) -> None:
    """In a fresh process: rchar and seconds of prepare_job + build per input."""
    import apache_beam as beam

    from pipelines.enrich import build
    from pipelines.job import prepare_job
    from pipelines.spec import load_spec

    job_spec = load_spec(spec)
    # Warm-up on the first input: imports and the model's content hash happen once.
    build(beam.Pipeline(), prepare_job(job_spec, [inputs[0]], f"{workdir}/warm"))
    found = {}
    for path in inputs:
        before, started = _io("rchar"), time.perf_counter()
        build(beam.Pipeline(), prepare_job(job_spec, [path], f"{workdir}/out"))
        found[path] = {
            "input_bytes": os.path.getsize(path),
            "bytes_read": _io("rchar") - before,
            "seconds": time.perf_counter() - started,
        }
    print(json.dumps(found))


def _probe_writes(source: str, output: str, spec: str) -> None:
    """In a fresh process: wchar of one in-process run, and its output folder's size."""
    from pipelines.enrich import run

    before = _io("wchar")
    run(["--input", source, "--output", output, "--spec", spec, "--quiet"])
    written = _io("wchar") - before
    size = sum(p.stat().st_size for p in Path(output).iterdir())
    print(json.dumps({"bytes_written": written, "output_bytes": size}))


def _probe_spread(source: str, workdir: str, spread: str) -> None:
    """In a fresh process: seconds to read (no model) every work item of `source`."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from transforms.io import list_inputs, read_schema
    from transforms.work_items import ReadTables, write_listing

    listing = f"{workdir}/listing.jsonl"
    write_listing(listing, list_inputs([source]))
    started = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        read = pipeline | ReadTables(
            listing,
            read_schema(source),
            f"{workdir}/staged",
            work_item_bytes=1,  # one row group per item
            spread=spread == "1",
        )
        _ = (
            read["chunks"]
            | beam.Map(lambda chunk: chunk.table.num_rows)
            | beam.combiners.Count.Globally()
        )
    print(json.dumps({"seconds": time.perf_counter() - started}))


def _child(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rows_parquet(path: Path, rows: int, row_group_size: int) -> None:
    table = pa.table({"id": list(range(rows)), "text": sentence_pairs(rows)})
    pq.write_table(table, path, row_group_size=row_group_size)


def _cpu() -> dict:
    found = {}
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags") and key.strip() not in found:
                found[key.strip()] = value.strip()
    return {**found, "cpus": os.cpu_count()}


_PARTS = ("launcher", "workers", "writes", "spread", "memory")


def main(argv: list[str] | None = None) -> dict:
    """Runs the measurements; returns them (and prints each as it comes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launcher-mb", default="10,1000", help="input sizes for (a), MB")
    parser.add_argument("--rows", type=int, default=4000, help="rows for (b) and (c)")
    parser.add_argument("--workers", default="1,2", help="local worker processes for (b)")
    parser.add_argument("--memory-rows", default="2000,8000", help="row counts for (d)")
    parser.add_argument("--spread-items", type=int, default=2000, help="work items for (e)")
    report.add_parts_options(parser, _PARTS)
    args = parser.parse_args(argv)
    parts = report.chosen_parts(parser, args, _PARTS)
    results: dict = {"cpu": _cpu()}
    with tempfile.TemporaryDirectory(prefix="beam-enrich-scale-") as scratch:
        work = Path(scratch)
        spec = _write_spec(work)
        if "launcher" in parts:
            results["launcher"] = _launcher(args, work, spec)
        source = work / "rows.parquet"
        if parts & {"workers", "writes"}:
            _rows_parquet(source, args.rows, row_group_size=max(1, args.rows // 16))
        if "workers" in parts:
            results["workers"] = _workers(args, work, spec, source)
        if "writes" in parts:
            results["writes"] = _writes(work, spec, source)
        if "spread" in parts:
            results["spread"] = _spread(args, work)
        if "memory" in parts:
            memory = measure_memory([int(n) for n in args.memory_rows.split(",")], work)
            results["memory"] = memory
            print(f"(d) peak RSS, largest over smallest: {memory['ratio']:.2f}")
    if args.json:
        path = Path(args.json)
        kept = json.loads(path.read_text()) if path.exists() else {}
        # Parts measured in an earlier run stay, with the CPU they ran on.
        if kept.get("cpu") not in (None, results["cpu"]):
            kept = {}
        path.write_text(json.dumps({**kept, **results}, indent=2, default=str) + "\n")
    return results


def _launcher(args, work: Path, spec: Path) -> list[dict]:
    sizes = [int(mb) for mb in args.launcher_mb.split(",")]
    inputs = []
    for mb in sizes:
        inputs.append(work / f"launcher-{mb}mb.parquet")
        _random_text_parquet(inputs[-1], mb)
    found = list(_child("--probe-launcher", str(spec), str(work), *map(str, inputs)).values())
    for entry in found:
        print(
            f"(a) launcher: {entry['input_bytes'] / 1e6:9.1f} MB input, "
            f"{entry['bytes_read'] / 1e6:7.2f} MB read "
            f"({100 * entry['bytes_read'] / entry['input_bytes']:.3f} %), "
            f"{entry['seconds']:.2f} s to a built pipeline"
        )
    for path in inputs:
        path.unlink()
    return found


def _workers(args, work: Path, spec: Path, source: Path) -> dict:
    timings = {}
    for count in [int(n) for n in args.workers.split(",")]:
        output = work / f"workers-{count}"
        started = time.perf_counter()
        command = [
            sys.executable,
            "-m",
            "pipelines.enrich",
            "--input",
            str(source),
            "--output",
            str(output),
            "--spec",
            str(spec),
            "--quiet",
            "--work-item-mb",
            "0.000001",  # one row group (1/16 of the file) per work item
            "--direct_running_mode=multi_processing",
            f"--direct_num_workers={count}",
        ]
        subprocess.run(command, check=True, env=os.environ.copy())
        timings[count] = time.perf_counter() - started
        print(f"(b) {args.rows} rows on {count} worker process(es): {timings[count]:.1f} s")
    counts = sorted(timings)
    found = {
        "rows": args.rows,
        "seconds": timings,
        "speedup": timings[counts[0]] / timings[counts[-1]],
    }
    print(f"(b) speed-up {counts[-1]} vs {counts[0]}: {found['speedup']:.2f}x")
    return found


def _writes(work: Path, spec: Path, source: Path) -> dict:
    writes = _child("--probe-writes", str(source), str(work / "writes"), str(spec))
    writes["ratio"] = writes["bytes_written"] / writes["output_bytes"]
    print(
        f"(c) written {writes['bytes_written'] / 1e6:.2f} MB for an output of "
        f"{writes['output_bytes'] / 1e6:.2f} MB: {writes['ratio']:.2f}x"
    )
    return writes


def _spread(args, work: Path) -> dict:
    spread_source = work / "spread.parquet"
    _rows_parquet(spread_source, args.spread_items * 50, row_group_size=50)
    spread = {
        flag: _child("--probe-spread", str(spread_source), str(work / f"s{flag}"), flag)
        for flag in ("0", "1")
    }
    print(
        f"(e) reading {args.spread_items} work items: {spread['0']['seconds']:.2f} s "
        f"without the reshuffle, {spread['1']['seconds']:.2f} s with it"
    )
    return {
        "items": args.spread_items,
        "without_s": spread["0"]["seconds"],
        "with_s": spread["1"]["seconds"],
    }


if __name__ == "__main__":
    probes = {
        "--probe-launcher": _probe_launcher,
        "--probe-writes": _probe_writes,
        "--probe-spread": _probe_spread,
    }
    if len(sys.argv) > 1 and sys.argv[1] in probes:
        probes[sys.argv[1]](*sys.argv[2:])
    else:
        main()
