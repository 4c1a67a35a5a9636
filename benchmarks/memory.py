"""Peak memory of beam-enrich end to end, as the input grows.

    python -m benchmarks.throughput --memory [--memory-rows 10000,100000]

Each size runs in its own fresh process (`python -m benchmarks.memory INPUT OUTPUT SPEC`),
so one run's peak cannot hide another's; the process reports the peak resident set
size of itself and of its children (`getrusage`). A pipeline that streams its input
peaks at about the same size whatever the row count: the target is the largest run
within 20% of the smallest. The model is the tiny text-classification test model, so
the cost is the pipeline's own, not the model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.corpus import sentence_pairs

__all__ = ["MEMORY_TARGET", "measure_memory"]

#: The largest run's peak over the smallest run's, at most.
MEMORY_TARGET = 1.2
_MODEL = Path(__file__).parent / "models" / "tiny-text-classification"


def _tiny_model() -> Path:
    if not (_MODEL / "config.json").exists():
        from pipelines.test_models import BUILDERS

        BUILDERS["text-classification"](_MODEL, 0)
    return _MODEL


def measure_memory(row_counts: list[int], workdir: Path) -> dict:
    """Peak RSS of one beam-enrich run per row count, each in a fresh process.

    Args:
        row_counts: input sizes, e.g. [10_000, 100_000].
        workdir: scratch space for inputs and outputs.

    Returns:
        {"runs": {rows: {"peak_rss_mib", "self_mib", "children_mib", "before_run_mib",
        "seconds"}},
        "ratio": largest run's peak / smallest run's peak}.

    Raises:
        RuntimeError: a run failed; its output is in the message.
    """
    spec = workdir / "memory.yaml"
    spec.write_text(
        json.dumps(
            {"tasks": [{"name": "t", "task": "text-classification", "model": str(_tiny_model())}]}
        )
    )
    runs = {}
    for count in row_counts:
        source = workdir / f"memory-{count}.parquet"
        texts = sentence_pairs(count)
        pq.write_table(pa.table({"id": list(range(count)), "text": texts}), source)
        del texts
        output = workdir / f"memory-out-{count}"
        command = [sys.executable, "-m", "benchmarks.memory", str(source), str(output), str(spec)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            raise RuntimeError(
                f"memory run on {count} rows failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        report = json.loads(done.stdout.strip().splitlines()[-1])
        runs[count] = report
        print(
            f"  {count:>8d} rows  peak {report['peak_rss_mib']:8.1f} MiB "
            f"(self {report['self_mib']:.1f}, children {report['children_mib']:.1f}, "
            f"before the run {report['before_run_mib']:.1f})  "
            f"{report['seconds']:6.1f} s"
        )
    peaks = [runs[count]["peak_rss_mib"] for count in sorted(runs)]
    return {"runs": runs, "ratio": peaks[-1] / peaks[0]}


def _peak_rss_mib() -> float:
    """This process's peak resident set size, from /proc (Linux).

    Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries that high-water mark over from
    the parent across fork and exec, so a child of a large benchmark process would report
    the parent's peak.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _run_and_report(source: str, output: str, spec: str) -> None:
    import resource

    from pipelines.enrich import run

    # The peak before any row is read (libraries imported): what the run adds is above it.
    before_run = _peak_rss_mib()
    started = time.perf_counter()
    run(["--input", source, "--output", output, "--spec", spec])
    seconds = time.perf_counter() - started
    # ru_maxrss is in KiB on Linux. Children: the largest child's peak, which adds to
    # this process's own when a runner starts worker processes.
    own = _peak_rss_mib()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = {
        "peak_rss_mib": own + children,
        "self_mib": own,
        "children_mib": children,
        "before_run_mib": before_run,
        "seconds": seconds,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _run_and_report(*sys.argv[1:4])
