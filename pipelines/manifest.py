"""The run manifest, `manifest.json`: typed records of what a complete output holds and
exactly how it was made, and the run's context known before it starts."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import platform
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from pydantic import BaseModel, ConfigDict, Field

from pipelines.quality_gate import evaluate_gate
from transforms.chunks import TaskCounts
from transforms.staging import PartInfo

__all__ = [
    "ERRORS_FILE",
    "MANIFEST",
    "Batching",
    "InputRecord",
    "Manifest",
    "OutputColumn",
    "OutputFile",
    "OutputRecord",
    "RowCounts",
    "RunContext",
    "TaskDescription",
    "TaskRecord",
    "build_manifest",
    "manifest_schema",
    "now",
    "read_manifest",
    "redact",
    "redact_argv",
    "spec_fingerprint",
    "staging_root",
    "versions",
]

MANIFEST = "manifest.json"
ERRORS_FILE = "errors.jsonl"
_STAGING_SUFFIX = ".beam-enrich"
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


class _Record(BaseModel):
    """A frozen record of the manifest: unknown keys are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Batching(_Record):
    """A task's micro-batch settings."""

    #: None: the default for the device the worker used, from `max_batch_tokens_default`.
    max_batch_tokens: int | None
    max_batch_tokens_default: dict[str, int]
    rows_per_chunk: int


class TaskDescription(_Record):
    """One task of a run as resolved before it starts: model, revision, parameters, …"""

    name: str
    task: str
    model: str
    model_source: str
    requested_revision: str | None
    resolved_revision: str
    #: The GGUF file loaded from the `model` folder (its sha256 is `resolved_revision`).
    gguf_file: str | None = None
    trust_remote_code: bool
    allow_pickle_weights: bool
    inference_timeout_s: float | None
    input_columns: list[str]
    on_long_input: str | None
    parameters: dict[str, Any]
    device: str
    dtype: str
    batching: Batching
    columns: list[str]


class TaskRecord(TaskDescription):
    """One task in the manifest: its description and what it did over the whole run."""

    devices_used: list[str]
    rows: int
    succeeded: int
    failed: int
    truncated: int
    #: Rows whose result was copied from an equal input's (the same chunk's, or one the
    #: worker computed earlier) instead of computed; part of `succeeded`.
    cached: int = 0
    inference_seconds: float
    #: Summed over workers: rows per second of one worker's inference time.
    rows_per_second: float | None
    #: The task's output summary (`transforms.summaries`); None when the report failed.
    summary: dict[str, Any] | None = None
    #: How many times worker processes loaded the task's model (once per process on
    #: every runner), from the job's Beam metrics (`N_model_loads`), added by the driver
    #: when the job has ended. None: the runner reports no metrics, or none of
    #: beam-enrich's (nothing was read: `--resume` reused every work item).
    model_loads: int | None = None


class InputRecord(_Record):
    """One input file: its listing, content hash and work items."""

    path: str
    size: int
    sha256: str
    #: Every work item of the file came from an interrupted run (`--resume`).
    reused: bool
    work_items: int
    reused_work_items: int


class OutputFile(_Record):
    path: str
    rows: int


class OutputColumn(_Record):
    name: str
    type: str


class OutputRecord(_Record):
    path: str
    format: str
    csv_neutralize_formulas: bool
    files: list[OutputFile]
    errors_file: str
    columns: list[OutputColumn]
    #: `report.html`, or None when it could not be made (the run publishes anyway).
    report: str | None = None


class RowCounts(_Record):
    model_config = ConfigDict(populate_by_name=True)

    #: `in` is a Python keyword: the JSON key is `in`.
    rows_in: int = Field(alias="in")
    limit: int | None
    out: int
    failed: dict[str, int]


class Manifest(_Record):
    """`manifest.json`: what a complete output holds and exactly how it was made."""

    run_id: str
    started_at: str
    finished_at: str
    argv: list[str]
    runner: str
    options: dict[str, Any]
    fingerprint: str
    inputs: list[InputRecord]
    output: OutputRecord
    rows: RowCounts
    tasks: list[TaskRecord]
    #: Evaluated again by the driver once the output is published (exit code 3).
    quality_gate: dict[str, Any]
    spec: dict[str, Any]
    versions: dict[str, str | None]
    #: task -> error type -> failed rows; None when the report failed.
    failed_by_type: dict[str, dict[str, int]] | None = None

    def to_json(self) -> dict:
        """The manifest as JSON data, with the keys `manifest.json` has."""
        return self.model_dump(mode="json", by_alias=True)

    def with_model_loads(self, loads: Mapping[str, int]) -> Manifest:
        """This manifest with each task's `model_loads`: 0 for a task absent from `loads`.

        Args:
            loads: task name -> model loads, from the job's metrics
                (`pipelines.runners.model_loads`).
        """
        tasks = [
            task.model_copy(update={"model_loads": loads.get(task.name, 0)}) for task in self.tasks
        ]
        return self.model_copy(update={"tasks": tasks})


def read_manifest(output: str) -> Manifest | None:
    """The manifest of the complete output in `output`; None when it has none (yet)."""
    path = FileSystems.join(output.rstrip("/"), MANIFEST)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return Manifest.model_validate_json(handle.read())


def manifest_schema() -> dict:
    """The JSON Schema of `manifest.json` (pydantic's, draft 2020-12)."""
    schema = Manifest.model_json_schema(by_alias=True)
    schema.pop("title", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "beam-enrich run manifest",
        **schema,
    }


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the manifest needs that is known before the run starts.

    Attributes:
        run_id: unique per run; names the staging folder.
        started_at: ISO 8601 UTC.
        argv: the command line, secrets redacted.
        runner: the Beam runner's name.
        options: Beam pipeline options that were set, secrets redacted.
        inputs: (path, size) per input file, as listed (workers hash them: the manifest's
            `InputRecord`s are made from what they report).
        output: the output directory.
        output_format: `parquet` or `csv`.
        output_schema: the schema of every part file.
        spec: the job spec as JSON data.
        tasks: per task, its description (model, revision, parameters, …).
        fingerprint: `spec_fingerprint` of this job: staged results carry it.
        resume: reuse the work items an interrupted run of this job staged (`--resume`).
        csv_neutralize_formulas: string cells that start like a formula were prefixed
            with `'` in the CSV output (`--csv-neutralize-formulas`).
        limit: the run covers only the first `limit` input rows (`--limit`); None: all.
        rows_total: the rows this run enriches, for progress, from Parquet footers; None
            when unknown (CSV inputs, too many files to read every footer, `--resume`).
        quality_gate: each task's failed-row limits and the command line's
            (`pipelines.quality_gate.gate_limits`); empty: no limits.
    """

    run_id: str
    started_at: str
    argv: list[str]
    runner: str
    options: dict
    inputs: list[tuple[str, int]]
    output: str
    output_format: str
    output_schema: pa.Schema
    spec: dict
    tasks: list[TaskDescription]
    fingerprint: str = ""
    resume: bool = False
    csv_neutralize_formulas: bool = False
    limit: int | None = None
    rows_total: int | None = None
    quality_gate: dict = dataclasses.field(default_factory=dict)

    @property
    def staging_root(self) -> str:
        """`.<name>.beam-enrich` beside the output: hidden, and never mistaken for it."""
        return staging_root(self.output)

    @property
    def files_dir(self) -> str:
        """Where work items' parts are staged, per fingerprint (resumable)."""
        return FileSystems.join(self.staging_root, "files", self.fingerprint or "none")

    @property
    def listing_path(self) -> str:
        """The input listing this run's pipeline starts from."""
        return FileSystems.join(self.staging_root, "runs", f"{self.run_id}.inputs.jsonl")

    @property
    def staging_dir(self) -> str:
        """Where this run assembles its complete output before it takes the output's name."""
        return FileSystems.join(self.staging_root, "runs", self.run_id)


def spec_fingerprint(
    spec: dict,
    tasks: Sequence[TaskDescription],
    output_format: str,
    output_schema: pa.Schema,
    output_options: dict | None = None,
    *,
    limit: int | None = None,
) -> str:
    """sha256 of everything that can change an output row's values, as canonical JSON.

    Conservatively the whole spec (batching settings included: padding changes float
    noise), each model's resolved commit or content hash, the output format and schema,
    command-line options that change cells (`output_options`), the row limit
    (`--limit`: a resumed run never mixes limited and full results), and the versions of
    the libraries that compute the values.
    """
    payload = {
        "output_options": output_options or {},
        "spec": spec,
        "models": [[t.name, t.model, t.resolved_revision] for t in tasks],
        "output_format": output_format,
        "output_schema": output_schema.to_string(show_schema_metadata=False),
        "versions": versions(),
    }
    if limit is not None:  # absent when unlimited: full runs keep their fingerprints
        payload["limit"] = limit
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def staging_root(output: str) -> str:
    """`.<name>.beam-enrich` beside the output: hidden, and never mistaken for it."""
    head, tail = FileSystems.split(output)
    return FileSystems.join(head, f".{tail}{_STAGING_SUFFIX}")


def build_manifest(
    parts: list[PartInfo], inputs: list[InputRecord], final: list[str], context: RunContext
) -> Manifest:
    failed: Counter = Counter()
    totals: dict[str, TaskCounts] = {}
    devices: dict[str, set] = {}
    for part in parts:
        failed.update(part.failed)
        for task, counts in part.stats.items():
            totals[task] = totals.get(task, TaskCounts()) + counts
        for task, used in part.devices.items():
            devices.setdefault(task, set()).update(used)

    rows_per_part = [part.rows for part in parts] or [0]
    tasks = []
    for task in context.tasks:
        counts = totals.get(task.name, TaskCounts())
        tasks.append(
            TaskRecord(
                **task.model_dump(),
                devices_used=sorted(devices.get(task.name, ())),
                rows=counts.rows,
                succeeded=counts.rows - counts.failed,
                failed=counts.failed,
                truncated=counts.truncated,
                cached=counts.cached,
                inference_seconds=round(counts.seconds, 3),
                rows_per_second=(
                    round(counts.rows / counts.seconds, 2) if counts.seconds > 0 else None
                ),
            )
        )
    return Manifest(
        run_id=context.run_id,
        started_at=context.started_at,
        finished_at=now(),
        argv=context.argv,
        runner=context.runner,
        options=context.options,
        fingerprint=context.fingerprint,
        inputs=inputs,
        output=OutputRecord(
            path=context.output,
            format=context.output_format,
            csv_neutralize_formulas=context.csv_neutralize_formulas,
            files=[
                OutputFile(path=path, rows=rows)
                for path, rows in zip(final, rows_per_part, strict=True)
            ],
            errors_file=FileSystems.join(context.output, ERRORS_FILE),
            columns=[
                OutputColumn(name=field.name, type=str(field.type))
                for field in context.output_schema
            ],
        ),
        rows=RowCounts(
            rows_in=sum(part.rows_read for part in parts),
            limit=context.limit,
            out=sum(part.rows for part in parts),
            failed={task.name: failed.get(task.name, 0) for task in context.tasks},
        ),
        tasks=tasks,
        quality_gate=evaluate_gate(context.quality_gate, tasks),
        spec=context.spec,
        versions=versions(),
    )
