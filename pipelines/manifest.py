"""The run manifest, and the last step of a run: staged parts become the output.

`manifest.json` is written last, after every part file has its final name: its
presence marks a complete output, the way `_SUCCESS` does for Hadoop and Spark jobs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import platform
import re
from collections import Counter
from collections.abc import Sequence

import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from transforms.io import PartInfo, write_table

__all__ = ["ERRORS_FILE", "MANIFEST", "RunContext", "finalize_run", "redact", "versions"]

MANIFEST = "manifest.json"
ERRORS_FILE = "errors.jsonl"
_MIME = "application/octet-stream"
_SECRET = re.compile(r"token|secret|password|passwd|credential|api_?key|private_key", re.I)


def redact(options: dict) -> dict:
    """Option values whose names look like secrets replaced by `***`."""
    return {k: ("***" if _SECRET.search(k) and v is not None else v) for k, v in options.items()}


def redact_argv(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with the values of secret-looking flags replaced by `***`."""
    cleaned: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            cleaned.append("***")
            hide_next = False
        elif arg.startswith("-") and _SECRET.search(arg.split("=", 1)[0]):
            if "=" in arg:
                cleaned.append(arg.split("=", 1)[0] + "=***")
            else:
                cleaned.append(arg)
                hide_next = True
        else:
            cleaned.append(arg)
    return cleaned


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the output."""
    found = {"python": platform.python_version()}
    for name in (
        "beam-enrich",
        "apache-beam",
        "transformers",
        "torch",
        "tokenizers",
        "pyarrow",
        "huggingface_hub",
    ):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def now() -> str:
    """The current UTC time, ISO 8601."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the manifest needs that is known before the run starts.

    Attributes:
        run_id: unique per run; names the staging folder.
        started_at: ISO 8601 UTC.
        argv: the command line, secrets redacted.
        runner: the Beam runner's name.
        options: Beam pipeline options that were set, secrets redacted.
        inputs: per input file: path, size, sha256.
        output: the output directory.
        output_format: `parquet` or `csv`.
        output_schema: the schema of every part file.
        spec: the job spec as JSON data.
        tasks: per task, its description (model, revision, parameters, …).
    """

    run_id: str
    started_at: str
    argv: list[str]
    runner: str
    options: dict
    inputs: list[dict]
    output: str
    output_format: str
    output_schema: pa.Schema
    spec: dict
    tasks: list[dict]

    @property
    def staging_dir(self) -> str:
        return FileSystems.join(self.output, "_temporary", self.run_id)


def _existing_outputs(output: str) -> list[str]:
    patterns = [FileSystems.join(output, name) for name in (MANIFEST, ERRORS_FILE, "part-*")]
    found = []
    for result in FileSystems.match(patterns):
        found.extend(m.path for m in result.metadata_list)
    # The old manifest goes first: from then on the folder is no longer marked complete.
    return sorted(found, key=lambda path: not path.endswith(MANIFEST))


def _concatenate(sources: Sequence[str], destination: str) -> None:
    with FileSystems.create(destination, _MIME) as out:
        for source in sources:
            with FileSystems.open(source, _MIME) as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    out.write(block)


def finalize_run(parts: list[PartInfo], context: RunContext) -> dict:
    """Moves staged parts to `part-NNNNN-of-MMMMM.<fmt>`, writes errors.jsonl, then the manifest.

    Returns:
        The manifest, as written.
    """
    fmt = context.output_format
    parts = sorted(parts, key=lambda part: part.first)
    staged = [part.path for part in parts]
    if not staged:
        # No rows at all still gives a readable output with the full schema.
        empty = FileSystems.join(context.staging_dir, f"empty.{fmt}")
        write_table(empty, context.output_schema.empty_table(), fmt)
        staged = [empty]

    old = _existing_outputs(context.output)
    if old:
        FileSystems.delete(old)
    final = [
        FileSystems.join(context.output, f"part-{i:05d}-of-{len(staged):05d}.{fmt}")
        for i in range(len(staged))
    ]
    FileSystems.rename(staged, final)
    _concatenate(
        [part.errors_path for part in parts if part.errors_path],
        FileSystems.join(context.output, ERRORS_FILE),
    )

    manifest = _manifest(parts, final, context)
    # Written under a temporary name and renamed, so a reader never sees half of it.
    target = FileSystems.join(context.output, MANIFEST)
    temporary = FileSystems.join(context.staging_dir, MANIFEST)
    with FileSystems.create(temporary, _MIME) as handle:
        handle.write(json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
    FileSystems.rename([temporary], [target])
    FileSystems.delete([context.staging_dir])
    temporary_root = FileSystems.join(context.output, "_temporary")
    if not FileSystems.match([FileSystems.join(temporary_root, "*")])[0].metadata_list:
        FileSystems.delete([temporary_root])  # no other run is staging here
    return manifest


def _manifest(parts: list[PartInfo], final: list[str], context: RunContext) -> dict:
    failed: Counter = Counter()
    totals: dict[str, list] = {}
    devices: dict[str, set] = {}
    for part in parts:
        failed.update(part.failed)
        for task, (rows, task_failed, truncated, seconds) in part.stats.items():
            sums = totals.setdefault(task, [0, 0, 0, 0.0])
            for i, value in enumerate((rows, task_failed, truncated, seconds)):
                sums[i] += value
        for task, used in part.devices.items():
            devices.setdefault(task, set()).update(used)

    rows_per_part = [part.rows for part in parts] or [0]
    tasks = []
    for task in context.tasks:
        rows, task_failed, truncated, seconds = totals.get(task["name"], [0, 0, 0, 0.0])
        tasks.append(
            {
                **task,
                "devices_used": sorted(devices.get(task["name"], ())),
                "rows": rows,
                "succeeded": rows - task_failed,
                "failed": task_failed,
                "truncated": truncated,
                "inference_seconds": round(seconds, 3),
                # Summed over workers: rows per second of one worker's inference time.
                "rows_per_second": round(rows / seconds, 2) if seconds > 0 else None,
            }
        )
    rows_out = sum(part.rows for part in parts)
    return {
        "run_id": context.run_id,
        "started_at": context.started_at,
        "finished_at": now(),
        "argv": context.argv,
        "runner": context.runner,
        "options": context.options,
        "inputs": context.inputs,
        "output": {
            "path": context.output,
            "format": context.output_format,
            "files": [
                {"path": path, "rows": rows}
                for path, rows in zip(final, rows_per_part, strict=True)
            ],
            "errors_file": FileSystems.join(context.output, ERRORS_FILE),
            "columns": [
                {"name": field.name, "type": str(field.type)} for field in context.output_schema
            ],
        },
        "rows": {
            "in": sum(part.rows_read for part in parts),
            "out": rows_out,
            "failed": {task["name"]: failed.get(task["name"], 0) for task in context.tasks},
        },
        "tasks": tasks,
        "spec": context.spec,
        "versions": versions(),
    }
