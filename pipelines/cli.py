"""`beam-enrich`: the command line. One parser, a subcommand per action, exit codes by type.

    beam-enrich [run] --input 'data/*.parquet' --output out/run1 --spec job.yaml \\
                [--output-format parquet|csv] [any Beam option: --runner, --project, …]
    beam-enrich validate --spec job.yaml --input FILES
    beam-enrich spec-schema [--output FILE]
    beam-enrich manifest-schema [--output FILE]
    beam-enrich download --spec job.yaml --cache DIR
    beam-enrich make-test-models DIR

`run` is the default subcommand: a command line that names none runs a job. Exit codes:
0 done; 2 the job cannot start or its input is bad (a `JobError`, raised here or in a
worker; one line names the cause and the fix, no traceback); 1 the run failed; 3 the
quality gate failed after the output was published; 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from pipelines.enrich import add_run_arguments, run, runs_locally
from pipelines.job import prepare_job, runner_name
from pipelines.manifest import MANIFEST, manifest_schema, read_manifest
from pipelines.output import output_state, published_run_id
from pipelines.process_exit import exit_process
from pipelines.quality_gate import QualityGateError
from pipelines.runners import resolve_runner
from pipelines.spec import JobSpec, SpecError, load_spec
from transforms.errors import JobError
from transforms.hub_download import fetch_snapshot
from transforms.io import InputError
from transforms.models import resolve_model

__all__ = [
    "COMMANDS",
    "EXIT_CODES",
    "console_main",
    "exit_status",
    "job_spec_schema",
    "main",
    "parser",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

#: The subcommands `parser` defines; a command line naming none of them runs a job.
COMMANDS = ("run", "validate", "spec-schema", "manifest-schema", "download", "make-test-models")

#: Exit codes by exception type, the first that matches; anything else exits 1.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = ((JobError, 2), (QualityGateError, 3))


def parser() -> argparse.ArgumentParser:
    """The command line: `run` (the default) and the other subcommands."""
    top = argparse.ArgumentParser(
        prog="beam-enrich",
        description="Enrich Parquet or CSV files with Hugging Face models on Apache Beam. "
        "`beam-enrich --input … --output … --spec …` runs a job (the `run` subcommand is "
        "the default); `beam-enrich run --help` lists its flags.",
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    run_command = commands.add_parser(
        "run",
        help="run a job (the default)",
        description="Enrich Parquet or CSV files with Hugging Face models on Apache Beam. "
        "Any other --option is passed to Beam (e.g. --runner DataflowRunner --project P).",
    )
    add_run_arguments(run_command)
    run_command.set_defaults(handler=_run)

    validate = commands.add_parser(
        "validate",
        help="check a spec against its inputs and models (checks only)",
        description="Check a job spec against its inputs and models without running it.",
    )
    validate.add_argument("--spec", required=True, help="job spec (YAML)")
    validate.add_argument("--input", action="append", required=True, help="as for a run")
    validate.set_defaults(handler=_validate)

    for name, what, handler, hint in (
        (
            "spec-schema",
            "a job spec",
            _spec_schema,
            " (YAML: first line `# yaml-language-server: $schema=FILE`)",
        ),
        ("manifest-schema", "a run's manifest.json", _manifest_schema, ""),
    ):
        schema = commands.add_parser(
            name,
            help=f"print the JSON Schema of {what}",
            description=f"Print the JSON Schema of {what}, for editor completion and checks{hint}.",
        )
        schema.add_argument("--output", help="write the schema to this file instead of stdout")
        schema.set_defaults(handler=handler)

    download = commands.add_parser(
        "download",
        help="fetch a spec's hub models into a cache, for offline workers",
        description="Fetch every hub model of a job spec at the commit its revision resolves "
        "to, into a Hugging Face cache that workers without network use with "
        "HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1. Local-directory models are skipped.",
    )
    download.add_argument("--spec", required=True, help="job spec (YAML)")
    download.add_argument("--cache", required=True, help="cache folder (created if missing)")
    download.set_defaults(handler=_download)

    test_models = commands.add_parser(
        "make-test-models",
        help="write tiny offline models for tests",
        description="Write tiny random-weight models (real tokenizers) for offline tests. "
        "Their outputs are meaningless.",
    )
    test_models.add_argument("directory", help="where to write one folder per task family")
    test_models.add_argument("--seed", type=int, default=0)
    test_models.set_defaults(handler=_make_test_models)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["run", *argv]
    args, rest = parser().parse_known_args(argv)
    if args.command != "run" and rest:
        parser().parse_args(argv)  # exits 2, naming the unknown arguments
    # A bad input found mid-run is reported below in one line; Beam's own log of it
    # (with the worker traceback) would only repeat it.
    beam_log = logging.getLogger("apache_beam.runners.common")
    beam_log.addFilter(_drop_job_errors)
    beam_log.addFilter(_drop_interrupts)  # Ctrl-C: one line below says what it left
    # A failed run's last line says what is on disk, compared with what was there.
    output = getattr(args, "output", None) if args.command == "run" else None
    previous_run = published_run_id(output) if output is not None else None
    handler: Callable[[argparse.Namespace, list[str]], int] = args.handler
    try:
        return handler(args, argv[1:] if args.command == "run" else rest)
    except KeyboardInterrupt:
        return _interrupted(output, previous_run)
    except Exception as err:
        if _caused_by_interrupt(err):  # Beam re-raises a Ctrl-C in a step as RuntimeError
            return _interrupted(output, previous_run)
        code, message = exit_status(err)
        if code == 3 and not getattr(args, "quiet", False):
            # The output is complete and published: a scheduler marks the run failed (3).
            _print_summary(output)
        if code == 1:
            # The traceback is for debugging; the last line says what it means.
            traceback.print_exc()
            if output is not None:
                message = f"the run failed ({message}); {output_state(output, previous_run)}"
        print(f"beam-enrich: error: {message}", file=sys.stderr)
        return code


def exit_status(err: BaseException) -> tuple[int, str]:
    """The exit code for an error, and the one line that says what it means.

    Decided by type, never by message text: the error, or what it was raised from or
    while handling (an in-process runner re-raises a step's error as its cause); else,
    for an error a worker process raised, the type its traceback text names (see
    `_worker_error`); else 1.
    """
    for cause in _chain(err):
        for type_, code in EXIT_CODES:
            if isinstance(cause, type_):
                return code, _one_line(cause)
    found = _worker_error(str(err))
    if found is not None:
        return found
    text = str(err).strip()
    return 1, f"{type(err).__name__}: {text.splitlines()[-1][:300] if text else ''}"


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _one_line(err: BaseException) -> str:
    # A spec error lists each bad key on its own line; other messages are one paragraph.
    return str(err) if isinstance(err, SpecError) else " ".join(str(err).split())


#: A traceback's last line for a `JobError` a worker raised: `transforms.io.InputError: …`.
_WORKER_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+): (.*)$", re.MULTILINE)


def _worker_error(text: str) -> tuple[int, str] | None:
    """The exit code and message of a `JobError` named in a worker's traceback text.

    A runner that runs workers in other processes (Beam's multi-process DirectRunner,
    Dataflow, Flink, Spark) hands back their errors as a RuntimeError whose message holds
    the worker's traceback: the exception's type survives only as its name there. This is
    the one place that reads it; the name must be `JobError`'s or a subclass's.
    """
    names = {cls.__name__ for cls in (JobError, *_subclasses(JobError))}
    for found in _WORKER_ERROR_LINE.finditer(text):
        if found[1] in names:
            return 2, found[2].strip()
    return None


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _drop_job_errors(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], JobError))


def _drop_interrupts(record: logging.LogRecord) -> bool:
    return not (record.exc_info and _caused_by_interrupt(record.exc_info[1]))


def _caused_by_interrupt(err: BaseException | None) -> bool:
    """Whether `err` is a KeyboardInterrupt or was raised while handling one."""
    return any(isinstance(cause, KeyboardInterrupt) for cause in _chain(err))


def _interrupted(output: str | None, previous_run: str | None) -> int:
    """Ctrl-C: says what a run left on disk; exits 130, as a shell does for SIGINT."""
    state = f"; {output_state(output, previous_run)}" if output is not None else ""
    print(f"beam-enrich: interrupted{state}", file=sys.stderr)
    return 130


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    """`beam-enrich [run]`: one job, run and waited for; a summary line when it is done."""
    beam_args = parser().parse_known_args(["run", *argv])[1]
    with _errors_only(beam_args) if args.quiet else contextlib.nullcontext():
        run(argv)
    if not args.quiet:
        _print_summary(args.output)
    return 0


@contextlib.contextmanager
def _errors_only(beam_args: Sequence[str]) -> Iterator[None]:
    """`--quiet`: Beam's and transformers' warnings are dropped too, for the run only,
    and so are those of local worker processes."""
    # transformers logs through its own handler, not the root logger's.
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        worker_processes = _runs_worker_processes(beam_args)
        with _worker_logs_dropped() if worker_processes else contextlib.nullcontext():
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _runs_worker_processes(beam_args: Sequence[str]) -> bool:
    """Whether the run starts local worker processes that share this process's stderr."""
    options = PipelineOptions(resolve_runner(beam_args))

    mode = options.view_as(DirectOptions).direct_running_mode
    return mode == "multi_processing" and runs_locally(runner_name(options))


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


def _validate(args: argparse.Namespace, _: list[str]) -> int:
    """`beam-enrich validate`: every check a run makes before reading data, and no run."""
    job = prepare_job(load_spec(args.spec), args.input, "validate-only")
    print(f"beam-enrich: {args.spec} is valid for {len(job.files)} input file(s)")
    for task in job.context.tasks:
        print(
            f"  {task.name}: {task.task} reading {', '.join(task.input_columns)} "
            f"with {task.model} @ {task.resolved_revision} -> {', '.join(task.columns)}"
        )
    return 0


def job_spec_schema() -> dict:
    """The JSON Schema of a job spec (pydantic's, draft 2020-12), for editors and validators."""
    schema = JobSpec.model_json_schema()
    schema.pop("title", None)
    return {"$schema": JSON_SCHEMA_DIALECT, "title": "beam-enrich job spec", **schema}


def _spec_schema(args: argparse.Namespace, _: list[str]) -> int:
    """`beam-enrich spec-schema`: the job spec's JSON Schema, printed or written to a file."""
    return _print_schema(job_spec_schema(), args.output, "job spec")


def _manifest_schema(args: argparse.Namespace, _: list[str]) -> int:
    """`beam-enrich manifest-schema`: manifest.json's JSON Schema, printed or written."""
    return _print_schema(manifest_schema(), args.output, "manifest")


def _print_schema(schema: dict, output: str | None, what: str) -> int:
    text = json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
    if output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as err:
        raise InputError(
            f"cannot write {output}: {err.strerror}; name a file in a folder that exists"
        ) from None
    print(f"beam-enrich: {what} schema written to {output}")
    return 0


def _download(args: argparse.Namespace, _: list[str]) -> int:
    """`beam-enrich download`: every hub model of a spec, at its pinned commit, into a cache."""
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
        folder = fetch_snapshot(model, cache)
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


def _make_test_models(args: argparse.Namespace, _: list[str]) -> int:
    """`beam-enrich make-test-models DIR`: tiny offline models for tests."""
    from transformers.utils import logging as hf_logging

    from pipelines.test_models import make_test_models

    hf_logging.disable_progress_bar()
    for task, path in make_test_models(args.directory, seed=args.seed).items():
        print(f"{task}: {path}")
    return 0


def _print_summary(output: str) -> None:
    # A runner that returns before the job ends (Dataflow without waiting) has no
    # manifest yet; then there is nothing to summarize.
    manifest = read_manifest(output)
    if manifest is None:
        return
    path = FileSystems.join(output.rstrip("/"), MANIFEST)
    failed = ", ".join(f"{task} {n}" for task, n in manifest.rows.failed.items())
    # From the job's Beam metrics, where the runner reports them: how many worker
    # processes loaded each model (once each, however many bundles they ran).
    loaded = ", ".join(
        f"{task.name} {task.model_loads}" for task in manifest.tasks if task.model_loads is not None
    )
    print(
        f"beam-enrich: {manifest.rows.out} rows written to {output} "
        f"({len(manifest.output.files)} {manifest.output.format} part file(s)); "
        f"failed rows per task: {failed}; "
        + (f"model loads per task: {loaded}; " if loaded else "")
        + f"manifest: {path}"
    )


def console_main() -> NoReturn:
    """The `beam-enrich` command (and `python -m pipelines.cli` / `pipelines.enrich`).

    Runs `main` and ends the process with its exit code, without the interpreter's
    teardown (see `exit_process`). Code that calls `main` itself (tests, notebooks)
    keeps its interpreter.
    """
    exit_process(main())


if __name__ == "__main__":
    console_main()
