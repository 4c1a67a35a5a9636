"""Job preparation: everything checked and resolved on the launcher before a pipeline runs.

The spec, the inputs and their columns, the models and their revisions: a problem there
raises a `JobError` (exit 2) before any row is read. The launcher reads metadata only,
and a bounded amount of it (see `CHECKED_FILES`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Sequence

import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.manifest import (
    Batching,
    RunContext,
    TaskDescription,
    now,
    redact,
    redact_argv,
    spec_fingerprint,
)
from pipelines.quality_gate import gate_limits
from pipelines.spec import JobSpec
from transforms.batching import DEFAULT_MAX_BATCH_TOKENS
from transforms.chunks import ERRORS_COLUMN, ERRORS_TYPE
from transforms.enrich import TaskBinding
from transforms.io import (
    InputError,
    check_output_schema,
    iter_tables,
    list_inputs,
    parquet_metadata,
    read_schema,
    table_format,
)
from transforms.models import ModelError, resolve_model
from transforms.tasks import TaskAdapter
from transforms.work_items import DEFAULT_WORK_ITEM_BYTES

__all__ = [
    "CHECKED_FILES",
    "Job",
    "bind_tasks",
    "common_schema",
    "dt_run_id",
    "prepare_job",
    "runner_name",
]


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
    schema = common_schema(files, checked)
    if output_format is None:
        formats = {table_format(path) for path in files}
        output_format = formats.pop() if len(formats) == 1 else "parquet"
    check_output_schema(schema, output_format)

    bindings, output_schema = bind_tasks(
        spec, schema, cpu_threads=_cpu_threads_per_process(options)
    )

    options = options or PipelineOptions([])
    run_id = dt_run_id()
    context = RunContext(
        run_id=run_id,
        started_at=now(),
        argv=redact_argv(argv),
        runner=runner_name(options),
        options=redact(options.get_all_options(drop_default=True)),
        inputs=list(listed),
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
            compile=task.compile,
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


def common_schema(files: Sequence[str], checked: Sequence[int]) -> pa.Schema:
    """The first file's schema, which the `checked` files must have too.

    Raises:
        InputError: a checked file's columns or types differ.
    """
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


def _describe_task(spec: JobSpec, binding: TaskBinding) -> TaskDescription:
    task = next(t for t in spec.tasks if t.name == binding.name)
    model = binding.model
    try:  # what the model's own files decide (an embedding model's pooling, …)
        resolved = binding.adapter.resolved_parameters(model)
    except ValueError as err:
        raise ModelError(f"task {task.name!r}: {err}") from err
    return TaskDescription(
        name=task.name,
        task=task.task,
        model=model.model,
        model_source=model.source,
        requested_revision=model.requested_revision,
        resolved_revision=model.resolved,
        gguf_file=model.gguf_file,
        trust_remote_code=model.trust_remote_code,
        allow_pickle_weights=model.allow_pickle_weights,
        inference_timeout_s=binding.inference_timeout_s,
        input_columns=binding.adapter.read_columns(),
        on_long_input=task.on_long_input,
        parameters={**task.params.model_dump(mode="json"), **resolved},
        device=task.device,
        dtype=task.dtype,
        batching=Batching(
            # None: the default for the device the worker used, from this table.
            max_batch_tokens=task.max_batch_tokens,
            max_batch_tokens_default={
                kind: tokens * binding.adapter.batch_tokens_factor
                for kind, tokens in DEFAULT_MAX_BATCH_TOKENS.items()
            },
            rows_per_chunk=spec.rows_per_chunk,
        ),
        columns=[field.name for field in binding.adapter.fields()],
    )


def runner_name(options: PipelineOptions) -> str:
    """The Beam runner's name, as the manifest records it."""
    return options.view_as(StandardOptions).runner or "FnApiRunner (local default)"
