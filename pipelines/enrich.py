"""`beam-enrich` / `python -m pipelines.enrich`: the pipeline of one enrichment job.

`build()` adds a prepared job's steps to a pipeline (read, enrich with each task, write,
publish); `run()` prepares the job from a run's command line, runs it and waits for it.
The command line itself (subcommands, exit codes; `beam-enrich` and `python -m
pipelines.enrich` both run it) is `pipelines.cli`; job preparation is `pipelines.job`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import runpy
import shutil
import sys
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.job import Job, common_schema, dt_run_id, prepare_job
from pipelines.manifest import RunContext, read_manifest
from pipelines.output import (
    check_output,
    finalize_run,
    lock_output,
    prepare_output,
    record_model_loads,
)
from pipelines.progress import show_progress
from pipelines.quality_gate import check_gate
from pipelines.runners import MetricsProgress, model_loads, resolve_runner, wait_for_job
from pipelines.spec import load_spec
from transforms import worker_models
from transforms.enrich import EnrichTables
from transforms.io import FORMATS, expand_inputs, neutralize_chunk_formulas
from transforms.staging import WriteParts
from transforms.summaries import Summarizer
from transforms.work_items import DEFAULT_WORK_ITEM_BYTES, ReadTables, write_listing

__all__ = ["add_run_arguments", "build", "run", "runs_locally"]


def build(pipeline: beam.Pipeline, job: Job) -> None:
    """Adds the job's steps to `pipeline`: read, enrich with each task, write, finalize.

    Writes the input listing the pipeline starts from into the staging folder.
    """
    spec, context = job.spec, job.context
    listed = dict(context.inputs)
    write_listing(context.listing_path, [(path, listed.get(path, 0)) for path in job.files])
    read = pipeline | "ReadInput" >> ReadTables(
        context.listing_path,
        job.input_schema if job.input_schema is not None else common_schema(job.files, [0]),
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
            # JSON data: what the summaries read of each task, picklable for the workers.
            Summarizer,
            [task.model_dump(mode="json") for task in context.tasks],
            csv=context.output_format == "csv",
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


def runs_locally(runner: str) -> bool:
    """Whether `runner` runs the pipeline in this machine's memory."""
    return runner.startswith("FnApiRunner") or runner.rsplit(".", 1)[-1] in _LOCAL_RUNNERS


def _make_pipeline(options: PipelineOptions) -> beam.Pipeline:
    if options.view_as(StandardOptions).runner:
        return beam.Pipeline(options=options)
    # Beam's DirectRunner first tries to fetch the Prism runner from the internet; the
    # local default here is the Python portable runner: deterministic, no downloads.
    from pipelines.local_runner import LocalRunner

    return beam.Pipeline(runner=LocalRunner(), options=options)


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
    args, beam_args = _run_parser().parse_known_args(argv)
    spec = load_spec(args.spec)
    options = PipelineOptions(resolve_runner(beam_args))
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
        # Workers elsewhere cannot publish progress files here: the job's metrics tell it.
        metrics = MetricsProgress() if progress_dir is None and not args.quiet else None
        progress = show_progress(
            progress_dir,
            [binding.name for binding in job.bindings],
            job.context.rows_total,
            quiet=args.quiet,
            interval_s=progress_interval_s,
            read=metrics.read if metrics is not None else None,
        )
        try:
            with progress:
                result = pipeline.run()
                if metrics is not None:
                    metrics.attach(result)
                wait_for_job(result, options, job.context.files_dir, quiet=args.quiet)
        finally:
            if progress_root is not None:
                # Killed runs' folders go too: the lock keeps live runs off this output.
                shutil.rmtree(progress_root, ignore_errors=True)
            if runs_locally(job.context.runner):
                worker_models.release_all()  # this process was the worker: models go
        record_model_loads(job.context.output, model_loads(result))
    _check_published_gate(job.context.output)
    return result


def _check_published_gate(output: str) -> None:
    """The quality gate, on the driver, from the published manifest's per-task counts."""
    manifest = read_manifest(output)
    if manifest is not None:  # None: a runner that returned before the job ended
        check_gate(manifest.quality_gate, manifest.tasks, manifest.output.path)


def _progress_root(context: RunContext) -> str | None:
    """Where workers publish live progress, per run: local runs with a local output only.

    Elsewhere workers may not share the driver's disk; Beam metrics report progress there.
    """
    if "://" in context.output or not runs_locally(context.runner):
        return None
    return os.path.join(context.staging_root, "progress")


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beam-enrich")
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds a run's flags to `parser`; any other --option is Beam's."""
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


def _number(parse, accept, expected: str):
    """An argparse `type` that parses a number and refuses it unless `accept(value)`."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        # NaN and infinities fail `accept` too.
        if value is None or not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


_positive_int = _number(int, lambda n: n >= 1, "a positive number of rows")
_row_count = _number(int, lambda n: n >= 0, "a number of rows, 0 or more")
_fraction = _number(float, lambda f: 0 <= f <= 1, "a fraction from 0 to 1")
_megabytes = _number(float, lambda mb: mb > 0, "a positive size in MB")


if __name__ == "__main__":
    # `python -m pipelines.enrich` stays an alias of the command line, `pipelines.cli`,
    # which sits above this module.
    runpy.run_module("pipelines.cli", run_name="__main__", alter_sys=True)
