"""The run manifest, and the last step of a run: staged parts become the output.

`manifest.json` is written last, after every part file has its final name: its
presence marks a complete output, the way `_SUCCESS` does for Hadoop and Spark jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import glob
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
from collections import Counter
from collections.abc import Sequence

import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from pipelines.report import REPORT, summarize_output, write_report
from transforms.io import (
    InputError,
    PartInfo,
    concatenate_files,
    concatenate_parts,
    kill_point,
    staged_parts,
    write_table,
)

__all__ = [
    "ERRORS_FILE",
    "MANIFEST",
    "RunContext",
    "finalize_run",
    "input_key",
    "prepare_output",
    "redact",
    "reusable_parts",
    "spec_fingerprint",
    "versions",
]

MANIFEST = "manifest.json"
ERRORS_FILE = "errors.jsonl"
_MIME = "application/octet-stream"
_STAGING_SUFFIX = ".beam-enrich"
_SECRET = re.compile(r"token|secret|password|passwd|credential|api_?key|private_key", re.I)
_LOG = logging.getLogger(__name__)


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
        fingerprint: `spec_fingerprint` of this job: staged results carry it.
        reused: parts of input files reused from an interrupted run (`--resume`).
        csv_neutralize_formulas: string cells that start like a formula were prefixed
            with `'` in the CSV output (`--csv-neutralize-formulas`).
        limit: the run covers only the first `limit` input rows (`--limit`); None: all.
        rows_total: the rows this run enriches (inputs reused by `--resume` left out),
            for progress; None when unknown (inputs on remote filesystems).
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
    fingerprint: str = ""
    reused: tuple[PartInfo, ...] = ()
    csv_neutralize_formulas: bool = False
    limit: int | None = None
    rows_total: int | None = None

    @property
    def staging_root(self) -> str:
        """`.<name>.beam-enrich` beside the output: hidden, and never mistaken for it."""
        head, tail = FileSystems.split(self.output)
        return FileSystems.join(head, f".{tail}{_STAGING_SUFFIX}")

    @property
    def files_dir(self) -> str:
        """Where each input file's results are staged, per fingerprint (resumable)."""
        return FileSystems.join(self.staging_root, "files", self.fingerprint or "none")

    @property
    def staging_dir(self) -> str:
        """Where this run assembles its complete output before it takes the output's name."""
        return FileSystems.join(self.staging_root, "runs", self.run_id)

    @property
    def part_names(self) -> dict[int, str]:
        """Input file index -> stem of its staged part: names the input's path and content."""
        return {i: input_key(entry["path"], entry["sha256"]) for i, entry in enumerate(self.inputs)}


def input_key(path: str, sha256: str) -> str:
    """The stem of an input file's staged results: its content hash and a hash of its path.

    The path is part of the key because `errors.jsonl` records name the input file.
    """
    return f"{sha256[:32]}-{hashlib.sha256(path.encode('utf-8')).hexdigest()[:12]}"


def spec_fingerprint(
    spec: dict,
    tasks: Sequence[dict],
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
        "models": [[t["name"], t["model"], t["resolved_revision"]] for t in tasks],
        "output_format": output_format,
        "output_schema": output_schema.to_string(show_schema_metadata=False),
        "versions": versions(),
    }
    if limit is not None:  # absent when unlimited: full runs keep their fingerprints
        payload["limit"] = limit
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _existing_outputs(output: str) -> list[str]:
    names = (MANIFEST, ERRORS_FILE, REPORT, "part-*")
    patterns = [FileSystems.join(output, name) for name in names]
    found = []
    for result in FileSystems.match(patterns):
        found.extend(m.path for m in result.metadata_list)
    # The old manifest goes first: from then on the folder is no longer marked complete.
    return sorted(found, key=lambda path: not path.endswith(MANIFEST))


def _is_local(path: str) -> bool:
    return "://" not in path


def _own_name(name: str) -> bool:
    return name in (MANIFEST, ERRORS_FILE, REPORT, "_temporary") or name.startswith("part-")


def prepare_output(context: RunContext, *, resume: bool) -> None:
    """Readies the output's name for a run, on the driver, before any row is read.

    Puts back a previous output that a run killed mid-swap had moved aside, deletes
    what crashed runs left staged (all of it, or with `resume` only the results staged
    under other fingerprints), and refuses an output folder that holds files beam-enrich
    did not write, since a run replaces the whole folder.

    Raises:
        InputError: `--output` is a file, or a folder holding other files.
    """
    output, root = context.output, context.staging_root
    if not _is_local(output):
        if not resume:
            _delete_tree(root)
        return
    if os.path.exists(output):
        if not os.path.isdir(output):
            raise InputError(f"--output {output} is a file; name a folder (new or earlier output)")
        names = os.listdir(output)
        foreign = sorted(name for name in names if not _own_name(name))
        if foreign and MANIFEST not in names:
            raise InputError(
                f"--output {output} holds files beam-enrich did not write "
                f"({', '.join(foreign[:5])}{', …' if len(foreign) > 5 else ''}) and a run "
                "replaces the whole folder; name a new folder or an earlier run's output"
            )
    if not os.path.isdir(root):
        return
    previous = sorted(glob.glob(os.path.join(glob.escape(root), "previous-*")))
    if previous and not os.path.exists(output):
        os.rename(previous[-1], output)  # killed between the swap's two renames
    stale = glob.glob(os.path.join(glob.escape(root), "previous-*"))
    stale += glob.glob(os.path.join(glob.escape(root), "runs", "*"))
    files = os.path.join(root, "files")
    if os.path.isdir(files):
        stale += [
            os.path.join(files, name)
            for name in os.listdir(files)
            if not (resume and name == context.fingerprint)
        ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def reusable_parts(context: RunContext) -> dict[int, PartInfo]:
    """Input file index -> its results staged by an earlier run of the same job."""
    return staged_parts(context.files_dir, context.part_names)


def _delete_tree(path: str) -> None:
    matched = FileSystems.match([FileSystems.join(path, "**")])[0].metadata_list
    if matched:
        FileSystems.delete([m.path for m in matched])


def finalize_run(parts: list[PartInfo], context: RunContext) -> dict:
    """Assembles the complete output (parts, errors.jsonl, manifest.json) and publishes it.

    On a local filesystem the output is assembled in `staging_dir` and swapped in by two
    directory renames, so at every instant the output's name holds the previous complete
    output, nothing, or the new complete output. On object stores (no atomic directory
    rename) the previous output's manifest is deleted first and the new one written
    last, so the manifest's presence still marks a complete output.

    Returns:
        The manifest, as written.
    """
    parts = sorted([*parts, *context.reused], key=lambda part: part.first)
    if _is_local(context.output):
        manifest = _publish_local(parts, context)
    else:
        manifest = _publish_remote(parts, context)
    return manifest


def _part_sources(parts: list[PartInfo], context: RunContext) -> list[str]:
    """The staged data files, one per final part file."""
    fmt = context.output_format
    if not parts or (context.spec.get("keep_order") and len(parts) > 1):
        # No rows still gives a readable output with the full schema; keep_order gives
        # one file, the per-file parts in input order.
        if not FileSystems.exists(context.files_dir):
            FileSystems.mkdirs(context.files_dir)
        merged = FileSystems.join(context.files_dir, f"merged-{context.run_id}.{fmt}")
        if parts:
            concatenate_parts([part.path for part in parts], merged, fmt, context.output_schema)
        else:
            write_table(merged, context.output_schema.empty_table(), fmt)
        return [merged]
    return [part.path for part in parts]


def _final_names(directory: str, count: int, fmt: str) -> list[str]:
    return [FileSystems.join(directory, f"part-{i:05d}-of-{count:05d}.{fmt}") for i in range(count)]


def _publish_local(parts: list[PartInfo], context: RunContext) -> dict:
    build = context.staging_dir
    os.makedirs(build, exist_ok=True)
    sources = _part_sources(parts, context)
    names = _final_names(build, len(sources), context.output_format)
    for source, name in zip(sources, names, strict=True):
        try:  # staged results stay until the swap is done, for a resumed run
            os.link(source, name)
        except OSError:
            shutil.copyfile(source, name)
    concatenate_files(
        [part.errors_path for part in parts if part.errors_path],
        os.path.join(build, ERRORS_FILE),
    )
    final = _final_names(context.output, len(sources), context.output_format)
    manifest = _manifest(parts, final, context)
    _add_report(manifest, parts, context, os.path.join(build, REPORT))
    _write_json(os.path.join(build, MANIFEST), manifest)
    kill_point("assembled")
    # The swap: two renames, each atomic. In between, the name holds nothing; a run
    # killed there has its previous output put back by the next run (prepare_output).
    previous = os.path.join(context.staging_root, f"previous-{context.run_id}")
    if os.path.exists(context.output):
        os.rename(context.output, previous)
    kill_point("swapping")
    os.rename(build, context.output)
    shutil.rmtree(previous, ignore_errors=True)
    # The staged per-file results stay (hard links to the parts, so no second copy
    # unless keep_order merged them): a later `--resume` of the same job reuses final
    # results too. A run without --resume, or of another job, deletes them first.
    with contextlib.suppress(OSError):
        os.rmdir(os.path.join(context.staging_root, "runs"))
    return manifest


def _publish_remote(parts: list[PartInfo], context: RunContext) -> dict:
    # Best effort: object stores rename object by object.
    sources = _part_sources(parts, context)
    old = _existing_outputs(context.output)
    if old:
        FileSystems.delete(old)
    final = _final_names(context.output, len(sources), context.output_format)
    FileSystems.copy(sources, final)
    concatenate_files(
        [part.errors_path for part in parts if part.errors_path],
        FileSystems.join(context.output, ERRORS_FILE),
    )
    manifest = _manifest(parts, final, context)
    _add_report(manifest, parts, context, FileSystems.join(context.output, REPORT))
    temporary = FileSystems.join(context.staging_dir, MANIFEST)
    _write_json(temporary, manifest)
    FileSystems.rename([temporary], [FileSystems.join(context.output, MANIFEST)])
    _delete_tree(context.staging_root)
    return manifest


def _add_report(manifest: dict, parts: list[PartInfo], context: RunContext, path: str) -> None:
    """Adds each task's output summary and the failures by error type to the manifest,
    and writes the run report (`report.html`) made from it to `path`."""
    manifest["output"]["report"] = None
    try:
        summaries, failed_by_type = summarize_output(
            [part.path for part in parts],
            [part.errors_path for part in parts if part.errors_path],
            context.tasks,
            context.output_schema,
            context.output_format,
        )
        for task in manifest["tasks"]:
            task["summary"] = summaries[task["name"]]
        manifest["failed_by_type"] = failed_by_type
        manifest["output"]["report"] = FileSystems.join(context.output, REPORT)
        write_report(path, manifest)
    except Exception:
        # The report never fails the run: the output is complete without it, so the
        # error is logged, the manifest says `"report": null` and the run publishes.
        _LOG.exception("beam-enrich: the run report could not be made; publishing without it")
        manifest["output"]["report"] = None
        with contextlib.suppress(Exception):
            if FileSystems.exists(path):
                FileSystems.delete([path])


def _write_json(path: str, data: dict) -> None:
    with FileSystems.create(path, _MIME) as handle:
        handle.write(json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")


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

    rows_per_part = [part.rows for part in parts]
    if len(rows_per_part) != len(final):  # keep_order merged them into one file
        rows_per_part = [sum(rows_per_part)]
    reused = {part.first[0] for part in context.reused}
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
        "fingerprint": context.fingerprint,
        # `reused`: the file's results came from an interrupted run (`--resume`).
        "inputs": [{**entry, "reused": i in reused} for i, entry in enumerate(context.inputs)],
        "output": {
            "path": context.output,
            "format": context.output_format,
            "csv_neutralize_formulas": context.csv_neutralize_formulas,
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
            "limit": context.limit,
            "out": rows_out,
            "failed": {task["name"]: failed.get(task["name"], 0) for task in context.tasks},
        },
        "tasks": tasks,
        "spec": context.spec,
        "versions": versions(),
    }
