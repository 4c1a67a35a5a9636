"""`beam-enrich` / `python -m pipelines.enrich`: enrich Parquet or CSV files with models.

    beam-enrich --input 'data/*.parquet' --output out/run1 --spec job.yaml \\
                [--output-format parquet|csv] [any Beam option: --runner, --project, …]
    beam-enrich validate --spec job.yaml --input FILES
    beam-enrich make-test-models DIR

Everything that can be checked before data is read is checked in `prepare_job`: the
spec, the inputs and their columns, the models and their revisions. A problem there
exits with code 2 and a one-paragraph message, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import traceback
import uuid
from collections.abc import Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.manifest import (
    MANIFEST,
    RunContext,
    finalize_run,
    now,
    prepare_output,
    redact,
    redact_argv,
    reusable_parts,
    spec_fingerprint,
)
from pipelines.spec import JobSpec, SpecError, load_spec
from transforms.chunks import ERRORS_COLUMN, ERRORS_TYPE
from transforms.enrich import EnrichTables, TaskBinding
from transforms.io import (
    FORMATS,
    InputError,
    ReadTables,
    WriteTables,
    expand_inputs,
    file_sha256,
    neutralize_chunk_formulas,
    read_schema,
    table_format,
)
from transforms.models import ModelError, resolve_model

__all__ = ["Job", "build", "main", "prepare_job", "run"]

_LOG = logging.getLogger("beam_enrich")


@dataclasses.dataclass(frozen=True)
class Job:
    """A job checked and resolved on the driver, ready to become a pipeline.

    Attributes:
        spec: the validated job spec.
        files: every input file, sorted.
        bindings: one per task: adapter, pinned model, column, placement.
        context: what the manifest records (inputs with sha256, tasks, options, …).
    """

    spec: JobSpec
    files: list[str]
    bindings: list[TaskBinding]
    context: RunContext


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
) -> Job:
    """Checks a job against its inputs and pins its models, before any row is read.

    With `resume`, input files whose results an interrupted run of the same job (same
    `spec_fingerprint`, same path and sha256) staged are reused, not read again.

    Raises:
        InputError: no input file matches, formats or schemas disagree, a column is
            missing, or a task would overwrite an input column.
        ModelError: a model or revision cannot be found.
    """
    files = expand_inputs(inputs)
    schema = _common_schema(files)
    if output_format is None:
        formats = {table_format(path) for path in files}
        output_format = formats.pop() if len(formats) == 1 else "parquet"

    bindings = []
    added: list[pa.Field] = []
    for task in spec.tasks:
        adapter = spec.adapter(task)
        # A task may read the input's columns and those of the tasks before it.
        available = [*schema.names, *(field.name for field in added)]
        for column in adapter.read_columns():
            if column not in available:
                raise InputError(
                    f"task {task.name!r} reads column {column!r}, which the input does not "
                    f"have; columns: {', '.join(available)} (set `input:` or `text_column:`)"
                )
        _check_text_type(task.name, adapter.input_column, schema)
        model = resolve_model(
            task.model_id,
            task.revision,
            trust_remote_code=task.trust_remote_code,
            allow_pickle_weights=task.allow_pickle_weights,
        )
        bindings.append(
            TaskBinding(
                adapter=adapter,
                model=model,
                device=task.device,
                dtype=task.dtype,
                max_batch_tokens=task.max_batch_tokens,
                inference_timeout_s=task.inference_timeout_s,
                share_model=task.share_model,
                cpu_threads=_cpu_threads_per_process(options),
            )
        )
        added.extend(adapter.fields())
    added.append(pa.field(ERRORS_COLUMN, ERRORS_TYPE))
    clashes = [field.name for field in added if field.name in schema.names]
    if clashes:
        raise InputError(
            f"the input already has column(s) {clashes} that the tasks would add; "
            "rename the tasks (their `name` prefixes the columns) or drop those columns"
        )
    output_schema = pa.schema([*schema, *added])

    options = options or PipelineOptions([])
    run_id = dt_run_id()
    inputs_info = []
    for path in files:
        size, sha256 = file_sha256(path)
        inputs_info.append({"path": path, "size": size, "sha256": sha256})
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
    )
    context = dataclasses.replace(
        context,
        fingerprint=spec_fingerprint(
            context.spec,
            context.tasks,
            output_format,
            output_schema,
            {"csv_neutralize_formulas": context.csv_neutralize_formulas},
        ),
    )
    if resume:
        reused = reusable_parts(context)
        context = dataclasses.replace(context, reused=tuple(reused[i] for i in sorted(reused)))
    return Job(spec=spec, files=files, bindings=bindings, context=context)


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


def _common_schema(files: Sequence[str]) -> pa.Schema:
    first = read_schema(files[0])
    for path in files[1:]:
        schema = read_schema(path)
        if not schema.equals(first):
            raise InputError(
                f"input files disagree on their columns: {files[0]} has {first.names} "
                f"({', '.join(map(str, first.types))}) but {path} has {schema.names} "
                f"({', '.join(map(str, schema.types))}); enrich them in separate runs"
            )
    return first


def _check_text_type(task: str, column: str, schema: pa.Schema) -> None:
    """A task's text column must hold text; a whole column of numbers is a spec mistake."""
    if column not in schema.names:
        return  # an earlier task's output column: typed by that task
    type_ = schema.field(column).type
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    text = pa.types.is_string(type_) or pa.types.is_large_string(type_)
    if not (text or pa.types.is_string_view(type_) or pa.types.is_null(type_)):
        raise InputError(
            f"task {task!r} reads text from column {column!r}, which holds {type_}; point "
            "`input:` at a string column, or cast the column to string first"
        )


def _describe_task(spec: JobSpec, binding: TaskBinding) -> dict:
    task = next(t for t in spec.tasks if t.name == binding.name)
    model = binding.model
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
        "parameters": task.params.model_dump(mode="json"),
        "device": task.device,
        "dtype": task.dtype,
        "batching": {
            "max_batch_tokens": task.max_batch_tokens,
            "rows_per_chunk": spec.rows_per_chunk,
        },
        "columns": [field.name for field in binding.adapter.fields()],
    }


def _runner_name(options: PipelineOptions) -> str:
    return options.view_as(StandardOptions).runner or "FnApiRunner (local default)"


def build(pipeline: beam.Pipeline, job: Job) -> None:
    """Adds the job's steps to `pipeline`: read, enrich with each task, write, finalize."""
    spec = job.spec
    chunks = (
        pipeline
        | "ReadInput"
        >> ReadTables(
            job.files,
            rows_per_chunk=spec.rows_per_chunk,
            skip=[part.first[0] for part in job.context.reused],
        )
        # Chunks of one file come from one reader; spread them before inference.
        | "SpreadChunks" >> beam.Reshuffle()
    )
    for binding in job.bindings:
        chunks = chunks | f"Enrich[{binding.name}]" >> EnrichTables(binding)
    context = job.context
    if context.csv_neutralize_formulas:
        chunks = chunks | "NeutralizeFormulas" >> beam.Map(neutralize_chunk_formulas)
    _ = (
        chunks
        | "WriteOutput"
        >> WriteTables(
            context.files_dir,
            context.output_schema,
            output_format=context.output_format,
            part_names=context.part_names,
        )
        | "CollectParts" >> beam.combiners.ToList()
        | "Finalize" >> beam.Map(finalize_run, context)
    )


def _make_pipeline(options: PipelineOptions) -> beam.Pipeline:
    if options.view_as(StandardOptions).runner:
        return beam.Pipeline(options=options)
    # Beam's DirectRunner first tries to fetch the Prism runner from the internet; the
    # local default here is the Python portable runner: deterministic, no downloads.
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return beam.Pipeline(runner=FnApiRunner(), options=options)


def run(argv: Sequence[str] | None = None) -> beam.runners.runner.PipelineResult:
    """Runs one enrichment job and waits for it.

    Raises:
        SpecError, InputError, ModelError: the job cannot start (see `prepare_job`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, beam_args = _parser().parse_known_args(argv)
    spec = load_spec(args.spec)
    options = PipelineOptions(beam_args)
    job = prepare_job(
        spec,
        args.input,
        args.output,
        output_format=args.output_format,
        argv=["beam-enrich", *argv],
        options=options,
        resume=args.resume,
        csv_neutralize_formulas=args.csv_neutralize_formulas,
    )
    prepare_output(job.context, resume=args.resume)
    pipeline = _make_pipeline(options)
    build(pipeline, job)
    result = pipeline.run()
    result.wait_until_finish()
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beam-enrich",
        description="Enrich Parquet or CSV files with Hugging Face models on Apache Beam. "
        "Any other --option is passed to Beam (e.g. --runner DataflowRunner --project P).",
        epilog="Also: beam-enrich validate --spec job.yaml --input FILES (checks only); "
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
    return parser


_INPUT_ERROR = re.compile(r"InputError: (cannot read [^\n]*)")


def _drop_input_errors(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], InputError))


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
    try:
        if argv[:1] == ["validate"]:
            return _validate(argv[1:])
        run(argv)
    except SpecError as err:
        print(f"beam-enrich: error: {err}", file=sys.stderr)
        return 2
    except (InputError, ModelError) as err:
        print(f"beam-enrich: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except Exception as err:
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
            f"no manifest was written to {output}",
            file=sys.stderr,
        )
        return 1
    _print_summary(_parser().parse_known_args(argv)[0].output)
    return 0


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
