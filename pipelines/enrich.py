"""`beam-enrich` / `python -m pipelines.enrich`: enrich Parquet or CSV files with models.

    beam-enrich --input 'data/*.parquet' --output out/run1 --spec job.yaml \\
                [--output-format parquet|csv] [any Beam option: --runner, --project, …]
    beam-enrich validate --spec job.yaml --input FILES
    beam-enrich spec-schema [--output FILE]
    beam-enrich download --spec job.yaml --cache DIR
    beam-enrich make-test-models DIR

Everything that can be checked before data is read is checked in `prepare_job`: the
spec, the inputs and their columns, the models and their revisions. A problem there
exits with code 2 and a one-paragraph message, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.manifest import (
    MANIFEST,
    RunContext,
    check_output,
    finalize_run,
    lock_output,
    now,
    output_state,
    prepare_output,
    published_run_id,
    redact,
    redact_argv,
    spec_fingerprint,
)
from pipelines.progress import show_progress
from pipelines.quality_gate import QualityGateError, check_gate, gate_limits
from pipelines.spec import JobSpec, SpecError, load_spec
from transforms.chunks import ERRORS_COLUMN, ERRORS_TYPE
from transforms.enrich import DEFAULT_MAX_BATCH_TOKENS, EnrichTables, TaskBinding
from transforms.io import (
    FORMATS,
    InputError,
    check_output_schema,
    expand_inputs,
    iter_tables,
    list_inputs,
    neutralize_chunk_formulas,
    parquet_metadata,
    read_schema,
    table_format,
)
from transforms.models import ModelError, ResolvedModel, resolve_model, worker_file_patterns
from transforms.staging import WriteParts
from transforms.summaries import Summarizer
from transforms.tasks import TaskAdapter
from transforms.work_items import DEFAULT_WORK_ITEM_BYTES, ReadTables, write_listing

__all__ = ["Job", "bind_tasks", "build", "job_spec_schema", "main", "prepare_job", "run"]

_LOG = logging.getLogger("beam_enrich")


@dataclasses.dataclass(frozen=True)
class Job:
    """A job checked and resolved on the driver, ready to become a pipeline.

    Attributes:
        spec: the validated job spec.
        files: every input file, sorted.
        bindings: one per task: adapter, pinned model, column, placement.
        context: what the manifest records (inputs, tasks, options, …).
        row_limits: file index -> rows to read from it (`--limit`); files not named are
            read whole.
        input_schema: the schema every input file has.
        checked: indices of the files whose schema the launcher read; workers check the
            others' as they plan them.
        work_item_bytes: target compressed size of a Parquet work item.
    """

    spec: JobSpec
    files: list[str]
    bindings: list[TaskBinding]
    context: RunContext
    row_limits: dict[int, int] = dataclasses.field(default_factory=dict)
    input_schema: pa.Schema | None = None
    checked: tuple[int, ...] = ()
    work_item_bytes: int = DEFAULT_WORK_ITEM_BYTES


def prepare_job(
    spec: JobSpec,
    inputs: Sequence[str],
    output: str,
    *,
    output_format: str | None = None,
    argv: Sequence[str] = (),
    options: PipelineOptions | None = None,
    resume: bool = False,
    csv_neutralize_formulas: bool = False,
    limit: int | None = None,
    max_failed_rows: int | None = None,
    max_failed_fraction: float | None = None,
    work_item_bytes: int = DEFAULT_WORK_ITEM_BYTES,
) -> Job:
    """Checks a job against its inputs and pins its models, before any row is read.

    The launcher reads metadata only, and a bounded amount of it: the listing (names
    and sizes), and the footers / headers of up to `CHECKED_FILES` inputs (all of them
    when there are no more; else a sample, and workers check the rest). Content hashes
    are computed by the workers. With `resume`, work items an interrupted run of the
    same job (same `spec_fingerprint`, same path and sha256) staged are reused, not read
    again; the workers find them. With `limit`, the job covers only the first `limit`
    rows in input order (files in sorted order, rows in file order); files past them are
    not opened.

    Raises:
        InputError: no input file matches, formats or schemas disagree, a column is
            missing, or a task would overwrite an input column.
        ModelError: a model or revision cannot be found.
    """
    listed = list_inputs(inputs)
    files = [path for path, _ in listed]
    row_limits: dict[int, int] = {}
    if limit is not None:
        files, row_limits = _files_within_limit(files, limit)
        listed = listed[: len(files)]
    checked = _checked_sample(len(files))
    schema = _common_schema(files, checked)
    if output_format is None:
        formats = {table_format(path) for path in files}
        output_format = formats.pop() if len(formats) == 1 else "parquet"
    check_output_schema(schema, output_format)

    bindings, output_schema = bind_tasks(
        spec, schema, cpu_threads=_cpu_threads_per_process(options)
    )

    options = options or PipelineOptions([])
    run_id = dt_run_id()
    inputs_info = [{"path": path, "size": size} for path, size in listed]
    context = RunContext(
        run_id=run_id,
        started_at=now(),
        argv=redact_argv(argv),
        runner=_runner_name(options),
        options=redact(options.get_all_options(drop_default=True)),
        inputs=inputs_info,
        output=output.rstrip("/"),
        output_format=output_format,
        output_schema=output_schema,
        spec=spec.model_dump(mode="json"),
        tasks=[_describe_task(spec, binding) for binding in bindings],
        csv_neutralize_formulas=csv_neutralize_formulas and output_format == "csv",
        # Not in the fingerprint: a limit changes the exit code, never a cell.
        quality_gate=gate_limits(
            spec, max_failed_rows=max_failed_rows, max_failed_fraction=max_failed_fraction
        ),
    )
    context = dataclasses.replace(
        context,
        fingerprint=spec_fingerprint(
            context.spec,
            context.tasks,
            output_format,
            output_schema,
            {"csv_neutralize_formulas": context.csv_neutralize_formulas},
            limit=limit,
        ),
        limit=limit,
    )
    rows_total = None
    if not resume and len(checked) == len(files):
        # Reused items are known to the workers only; then progress counts rows done.
        rows_total = _rows_to_enrich(files, row_limits)
    context = dataclasses.replace(context, resume=resume, rows_total=rows_total)
    return Job(
        spec=spec,
        files=files,
        bindings=bindings,
        context=context,
        row_limits=row_limits,
        input_schema=schema,
        checked=checked,
        work_item_bytes=work_item_bytes,
    )


#: The launcher reads at most this many footers / headers before the run: every one
#: with fewer inputs (bad input exits 2 before any row is read), a spread sample with
#: more (the workers check the others as they plan them, failing the run with the file
#: named). Bounded so the launcher's work does not grow with the number of inputs.
CHECKED_FILES = 64


def _checked_sample(count: int) -> tuple[int, ...]:
    if count <= CHECKED_FILES:
        return tuple(range(count))
    step = (count - 1) / (CHECKED_FILES - 1)
    return tuple(sorted({round(i * step) for i in range(CHECKED_FILES)}))


def _files_within_limit(files: list[str], limit: int) -> tuple[list[str], dict[int, int]]:
    """The files that hold the first `limit` rows, and how many rows to read from the last."""
    if limit < 1:
        raise InputError(f"--limit {limit}: give a positive number of rows")
    remaining = limit
    for index, path in enumerate(files):
        rows = _count_rows(path, at_most=remaining)
        if rows >= remaining:
            return files[: index + 1], {index: remaining}
        remaining -= rows
    return files, {}


def _count_rows(path: str, *, at_most: int) -> int:
    """Rows in one input file, counted no further than `at_most` (at least that many)."""
    if table_format(path) == "parquet":
        return parquet_metadata(path).num_rows  # the footer has the count
    rows = 0
    # CSV has no count: stream it, and stop as soon as the limit is reached.
    with contextlib.closing(iter_tables(path, min(at_most, 65_536))) as tables:
        for table in tables:
            rows += table.num_rows
            if rows >= at_most:
                break
    return rows


def _rows_to_enrich(files: Sequence[str], row_limits: dict[int, int]) -> int | None:
    """The rows a run enriches, for its progress, from Parquet footers; `--limit` applied.

    None when an input is CSV (only reading it could count its rows: progress then
    counts rows done) or a footer cannot be read (the run reports that itself).
    """
    if any(table_format(path) != "parquet" for path in files):
        return None
    total = 0
    try:
        for index, path in enumerate(files):
            rows = parquet_metadata(path).num_rows
            total += min(rows, row_limits.get(index, rows))
    except InputError:
        return None
    return total


def bind_tasks(
    spec: JobSpec, schema: pa.Schema, *, cpu_threads: int | None = None
) -> tuple[list[TaskBinding], pa.Schema]:
    """Checks each task against the input columns and pins its model.

    Args:
        spec: the validated job spec.
        schema: the input's columns and types.
        cpu_threads: torch intra-op threads per process on CPU; None keeps torch's default.

    Returns:
        (bindings, output_schema): one binding per task, in spec order, and the output's
        schema: the input columns, each task's columns, then `enrich_errors`.

    Raises:
        InputError: a column is missing, a column a task reads as text (from the input or
            an earlier task) is not text, or a task would overwrite an input column.
        ModelError: a model or revision cannot be found.
    """
    if ERRORS_COLUMN in schema.names:
        raise InputError(
            f"the input already has column {ERRORS_COLUMN!r}, which every run adds for its "
            "per-row errors; drop or rename that column"
        )
    adapters = []
    added: list[pa.Field] = []
    added_by: dict[str, str] = {}  # an earlier task's column -> that task's name
    for task in spec.tasks:
        adapter = spec.adapter(task)
        # A task may read the input's columns and those of the tasks before it.
        types = {field.name: field.type for field in [*schema, *added]}
        for column in adapter.read_columns():
            if column not in types:
                raise InputError(
                    f"task {task.name!r} reads column {column!r}, which the input does not "
                    f"have; columns: {', '.join(types)} (set `input:` or `text_column:`)"
                )
        for column in adapter.text_columns():
            _check_text_type(adapter, column, types[column], added_by.get(column))
        # Clashes between tasks, and with enrich_errors, are refused by the spec itself.
        clashes = [field.name for field in adapter.fields() if field.name in schema.names]
        if clashes:
            raise InputError(
                f"the input already has column(s) {clashes} that task {task.name!r} would "
                "add; rename the task (its `name` prefixes its columns) or drop those columns"
            )
        adapters.append(adapter)
        added.extend(adapter.fields())
        added_by.update((field.name, task.name) for field in adapter.fields())
    # Models last: a column mistake in any task is found without waiting on the hub.
    bindings = [
        TaskBinding(
            adapter=adapter,
            model=resolve_model(
                task.model_id,
                task.revision,
                trust_remote_code=task.trust_remote_code,
                allow_pickle_weights=task.allow_pickle_weights,
            ),
            device=task.device,
            dtype=task.dtype,
            max_batch_tokens=task.max_batch_tokens,
            inference_timeout_s=task.inference_timeout_s,
            share_model=task.share_model,
            cpu_threads=cpu_threads,
        )
        for task, adapter in zip(spec.tasks, adapters, strict=True)
    ]
    added.append(pa.field(ERRORS_COLUMN, ERRORS_TYPE))
    return bindings, pa.schema([*schema, *added], metadata=schema.metadata)


def _cpu_threads_per_process(options: PipelineOptions | None) -> int | None:
    """Each local worker's share of the cores, so processes do not oversubscribe them.

    Other runners size their workers themselves; there torch keeps its default.
    """
    if options is None or options.view_as(StandardOptions).runner not in (None, "DirectRunner"):
        return None
    from apache_beam.options.pipeline_options import DirectOptions

    direct = options.view_as(DirectOptions)
    cores = os.cpu_count() or 1
    workers = direct.direct_num_workers or cores  # 0 means one per core
    if direct.direct_running_mode == "in_memory" or workers <= 1:
        return None
    return max(1, cores // workers)


def dt_run_id() -> str:
    """A sortable, unique run id: UTC time plus random suffix."""
    return (
        now().replace(":", "").replace("-", "").replace("+0000", "Z") + "-" + uuid.uuid4().hex[:8]
    )


def _common_schema(files: Sequence[str], checked: Sequence[int]) -> pa.Schema:
    first = read_schema(files[0])
    for path in (files[i] for i in checked if i > 0):
        schema = read_schema(path)
        if not schema.equals(first):
            raise InputError(
                f"input files disagree on their columns: {files[0]} has {first.names} "
                f"({', '.join(map(str, first.types))}) but {path} has {schema.names} "
                f"({', '.join(map(str, schema.types))}); enrich them in separate runs"
            )
    return first


def _check_text_type(
    adapter: TaskAdapter, column: str, type_: pa.DataType, added_by: str | None = None
) -> None:
    """A column a task reads as text must hold text: otherwise every row would fail.

    `added_by` names the earlier task whose output column it is, if it is one.
    """
    value_type = type_.value_type if pa.types.is_dictionary(type_) else type_
    text = pa.types.is_string(value_type) or pa.types.is_large_string(value_type)
    if text or pa.types.is_string_view(value_type) or pa.types.is_null(value_type):
        return
    holds = f"which task {added_by!r} fills with {type_}" if added_by else f"which holds {type_}"
    fix = (
        "point `input:` at a string column"
        if column == adapter.input_column
        else "name a string column in the task's `params`"
    )
    raise InputError(
        f"task {adapter.name!r} reads text from column {column!r}, {holds}; {fix}, or cast "
        "the column to string first"
    )


def _describe_task(spec: JobSpec, binding: TaskBinding) -> dict:
    task = next(t for t in spec.tasks if t.name == binding.name)
    model = binding.model
    try:  # what the model's own files decide (an embedding model's pooling, …)
        resolved = binding.adapter.resolved_parameters(model)
    except ValueError as err:
        raise ModelError(f"task {task.name!r}: {err}") from err
    return {
        "name": task.name,
        "task": task.task,
        "model": model.model,
        "model_source": model.source,
        "requested_revision": model.requested_revision,
        "resolved_revision": model.resolved,
        "trust_remote_code": model.trust_remote_code,
        "allow_pickle_weights": model.allow_pickle_weights,
        "inference_timeout_s": binding.inference_timeout_s,
        "input_columns": binding.adapter.read_columns(),
        "on_long_input": task.on_long_input,
        "parameters": {**task.params.model_dump(mode="json"), **resolved},
        "device": task.device,
        "dtype": task.dtype,
        "batching": {
            # None: the default for the device the worker used, from this table.
            "max_batch_tokens": task.max_batch_tokens,
            "max_batch_tokens_default": {
                kind: tokens * binding.adapter.batch_tokens_factor
                for kind, tokens in DEFAULT_MAX_BATCH_TOKENS.items()
            },
            "rows_per_chunk": spec.rows_per_chunk,
        },
        "columns": [field.name for field in binding.adapter.fields()],
    }


def _runner_name(options: PipelineOptions) -> str:
    return options.view_as(StandardOptions).runner or "FnApiRunner (local default)"


def build(pipeline: beam.Pipeline, job: Job) -> None:
    """Adds the job's steps to `pipeline`: read, enrich with each task, write, finalize.

    Writes the input listing the pipeline starts from into the staging folder.
    """
    spec, context = job.spec, job.context
    listed = {entry["path"]: entry["size"] for entry in context.inputs}
    write_listing(context.listing_path, [(path, listed.get(path, 0)) for path in job.files])
    read = pipeline | "ReadInput" >> ReadTables(
        context.listing_path,
        job.input_schema if job.input_schema is not None else _common_schema(job.files, [0]),
        context.files_dir,
        checked=job.checked,
        rows_per_chunk=spec.rows_per_chunk,
        work_item_bytes=job.work_item_bytes,
        row_limits=job.row_limits,
        resume=context.resume,
    )
    chunks = read["chunks"]
    for binding in job.bindings:
        chunks = chunks | f"Enrich[{binding.name}]" >> EnrichTables(binding)
    if context.csv_neutralize_formulas:
        chunks = chunks | "NeutralizeFormulas" >> beam.Map(neutralize_chunk_formulas)
    written = chunks | "WriteOutput" >> WriteParts(
        context.files_dir,
        context.output_schema,
        output_format=context.output_format,
        summarizer_factory=functools.partial(
            Summarizer, context.tasks, csv=context.output_format == "csv"
        ),
    )
    _ = (
        (
            written | "TagWritten" >> beam.Map(_tagged, "part"),
            read["reused"] | "TagReused" >> beam.Map(_tagged, "part"),
            read["inputs"] | "TagInputs" >> beam.Map(_tagged, "input"),
        )
        | "GatherParts" >> beam.Flatten()
        # Small records only (a part's description, a file's hash): never rows.
        | "CollectParts" >> beam.combiners.ToList()
        # The input records come from the workers: the graph holds no per-file list.
        | "Finalize" >> beam.Map(finalize_run, dataclasses.replace(context, inputs=[]))
    )


def _tagged(value, kind: str) -> tuple[str, object]:
    return kind, value


#: Runners that run the pipeline in this machine's memory.
_LOCAL_RUNNERS = {"DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner"}


def _runs_locally(runner: str) -> bool:
    return runner.startswith("FnApiRunner") or runner.rsplit(".", 1)[-1] in _LOCAL_RUNNERS


def _make_pipeline(options: PipelineOptions) -> beam.Pipeline:
    if options.view_as(StandardOptions).runner:
        return beam.Pipeline(options=options)
    # Beam's DirectRunner first tries to fetch the Prism runner from the internet; the
    # local default here is the Python portable runner: deterministic, no downloads.
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return beam.Pipeline(runner=FnApiRunner(), options=options)


def run(
    argv: Sequence[str] | None = None, *, progress_interval_s: float = 10.0
) -> beam.runners.runner.PipelineResult:
    """Runs one enrichment job and waits for it, showing its progress on local runs.

    Args:
        argv: the command line, without the program name; default `sys.argv[1:]`.
        progress_interval_s: seconds between two progress lines when stderr is not a
            terminal (a terminal gets live bars).

    Raises:
        SpecError, InputError, ModelError: the job cannot start (see `prepare_job`, and
            `check_output` / `lock_output` for an unusable or busy `--output`).
        QualityGateError: the run published its output, but a task failed more rows than
            `max_failed_rows` / `max_failed_fraction` allow.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, beam_args = _parser().parse_known_args(argv)
    spec = load_spec(args.spec)
    options = PipelineOptions(beam_args)
    # Before any model loads: where the output goes must be writable and hold nothing
    # a run would wrongly delete. The lock is taken before anything there changes.
    output = check_output(args.output, expand_inputs(args.input))
    run_id = dt_run_id()
    with lock_output(output, run_id):
        job = prepare_job(
            spec,
            args.input,
            output,
            output_format=args.output_format,
            argv=["beam-enrich", *argv],
            options=options,
            resume=args.resume,
            csv_neutralize_formulas=args.csv_neutralize_formulas,
            limit=args.limit,
            max_failed_rows=args.max_failed_rows,
            max_failed_fraction=args.max_failed_fraction,
            work_item_bytes=max(1, int(args.work_item_mb * (1 << 20))),
        )
        # One run id for the lock, the staging folder and the manifest.
        job = dataclasses.replace(job, context=dataclasses.replace(job.context, run_id=run_id))
        prepare_output(job.context, resume=args.resume)
        progress_root = _progress_root(job.context)
        progress_dir = None
        if progress_root is not None and not args.quiet:
            progress_dir = os.path.join(progress_root, job.context.run_id)
            bindings = [dataclasses.replace(b, progress_dir=progress_dir) for b in job.bindings]
            job = dataclasses.replace(job, bindings=bindings)
        pipeline = _make_pipeline(options)
        build(pipeline, job)
        progress = show_progress(
            progress_dir,
            [binding.name for binding in job.bindings],
            job.context.rows_total,
            quiet=args.quiet,
            interval_s=progress_interval_s,
        )
        try:
            with progress:
                result = pipeline.run()
                result.wait_until_finish()
        finally:
            if progress_root is not None:
                # Killed runs' folders go too: the lock keeps live runs off this output.
                shutil.rmtree(progress_root, ignore_errors=True)
    _check_published_gate(job.context.output)
    return result


def _check_published_gate(output: str) -> None:
    """The quality gate, on the driver, from the published manifest's per-task counts."""
    path = FileSystems.join(output, MANIFEST)
    if FileSystems.exists(path):  # absent: a runner that returned before the job ended
        with FileSystems.open(path) as handle:
            check_gate(json.load(handle))


def _progress_root(context: RunContext) -> str | None:
    """Where workers publish live progress, per run: local runs with a local output only.

    Elsewhere workers may not share the driver's disk; Beam metrics report progress there.
    """
    if "://" in context.output or not _runs_locally(context.runner):
        return None
    return os.path.join(context.staging_root, "progress")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beam-enrich",
        description="Enrich Parquet or CSV files with Hugging Face models on Apache Beam. "
        "Any other --option is passed to Beam (e.g. --runner DataflowRunner --project P).",
        epilog="Also: beam-enrich validate --spec job.yaml --input FILES (checks only); "
        "beam-enrich spec-schema [--output FILE] (the job spec's JSON Schema, for editors); "
        "beam-enrich download --spec job.yaml --cache DIR (models for offline workers); "
        "beam-enrich make-test-models DIR (tiny offline models for tests).",
    )
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        help="file, glob or URI (gs://, s3://); repeat for several; .parquet, .csv, .csv.gz",
    )
    parser.add_argument(
        "--output", required=True, help="output directory (parts, errors.jsonl, manifest.json)"
    )
    parser.add_argument("--spec", required=True, help="job spec (YAML)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the results an interrupted run of the same job staged for unchanged inputs",
    )
    parser.add_argument(
        "--output-format",
        choices=FORMATS,
        default=None,
        help="default: the inputs' format",
    )
    parser.add_argument(
        "--csv-neutralize-formulas",
        action="store_true",
        help="CSV output: prefix ' to text cells starting with = + - @ tab or CR, so "
        "spreadsheets do not run them as formulas (input and task columns alike)",
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="enrich only the first N rows (files in sorted order, rows in file order), "
        "to try a spec before the full run",
    )
    parser.add_argument(
        "--max-failed-rows",
        type=_row_count,
        default=None,
        metavar="N",
        help="quality gate: when a task fails more than N rows, publish the output, then "
        "exit 3 (replaces the spec's run-level max_failed_rows; a task's own still wins)",
    )
    parser.add_argument(
        "--max-failed-fraction",
        type=_fraction,
        default=None,
        metavar="F",
        help="quality gate: when a task fails more than this fraction (0 to 1) of its rows, "
        "publish the output, then exit 3 (replaces the spec's run-level value)",
    )
    parser.add_argument(
        "--work-item-mb",
        type=_megabytes,
        default=DEFAULT_WORK_ITEM_BYTES >> 20,
        metavar="MB",
        help="Parquet inputs are read as work items of whole row groups of about this "
        "many compressed MB, spread over all workers (default %(default)s); a CSV file is "
        "one work item",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress, no summary line and no warnings: errors only",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of rows, got {text!r}")
    return value


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a positive size in MB, got {text!r}")
    return value


def _row_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of rows, 0 or more, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


_INPUT_ERROR = re.compile(r"InputError: ([^\n]*)")


def _drop_input_errors(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], InputError))


def _drop_interrupts(record: logging.LogRecord) -> bool:
    return not (record.exc_info and _caused_by_interrupt(record.exc_info[1]))


def _caused_by_interrupt(err: BaseException | None) -> bool:
    """Whether `err` is a KeyboardInterrupt or was raised while handling one."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _interrupted(output: str | None, previous_run: str | None) -> int:
    """Ctrl-C: says what a run left on disk; exits 130, as a shell does for SIGINT."""
    state = f"; {output_state(output, previous_run)}" if output is not None else ""
    print(f"beam-enrich: interrupted{state}", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["make-test-models"]:
        from pipelines.test_models import main as make_test_models

        return make_test_models(argv[1:])
    # An unreadable input found mid-run is reported below in one line; Beam's own log
    # of it (with the worker traceback) would only repeat it.
    beam_log = logging.getLogger("apache_beam.runners.common")
    beam_log.addFilter(_drop_input_errors)
    beam_log.addFilter(_drop_interrupts)  # Ctrl-C: one line below says what it left
    output = previous_run = None
    try:
        if argv[:1] == ["validate"]:
            return _validate(argv[1:])
        if argv[:1] == ["spec-schema"]:
            return _spec_schema(argv[1:])
        if argv[:1] == ["download"]:
            return _download(argv[1:])
        quiet = _parser().parse_known_args(argv)[0].quiet
        # A failed run's last line says what is on disk, compared with what was there.
        output = _parser().parse_known_args(argv)[0].output
        previous_run = published_run_id(output)
        with _errors_only(argv) if quiet else contextlib.nullcontext():
            run(argv)
    except SpecError as err:
        print(f"beam-enrich: error: {err}", file=sys.stderr)
        return 2
    except (InputError, ModelError) as err:
        print(f"beam-enrich: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except QualityGateError as err:
        # The output is complete and published: a scheduler marks the run failed (3).
        if not quiet:
            _print_summary(output)
        print(f"beam-enrich: error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return _interrupted(output, previous_run)
    except Exception as err:
        if _caused_by_interrupt(err):  # Beam re-raises a Ctrl-C in a step as RuntimeError
            return _interrupted(output, previous_run)
        # A runner that runs workers in other processes hands back their InputError as
        # text: an unreadable input is still the input's fault (exit 2), not the run's.
        found = _INPUT_ERROR.search(str(err))
        if found:
            print(f"beam-enrich: error: {found[1]}", file=sys.stderr)
            return 2
        # The traceback is for debugging; the last line says what it means for the output.
        traceback.print_exc()
        output = _parser().parse_known_args(argv)[0].output
        print(
            f"beam-enrich: error: the run failed ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}); "
            f"{output_state(output, previous_run)}",
            file=sys.stderr,
        )
        return 1
    if not quiet:
        _print_summary(_parser().parse_known_args(argv)[0].output)
    return 0


@contextlib.contextmanager
def _errors_only(argv: Sequence[str]) -> Iterator[None]:
    """`--quiet`: Beam's and transformers' warnings are dropped too, for the run only,
    and so are those of local worker processes."""
    # transformers logs through its own handler, not the root logger's.
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with _worker_logs_dropped() if _runs_worker_processes(argv) else contextlib.nullcontext():
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _runs_worker_processes(argv: Sequence[str]) -> bool:
    """Whether the run starts local worker processes that share this process's stderr."""
    options = PipelineOptions(_parser().parse_known_args(argv)[1])
    from apache_beam.options.pipeline_options import DirectOptions

    mode = options.view_as(DirectOptions).direct_running_mode
    return mode == "multi_processing" and _runs_locally(_runner_name(options))


#: A line a worker process logs below ERROR (Python's default log format, which Beam's
#: SDK harness gets from `logging.basicConfig`).
_WORKER_LOG_BELOW_ERROR = re.compile(rb"(?:DEBUG|INFO|WARNING):")


@contextlib.contextmanager
def _worker_logs_dropped() -> Iterator[None]:
    """Drops the lines worker processes log below ERROR from stderr, for the run only.

    Beam's multi-process workers are child processes writing to this process's stderr.
    They log at INFO from their first import on, and FnApiRunner hands them none of the
    pipeline's options, so `--default_sdk_harness_log_level` cannot quiet them.
    Everything else written to stderr meanwhile (errors, a worker that crashes) passes
    through unchanged.
    """
    sys.stderr.flush()
    try:
        stderr = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep quiet
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        # Ends when every writer (this process's fd 2, each worker) has closed the pipe.
        with open(read_end, "rb") as lines, open(stderr, "wb", buffering=0) as target:
            for line in lines:
                if not _WORKER_LOG_BELOW_ERROR.match(line):
                    target.write(line)

    forwarder = threading.Thread(target=forward, name="beam-enrich-stderr", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(stderr, 2)  # closes this process's end of the pipe
        # The workers have exited when the run returns; a lingering one is not waited for.
        forwarder.join(timeout=5.0)


def _validate(argv: Sequence[str]) -> int:
    """`beam-enrich validate`: every check a run makes before reading data, and no run."""
    parser = argparse.ArgumentParser(
        prog="beam-enrich validate",
        description="Check a job spec against its inputs and models without running it.",
    )
    parser.add_argument("--spec", required=True, help="job spec (YAML)")
    parser.add_argument("--input", action="append", required=True, help="as for a run")
    args = parser.parse_args(argv)
    job = prepare_job(load_spec(args.spec), args.input, "validate-only")
    print(f"beam-enrich: {args.spec} is valid for {len(job.files)} input file(s)")
    for task in job.context.tasks:
        print(
            f"  {task['name']}: {task['task']} reading {', '.join(task['input_columns'])} "
            f"with {task['model']} @ {task['resolved_revision']} -> {', '.join(task['columns'])}"
        )
    return 0


JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def job_spec_schema() -> dict:
    """The JSON Schema of a job spec (pydantic's, draft 2020-12), for editors and validators."""
    schema = JobSpec.model_json_schema()
    schema.pop("title", None)
    return {"$schema": JSON_SCHEMA_DIALECT, "title": "beam-enrich job spec", **schema}


def _spec_schema(argv: Sequence[str]) -> int:
    """`beam-enrich spec-schema`: the job spec's JSON Schema, printed or written to a file."""
    parser = argparse.ArgumentParser(
        prog="beam-enrich spec-schema",
        description="Print the JSON Schema of a job spec, for editor completion and checks "
        "(YAML: first line `# yaml-language-server: $schema=FILE`).",
    )
    parser.add_argument("--output", help="write the schema to this file instead of stdout")
    args = parser.parse_args(argv)
    text = json.dumps(job_spec_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as err:
        raise InputError(
            f"cannot write {args.output}: {err.strerror}; name a file in a folder that exists"
        ) from None
    print(f"beam-enrich: job spec schema written to {args.output}")
    return 0


def _download(argv: Sequence[str]) -> int:
    """`beam-enrich download`: every hub model of a spec, at its pinned commit, into a cache."""
    parser = argparse.ArgumentParser(
        prog="beam-enrich download",
        description="Fetch every hub model of a job spec at the commit its revision resolves "
        "to, into a Hugging Face cache that workers without network use with "
        "HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1. Local-directory models are skipped.",
    )
    parser.add_argument("--spec", required=True, help="job spec (YAML)")
    parser.add_argument("--cache", required=True, help="cache folder (created if missing)")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    cache = os.path.abspath(os.path.expanduser(args.cache))
    fetched = 0
    for task in spec.tasks:
        model = resolve_model(
            task.model_id,
            task.revision,
            trust_remote_code=task.trust_remote_code,
            allow_pickle_weights=task.allow_pickle_weights,
            cache_dir=cache,
        )
        if model.source == "local":
            print(f"  {task.name}: {model.model} is a local directory; skipped (ship it yourself)")
            continue
        folder = _fetch_snapshot(model, cache)
        fetched += 1
        print(
            f"  {task.name}: {model.model} @ {model.requested_revision} = {model.revision} "
            f"-> {folder}"
        )
    print(
        f"beam-enrich: {fetched} hub model(s) in {cache}; on the driver and every worker set\n"
        f"  HF_HUB_CACHE={cache}\n  HF_HUB_OFFLINE=1"
    )
    return 0


def _fetch_snapshot(model: ResolvedModel, cache: str) -> str:
    """Downloads the files workers load at the model's commit; returns the snapshot folder.

    Raises:
        ModelError: the download fails, or the revision moved while it ran.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        folder = snapshot_download(
            model.model, revision=model.revision, cache_dir=cache, **worker_file_patterns(model)
        )
        pinned = model.revision
        if model.requested_revision != model.revision:
            # A download by commit records no branch or tag; an offline driver resolves
            # the spec's revision through the cache's refs/, so record it there.
            pinned = (
                HfApi()
                .resolve_revision(
                    model.model,
                    revision=model.requested_revision,
                    cache_dir=cache,
                    local_files_only=constants.HF_HUB_OFFLINE,
                )
                .resolved
            )
    except Exception as err:
        reason = " ".join(str(err).split())[:300]
        raise ModelError(
            f"cannot download {model.model} at {model.revision} into {cache} "
            f"({type(err).__name__}: {reason}); check the network, the disk and access to "
            "the model (HF_TOKEN), then run download again"
        ) from err
    if pinned != model.revision:
        raise ModelError(
            f"{model.model} revision {model.requested_revision!r} moved from {model.revision} "
            f"to {pinned} during the download; run download again"
        )
    return folder


def _print_summary(output: str) -> None:
    # A runner that returns before the job ends (Dataflow without waiting) has no
    # manifest yet; then there is nothing to summarize.
    path = FileSystems.join(output.rstrip("/"), MANIFEST)
    if not FileSystems.exists(path):
        return
    with FileSystems.open(path) as handle:
        manifest = json.load(handle)
    failed = ", ".join(f"{task} {n}" for task, n in manifest["rows"]["failed"].items())
    files = manifest["output"]["files"]
    print(
        f"beam-enrich: {manifest['rows']['out']} rows written to {output} "
        f"({len(files)} {manifest['output']['format']} part file(s)); "
        f"failed rows per task: {failed}; manifest: {path}"
    )


if __name__ == "__main__":
    sys.exit(main())
