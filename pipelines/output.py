"""The output folder: checked before a run, locked while it runs, replaced at its end.

A run replaces the whole folder and `manifest.json` is written last, after every part
file has its final name: its presence marks a complete output, the way `_SUCCESS` does
for Hadoop and Spark jobs. Locally the new output takes the folder's name by a rename,
so a killed run leaves the previous output or nothing.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence

from apache_beam.io.filesystems import FileSystems

from pipelines.manifest import (
    ERRORS_FILE,
    MANIFEST,
    InputRecord,
    Manifest,
    RunContext,
    build_manifest,
    read_manifest,
    staging_root,
)
from pipelines.report import REPORT, write_report
from transforms.io import InputError
from transforms.staging import (
    PartInfo,
    _kill_point,
    check_coverage,
    concatenate_files,
    part_file_names,
    part_sources,
    place_parts,
)
from transforms.summaries import merge_summaries

__all__ = [
    "check_output",
    "finalize_run",
    "lock_output",
    "output_state",
    "prepare_output",
    "published_run_id",
    "record_model_loads",
]

_MIME = "application/octet-stream"
_LOCK = "lock"
# Object stores only: written before a publish deletes the old output, removed after.
_PUBLISHING = "publishing"
_PART_FILE = re.compile(r"part-\d{5,}-of-\d{5,}\.(?:parquet|csv)")
_LOG = logging.getLogger(__name__)


def _existing_outputs(output: str) -> list[str]:
    names = (MANIFEST, ERRORS_FILE, REPORT, "part-*")
    patterns = [FileSystems.join(output, name) for name in names]
    found = []
    for result in FileSystems.match(patterns):
        found.extend(m.path for m in result.metadata_list if _own_name(m.path.rsplit("/", 1)[-1]))
    # The old manifest goes first: from then on the folder is no longer marked complete.
    return sorted(found, key=lambda path: not path.endswith(MANIFEST))


def _is_local(path: str) -> bool:
    return "://" not in path


def _own_name(name: str) -> bool:
    """Whether beam-enrich writes a file of this name into an output folder."""
    return name in (MANIFEST, ERRORS_FILE, REPORT) or bool(_PART_FILE.fullmatch(name))


def check_output(output: str, inputs: Sequence[str] = ()) -> str:
    """Checks `--output` before any model loads; returns the folder the run writes.

    A run replaces the whole folder, so the folder must be new, empty, or an earlier
    beam-enrich output holding nothing else, and must not contain an input file or the
    working folder. A local symlink stands for its target: the run publishes into the
    target and the link stays.

    Args:
        output: `--output` as given.
        inputs: the input files, as `expand_inputs` lists them.

    Returns:
        The output folder: `output` without a trailing `/`, or a symlink's target.

    Raises:
        InputError: the output cannot be written there, or a run would delete something
            beam-enrich did not write.
    """
    output = output.rstrip("/") or "/"
    if _is_local(output):
        if os.path.islink(output):
            output = os.path.realpath(output)
        _check_local_location(output, inputs)
    else:
        for path in inputs:
            if path.startswith(output + "/"):
                raise InputError(
                    f"--output {output} contains input file {path} and a run replaces the "
                    "whole folder; name an output folder outside the inputs"
                )
    _check_replaceable(output)
    return output


def _check_local_location(output: str, inputs: Sequence[str]) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise InputError(f"--output {output} is a file; name a folder (new or earlier output)")
    real = os.path.realpath(output)
    inside = [("the working folder", os.getcwd())]
    inside += [(f"input file {path}", path) for path in inputs if _is_local(path)]
    for label, path in inside:
        if os.path.commonpath([real, os.path.realpath(path)]) == real:
            raise InputError(
                f"--output {output} is or contains {label} and a run replaces the whole "
                "folder; name an output folder outside the inputs and the working folder"
            )
    # The staging folder goes beside the output and the output is renamed: the nearest
    # existing folder above it must be writable.
    existing = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(
            f"--output {output}: {existing} is a file, not a folder; name a path under folders"
        )
    for folder in (existing, output):
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(
                f"--output {output}: the folder {folder} is not writable; name a folder you "
                "can write to, or fix its permissions"
            )


def _check_replaceable(output: str) -> None:
    """Refuses an output folder holding anything beam-enrich did not write."""
    names = _entries(output)
    if not names:
        return
    foreign = sorted(name for name in names if not _own_name(name))
    own_manifest = MANIFEST in names and _own_manifest(output) is not None
    if not foreign and (own_manifest or (MANIFEST not in names and _publish_began(output))):
        return  # an earlier output, or one whose publish on an object store was cut short
    shown = sorted(foreign or names)
    listing = ", ".join(shown[:5]) + (", …" if len(shown) > 5 else "")
    if own_manifest:
        raise InputError(
            f"--output {output} is an earlier beam-enrich output but also holds {listing}, "
            "which a run would delete (it replaces the whole folder); move them out of the "
            "folder or name another output folder"
        )
    why = "its manifest.json is not beam-enrich's" if MANIFEST in names else "no manifest.json"
    raise InputError(
        f"--output {output} is not an earlier beam-enrich output ({why}) and holds {listing}; "
        "a run replaces the whole folder, so name a new or empty folder, or an earlier run's "
        "output"
    )


def _entries(output: str) -> list[str]:
    """The names in the output folder; sub-folders end with `/`, links with `@`."""
    if _is_local(output):
        if not os.path.isdir(output):
            return []
        names = []
        with os.scandir(output) as entries:
            for entry in entries:
                # beam-enrich writes plain files only: a folder or a link is foreign.
                if entry.is_symlink():
                    names.append(f"{entry.name}@")
                elif entry.is_dir():
                    names.append(f"{entry.name}/")
                else:
                    names.append(entry.name)
        return names
    try:
        (result,) = FileSystems.match([FileSystems.join(output, "**")])
    except Exception as err:
        raise InputError(
            f"cannot list --output {output} ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]}); check the path and your access to it"
        ) from err
    names = set()
    for metadata in result.metadata_list:
        relative = metadata.path[len(output) :].lstrip("/")
        if relative:
            head, slash, _ = relative.partition("/")
            names.add(head + slash)
    return sorted(names)


def _own_manifest(output: str) -> dict | None:
    """The output's manifest if beam-enrich wrote it (judged by the keys it always has)."""
    try:
        with FileSystems.open(FileSystems.join(output, MANIFEST)) as handle:
            data = json.loads(handle.read())
    except Exception:  # missing, unreadable or not JSON: not an output of ours
        return None
    if not isinstance(data, dict):
        return None
    output_entry, found = data.get("output"), data.get("versions")
    if (
        isinstance(data.get("run_id"), str)
        and isinstance(data.get("fingerprint"), str)
        and isinstance(output_entry, dict)
        and "path" in output_entry
        and isinstance(found, dict)
        and "beam-enrich" in found
    ):
        return data
    return None


def _publish_began(output: str) -> bool:
    # Object stores publish file by file: a run cut short there leaves part files and
    # no manifest, and this marker says that they are beam-enrich's.
    return FileSystems.exists(FileSystems.join(staging_root(output), _PUBLISHING))


def published_run_id(output: str) -> str | None:
    """The run id of the complete beam-enrich output in `output`; None when there is none."""
    try:
        manifest = _own_manifest(output.rstrip("/") or "/")
    except Exception:
        return None
    return manifest["run_id"] if manifest else None


def output_state(output: str, previous_run_id: str | None) -> str:
    """What a failed or interrupted run left in `output`, in words, for its last message.

    Args:
        output: `--output` as given.
        previous_run_id: `published_run_id(output)` before the run.
    """
    current = published_run_id(output)
    if current is not None and current == previous_run_id:
        return f"the previous output in {output} is unchanged"
    if current is not None:
        return f"the new output in {output} is complete (run {current})"
    if not _is_local(output) and previous_run_id is not None:
        return (
            f"{output} holds no complete output (the previous one was being replaced and "
            "has no manifest.json); run again"
        )
    if previous_run_id is not None:
        return (
            f"{output} is missing: the previous output was moved aside and the next run "
            "puts it back"
        )
    if not _is_local(output):
        return f"no manifest was written to {output}, so it holds no complete output"
    return f"nothing was written to {output}"


@contextlib.contextmanager
def lock_output(output: str, run_id: str) -> Iterator[None]:
    """Holds the output's lock while a run works on it; a second run on it is refused.

    Local outputs: `lock` in the staging folder, held with `flock`, which the kernel
    releases when the process ends, however it ends: a killed run's lock never blocks
    the next. Object stores have no locks: there a lock file is checked and written
    (best effort: two runs starting at the same moment can both proceed).

    Raises:
        InputError: another run holds the lock; its run id, pid and host are named.
    """
    output = output.rstrip("/") or "/"
    holder = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname()}
    path = FileSystems.join(staging_root(output), _LOCK)
    if _is_local(output):
        with _local_lock(output, path, holder):
            yield
        return
    if FileSystems.exists(path):
        other = _read_lock(path)
        if not _dead_here(other):
            raise InputError(
                f"--output {output} is being written by another run ({_describe(other)}); "
                f"wait for it to end, or name another output; if no run is writing it, "
                f"delete {path}"
            )
    _write_json(path, holder)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            FileSystems.delete([path])


@contextlib.contextmanager
def _local_lock(output: str, path: str, holder: dict) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs there are not locked
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_lock(path)
            os.close(fd)
            raise InputError(
                f"--output {output} is being written by another run ({_describe(other)}); "
                "wait for it to end, or name another output"
            ) from None
        except OSError:
            os.close(fd)
            _LOG.warning("beam-enrich: %s cannot be locked on this filesystem", path)
            yield
            return
        # The holder before us may have deleted the file between our open and flock.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode("utf-8"))
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))  # only if empty: a job that could not start
        os.close(fd)


def _read_lock(path: str) -> dict:
    try:
        with FileSystems.open(path) as handle:
            data = json.loads(handle.read())
    except Exception:  # just created, not yet written
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder.get("run_id"):
        return "one that is starting"
    return f"run id {holder['run_id']}, pid {holder.get('pid')} on {holder.get('host')}"


def _dead_here(holder: dict) -> bool:
    """Whether the lock's holder ran on this host and its process is gone."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, and someone else's
        return False
    return False


def prepare_output(context: RunContext, *, resume: bool) -> None:
    """Readies the output's name for a run, on the driver, before any row is read.

    Puts back a previous output that a run killed mid-swap had moved aside, and deletes
    what crashed runs left staged (all of it, or with `resume` only the results staged
    under other fingerprints). Call it after `check_output`, holding `lock_output`.
    """
    output, root = context.output, context.staging_root
    if not _is_local(output):
        if not resume:
            keep = {FileSystems.join(root, name) for name in (_LOCK, _PUBLISHING)}
            _delete_tree(root, keep=keep)
        return
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
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:  # a killed run's input listing
            with contextlib.suppress(OSError):
                os.unlink(path)


def _delete_tree(path: str, *, keep: set[str] = frozenset()) -> None:
    matched = FileSystems.match([FileSystems.join(path, "**")])[0].metadata_list
    doomed = [m.path for m in matched if m.path not in keep]
    if doomed:
        FileSystems.delete(doomed)


def finalize_run(collected: list[tuple[str, object]], context: RunContext) -> Manifest:
    """Publishes the staged parts as the complete output, with errors.jsonl and manifest.json.

    Parts are only linked or renamed into `part-NNNNN-of-MMMMM.<fmt>`, sorted into input
    order; the only data written here is `errors.jsonl` (the parts' error files, joined).
    On a local filesystem the output is assembled in `staging_dir` and swapped in by two
    directory renames, so at every instant the output's name holds the previous complete
    output, nothing, or the new complete output. On object stores (no atomic directory
    rename) the previous output's manifest is deleted first and the new one written
    last, so the manifest's presence still marks a complete output.

    Args:
        collected: `("part", PartInfo)` for every staged part, written or reused, and
            `("input", record)` for every input file (path, size, sha256, its items).
        context: the run.

    Returns:
        The manifest, as written.

    Raises:
        RuntimeError: the parts do not hold every input row exactly once.
    """
    parts = sorted((v for kind, v in collected if kind == "part"), key=lambda part: part.first)
    records = sorted((v for kind, v in collected if kind == "input"), key=lambda r: r["index"])
    check_coverage(parts, [item for record in records for item in record["items"]])
    inputs = [
        InputRecord(
            path=record["path"],
            size=record["size"],
            sha256=record["sha256"],
            reused=bool(record["items"]) and record["reused_items"] == len(record["items"]),
            work_items=len(record["items"]),
            reused_work_items=record["reused_items"],
        )
        for record in records
    ]
    if _is_local(context.output):
        return _publish_local(parts, inputs, context)
    return _publish_remote(parts, inputs, context)


def _publish_local(
    parts: list[PartInfo], inputs: list[InputRecord], context: RunContext
) -> Manifest:
    build = context.staging_dir
    os.makedirs(build, exist_ok=True)
    sources = part_sources(parts, build, context.output_format, context.output_schema)
    place_parts(sources, build, context.output_format, scratch=build)
    concatenate_files(
        [part.errors_path for part in parts if part.errors_path],
        os.path.join(build, ERRORS_FILE),
    )
    final = part_file_names(context.output, len(sources), context.output_format)
    manifest = _add_report(build_manifest(parts, inputs, final, context), parts, context, build)
    _write_json(os.path.join(build, MANIFEST), manifest.to_json())
    _kill_point("assembled")
    # The swap: two renames, each atomic. In between, the name holds nothing; a run
    # killed there has its previous output put back by the next run (prepare_output).
    previous = os.path.join(context.staging_root, f"previous-{context.run_id}")
    if os.path.exists(context.output):
        os.rename(context.output, previous)
    try:
        _kill_point("swapping")
        os.rename(build, context.output)
    except BaseException:
        # Interrupted (Ctrl-C) or the rename failed: the previous output goes back now.
        if os.path.exists(previous) and not os.path.exists(context.output):
            os.rename(previous, context.output)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    # The staged parts stay (hard links to the output's parts, so no second copy): a
    # later `--resume` of the same job reuses final results too. A run without
    # --resume, or of another job, deletes them first.
    with contextlib.suppress(OSError):
        os.unlink(context.listing_path)
        os.rmdir(os.path.join(context.staging_root, "runs"))
    return manifest


def _publish_remote(
    parts: list[PartInfo], inputs: list[InputRecord], context: RunContext
) -> Manifest:
    # Best effort: object stores rename object by object.
    sources = part_sources(parts, context.staging_dir, context.output_format, context.output_schema)
    old = _existing_outputs(context.output)
    # From here until the new manifest is written, the output holds part files and no
    # manifest: the marker tells the next run's check_output that they are ours.
    _write_json(FileSystems.join(context.staging_root, _PUBLISHING), {"run": context.run_id})
    if old:
        FileSystems.delete(old)
    final = place_parts(sources, context.output, context.output_format)
    concatenate_files(
        [part.errors_path for part in parts if part.errors_path],
        FileSystems.join(context.output, ERRORS_FILE),
    )
    manifest = _add_report(
        build_manifest(parts, inputs, final, context), parts, context, context.output
    )
    temporary = FileSystems.join(context.staging_dir, MANIFEST)
    _write_json(temporary, manifest.to_json())
    FileSystems.rename([temporary], [FileSystems.join(context.output, MANIFEST)])
    _delete_tree(context.staging_root, keep={FileSystems.join(context.staging_root, _LOCK)})
    return manifest


def _add_report(
    manifest: Manifest, parts: list[PartInfo], context: RunContext, folder: str
) -> Manifest:
    """The manifest with each task's output summary and the failures by error type, after
    writing the run report (`report.html`) made from it into `folder`."""
    path = FileSystems.join(folder, REPORT)
    try:
        # Made while the parts were written: the output is not read again. The summaries
        # take the task descriptions as JSON data, as the workers got them.
        summaries, failed_by_type = merge_summaries(
            [task.model_dump(mode="json") for task in context.tasks],
            [part.summaries for part in parts],
        )
        manifest = manifest.model_copy(
            update={
                "tasks": [
                    task.model_copy(update={"summary": summaries[task.name]})
                    for task in manifest.tasks
                ],
                "failed_by_type": failed_by_type,
                "output": manifest.output.model_copy(
                    update={"report": FileSystems.join(context.output, REPORT)}
                ),
            }
        )
        write_report(path, manifest.to_json())
    except Exception:
        # The report never fails the run: the output is complete without it, so the
        # error is logged, the manifest says `"report": null` and the run publishes.
        _LOG.exception("beam-enrich: the run report could not be made; publishing without it")
        with contextlib.suppress(Exception):
            if FileSystems.exists(path):
                FileSystems.delete([path])
        return manifest.model_copy(
            update={"output": manifest.output.model_copy(update={"report": None})}
        )
    return manifest


def record_model_loads(output: str, loads: Mapping[str, int] | None) -> None:
    """Adds each task's model loads to the published manifest, on the driver.

    The loads are known from the job's metrics once the job has ended, after its last
    step wrote the manifest; the new manifest replaces the old one by a rename, so the
    output stays marked complete throughout. Call it holding `lock_output`. Nothing
    changes when `loads` is None (a runner without metrics) or there is no manifest (a
    runner that returned before the job ended); a failure is logged, never raised: the
    output is complete without the counts.
    """
    if loads is None:
        return
    try:
        manifest = read_manifest(output)
        if manifest is None:
            return
        # Beside the output, on the same filesystem: the rename is atomic locally.
        temporary = FileSystems.join(staging_root(output), MANIFEST)
        _write_json(temporary, manifest.with_model_loads(loads).to_json())
        FileSystems.rename([temporary], [FileSystems.join(output, MANIFEST)])
    except Exception:
        _LOG.warning("beam-enrich: the manifest could not record model loads", exc_info=True)


def _write_json(path: str, data: dict) -> None:
    with FileSystems.create(path, _MIME) as handle:
        handle.write(json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
