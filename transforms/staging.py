"""The staging area: work items' parts, written once under final names, found again on resume.

A run's results are staged beside its output, under `files/<fingerprint>/`:

    <stem>.<first row>.parquet|csv     rows of one work item (file rows from <first row> on)
    <stem>.<first row>.errors.jsonl    those rows' task failures, when there are any
    <stem>.<first row>.done.json       the part's `PartInfo`, written last: the part is complete

`<stem>` names the work item: its input's content hash and path, and its row range, so
a resumed run of the same job (same fingerprint folder) finds a finished item by name,
even inside one large file. Each file is written once under a temporary name and
renamed into place: a retried or speculative duplicate replaces the same name with the
same content. Publishing (`pipelines.output.finalize_run`) only links or renames
these parts into `part-NNNNN-of-MMMMM.<fmt>`, in the order `PartInfo.first` gives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from transforms.chunks import Chunk, TaskCounts
from transforms.io import FORMATS, TableWriter, failure_records, write_table

__all__ = [
    "PartInfo",
    "WorkItem",
    "WriteParts",
    "check_coverage",
    "concatenate_files",
    "find_staged_parts",
    "input_key",
    "part_file_names",
    "part_sources",
    "place_parts",
]

_MIME = "application/octet-stream"
_MARKER = ".done.json"

#: Parquet row groups of a part hold about this many rows or bytes, whichever comes
#: first, however small `rows_per_chunk` is: big enough for fast scans (one footer entry
#: per row group), small enough that a writer buffers little.
_ROW_GROUP_ROWS = 65_536
_ROW_GROUP_BYTES = 64 << 20


def input_key(path: str, sha256: str) -> str:
    """An input file's identity in staged names: its content hash and a hash of its path.

    The path is part of it because `errors.jsonl` records name the input file.
    """
    return f"{sha256[:32]}-{hashlib.sha256(path.encode('utf-8')).hexdigest()[:12]}"


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """Consecutive rows of one input file, read, enriched and staged as a unit.

    Attributes:
        file_index: position of the file in the run's sorted input list.
        path: the input file.
        sha256: the file's content hash, as stored.
        first_row: the file row (0-based) the item starts at.
        rows: the item's rows; None when unknown before reading (a CSV file).
        row_groups: the Parquet row groups the item reads; None: the whole file (CSV).
        stop_row: read no further than this file row (`--limit`); None: to the end.
    """

    file_index: int
    path: str
    sha256: str
    first_row: int = 0
    rows: int | None = None
    row_groups: tuple[int, ...] | None = None
    stop_row: int | None = None

    @property
    def stem(self) -> str:
        """The item's name in the staging area: file identity and row range."""
        extent = "all" if self.rows is None else f"{self.rows:012d}"
        return f"{input_key(self.path, self.sha256)}.{self.first_row:012d}-{extent}"


@dataclasses.dataclass(frozen=True)
class PartInfo:
    """A staged part file and what is in it.

    Attributes:
        path: the staged data file.
        errors_path: the staged errors file (JSON lines), or None when no row failed.
        first: (file index, first file row): sorting parts by it gives input order.
        rows: rows written.
        rows_read: rows read from the inputs, as the reader counted them.
        failed: failed rows per task.
        stats: task name -> its counts, summed over the part's chunks.
        devices: task name -> sorted "device/dtype" strings the workers used.
        item: the stem of the work item the part belongs to.
        item_end: the part holds the item's last rows.
        summaries: the summary state of the part's rows (`transforms.summaries`),
            computed as they were written; publishing adds the parts' states up.
    """

    path: str
    errors_path: str | None
    first: tuple[int, int]
    rows: int
    rows_read: int
    failed: dict[str, int]
    stats: dict[str, TaskCounts]
    devices: dict[str, list[str]]
    item: str = ""
    item_end: bool = True
    summaries: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        """The part as JSON: the marker that says a staged file is complete."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> PartInfo:
        """The part written by `to_json`."""
        data = json.loads(text)
        data["first"] = tuple(data["first"])
        # Markers staged before the counts were a record hold [rows, failed, truncated, s].
        data["stats"] = {
            task: TaskCounts(**v) if isinstance(v, dict) else TaskCounts(*v)
            for task, v in data["stats"].items()
        }
        return cls(**data)


class _StagedPart:
    """One part being written: data under a temporary name, errors beside it."""

    def __init__(self, directory: str, schema: pa.Schema, fmt: str, chunk: Chunk, summarizer):
        self._directory = directory
        self._fmt = fmt
        self._name = f"{chunk.item}.{chunk.first_row:012d}"
        self._temporary = f"{directory}/{self._name}.{uuid.uuid4().hex[:8]}.tmp"
        self._data = TableWriter(self._temporary, schema, fmt)
        self._errors = None
        self._schema = schema
        self._pending: list[pa.Table] = []
        self._pending_rows = self._pending_bytes = 0
        self._file_index, self._first_row = chunk.file_index, chunk.first_row
        self.next_row = chunk.first_row
        self._rows = self._rows_read = 0
        self._failed: Counter = Counter()
        self._stats: dict[str, TaskCounts] = {}
        self._devices: dict[str, set] = {}
        self._summarizer = summarizer
        self._item, self._ended = chunk.item, False

    def add(self, chunk: Chunk) -> None:
        table = chunk.table
        if not table.schema.equals(self._schema):
            table = table.cast(self._schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._pending_bytes += table.nbytes
        if self._pending_rows >= _ROW_GROUP_ROWS or self._pending_bytes >= _ROW_GROUP_BYTES:
            self._flush()
        self.next_row = chunk.first_row + chunk.rows_read
        self._rows += table.num_rows
        self._rows_read += chunk.rows_read
        self._ended = chunk.item_end
        records = failure_records(chunk)
        if self._summarizer is not None:
            self._summarizer.add(table, records)
        if records:
            if self._errors is None:
                self._errors = FileSystems.create(f"{self._temporary}.errors", _MIME)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            self._errors.write(lines.encode("utf-8"))
            self._failed.update(r["task"] for r in records)
        for s in chunk.stats:
            self._stats[s.task] = self._stats.get(s.task, TaskCounts()) + s.counts
            self._devices.setdefault(s.task, set()).add(f"{s.device}/{s.dtype}")

    def _flush(self) -> None:
        if self._pending:
            table = pa.concat_tables(self._pending)
            self._data.write(table, row_group_size=max(table.num_rows, 1))
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0

    def close(self) -> PartInfo:
        """Closes the files, renames them to their final names, then writes the marker."""
        self._flush()
        self._data.close()
        final = f"{self._directory}/{self._name}"
        sources, destinations = [self._temporary], [f"{final}.{self._fmt}"]
        if self._errors is not None:
            self._errors.close()
            sources.append(f"{self._temporary}.errors")
            destinations.append(f"{final}.errors.jsonl")
        FileSystems.rename(sources, destinations)
        info = PartInfo(
            path=destinations[0],
            errors_path=destinations[1] if self._errors is not None else None,
            first=(self._file_index, self._first_row),
            rows=self._rows,
            rows_read=self._rows_read,
            failed=dict(self._failed),
            stats=dict(self._stats),
            devices={task: sorted(v) for task, v in self._devices.items()},
            item=self._item,
            item_end=self._ended,
            summaries=self._summarizer.state() if self._summarizer is not None else {},
        )
        _write_marker(f"{final}{_MARKER}", info)
        _kill_point("staged")
        return info


def _write_marker(path: str, info: PartInfo) -> None:
    temporary = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with FileSystems.create(temporary, _MIME) as handle:
        handle.write(info.to_json().encode("utf-8"))
    FileSystems.rename([temporary], [path])


class _WriteParts(beam.DoFn):
    """Streams each work item's chunks into its part, written once under its final name.

    Chunks of one item arrive in order in one bundle (read, enrich and write are fused),
    so one writer per item is open at a time in practice; the item's last chunk closes
    it. A chunk that does not continue its item's open part (an item split over bundles
    by a runner) starts a new part named by its first row: parts still sort in input
    order, and publishing checks that they cover each item exactly once.
    """

    def __init__(self, directory: str, schema: pa.Schema, fmt: str, summarizer_factory=None):
        self._directory = directory
        self._schema = schema
        self._fmt = fmt
        self._summarizer_factory = summarizer_factory

    def start_bundle(self):
        self._open: dict[str, _StagedPart] = {}

    def process(self, chunk: Chunk) -> Iterator[PartInfo]:
        part = self._open.get(chunk.item)
        if part is not None and part.next_row != chunk.first_row:
            yield self._open.pop(chunk.item).close()
            part = None
        if part is None:
            summarizer = self._summarizer_factory() if self._summarizer_factory else None
            part = self._open[chunk.item] = _StagedPart(
                self._directory, self._schema, self._fmt, chunk, summarizer
            )
        part.add(chunk)
        if chunk.item_end:
            yield self._open.pop(chunk.item).close()

    def finish_bundle(self):
        for item in sorted(self._open):
            info = self._open[item].close()
            yield GlobalWindows.windowed_value(info)
        self._open = {}


class WriteParts(beam.PTransform):
    """Writes chunks to staged parts, one per work item; yields each part's `PartInfo`.

    Args:
        directory: the staging folder of this job's fingerprint.
        schema: the output schema (input schema + task columns + `enrich_errors`).
        output_format: `parquet` or `csv`.
        summarizer_factory: makes each part's summary accumulator (`add(table,
            failures)`, `state()`; see `transforms.summaries`); None: no summaries.
    """

    def __init__(
        self, directory: str, schema: pa.Schema, *, output_format: str, summarizer_factory=None
    ):
        super().__init__()
        if output_format not in FORMATS:
            raise ValueError(f"output_format {output_format!r}: expected one of {FORMATS}")
        self._dofn = _WriteParts(directory, schema, output_format, summarizer_factory)

    def expand(self, chunks):
        return chunks | "StageParts" >> beam.ParDo(self._dofn)


def find_staged_parts(directory: str, item: WorkItem) -> list[PartInfo] | None:
    """The parts an earlier run staged for `item`, in row order, when they cover it whole.

    None when any row of the item is missing, so the item is enriched again.
    """
    pattern = FileSystems.join(directory, f"{item.stem}.*{_MARKER}")
    try:
        (result,) = FileSystems.match([pattern])
    except Exception:  # nothing staged under that name: Beam raises for an empty match
        return None
    parts = []
    for metadata in result.metadata_list:
        with FileSystems.open(metadata.path, _MIME) as handle:
            info = PartInfo.from_json(handle.read().decode("utf-8"))
        paths = [info.path] + ([info.errors_path] if info.errors_path else [])
        if not all(FileSystems.exists(path) for path in paths):
            return None
        parts.append(dataclasses.replace(info, first=(item.file_index, info.first[1])))
    parts.sort(key=lambda part: part.first)
    if not parts or _coverage_gap(parts, item.first_row, item.rows):
        return None
    return parts


def _coverage_gap(parts: Sequence[PartInfo], first_row: int, rows: int | None) -> str | None:
    """Why `parts` (sorted) do not hold rows `first_row`.. of one item exactly once, or None."""
    expected = first_row
    for part in parts:
        if part.first[1] != expected:
            what = "missing" if part.first[1] > expected else "written twice"
            return f"rows from {min(expected, part.first[1])} on are {what}"
        expected += part.rows_read
    if rows is not None and expected != first_row + rows:
        return f"{first_row + rows - expected} row(s) at the end are missing"
    if parts and not parts[-1].item_end:
        return f"rows after {expected} are missing"
    return None


def check_coverage(parts: Iterable[PartInfo], items: Iterable[dict]) -> None:
    """Checks that the parts hold every planned work item's rows exactly once.

    Args:
        parts: every part of the run, written or reused.
        items: the planned items: `{"stem", "first_row", "rows"}` (`rows` None: unknown).

    Raises:
        RuntimeError: an item's rows are missing or written twice, or a part belongs
            to no planned item.
    """
    by_item: dict[str, list[PartInfo]] = {}
    for part in parts:
        by_item.setdefault(part.item, []).append(part)
    for item in items:
        found = sorted(by_item.pop(item["stem"], []), key=lambda part: part.first)
        # An item no part holds is an empty one (a CSV file's rows are unknown before
        # reading; a Parquet item with rows always yields a part).
        if not found and not item["rows"]:
            continue
        gap = _coverage_gap(found, item["first_row"], item["rows"])
        if gap:
            raise RuntimeError(f"work item {item['stem']}: {gap}; run again")
    if by_item:
        raise RuntimeError(f"parts of unplanned work items {sorted(by_item)}; run again")


def part_sources(
    parts: Sequence[PartInfo], scratch: str, output_format: str, schema: pa.Schema
) -> list[str]:
    """The staged data files of the output, in input order (`parts` sorted by `first`).

    No parts (no rows) still give a readable output with the full schema: one empty
    part, written into `scratch` (the run's own folder, which publishing moves in or
    deletes).
    """
    if parts:
        return [part.path for part in parts]
    if not FileSystems.exists(scratch):
        FileSystems.mkdirs(scratch)
    empty = FileSystems.join(scratch, f"empty.{output_format}")
    write_table(empty, schema.empty_table(), output_format)
    return [empty]


def part_file_names(directory: str, count: int, output_format: str) -> list[str]:
    """`part-NNNNN-of-MMMMM.<fmt>` in `directory`, one per part."""
    return [
        FileSystems.join(directory, f"part-{i:05d}-of-{count:05d}.{output_format}")
        for i in range(count)
    ]


def place_parts(
    sources: Sequence[str], directory: str, output_format: str, *, scratch: str | None = None
) -> list[str]:
    """Puts the staged parts into `directory` under their part names; returns the names.

    Local folders get hard links (the staged parts stay for a later `--resume`; no data
    is copied), or a copy where links fail; a part made in `scratch` is moved. Object
    stores cannot link: the parts are copied there.
    """
    names = part_file_names(directory, len(sources), output_format)
    if "://" in directory:
        FileSystems.copy(list(sources), names)
        return names
    for source, name in zip(sources, names, strict=True):
        if scratch and os.path.normpath(os.path.dirname(source)) == os.path.normpath(scratch):
            os.replace(source, name)
            continue
        try:
            os.link(source, name)
        except OSError:
            shutil.copyfile(source, name)
    return names


def concatenate_files(sources: Sequence[str], destination: str) -> None:
    """Copies files one after another into `destination`, a block at a time."""
    with FileSystems.create(destination, _MIME) as out:
        for source in sources:
            with FileSystems.open(source, _MIME) as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    out.write(block)


_KILL_COUNTS: Counter = Counter()


def _kill_point(name: str) -> None:
    # Crash-test hook: `BEAM_ENRICH_KILL_AT=<name>:<n>` SIGKILLs this process the n-th
    # time it reaches `name` (`staged`: a part is staged; `assembled`, `swapping`: see
    # `pipelines.output.finalize_run`). Unset (always, outside tests), it does nothing.
    wanted = os.environ.get("BEAM_ENRICH_KILL_AT")
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point == name:
        _KILL_COUNTS[name] += 1
        if _KILL_COUNTS[name] >= int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
