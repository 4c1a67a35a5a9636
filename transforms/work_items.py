"""ReadTables: input listing -> work items planned on workers -> spread -> table chunks.

The launcher lists the inputs (paths and sizes, metadata only) into a small JSON-lines
file; the pipeline starts from that file, so the job graph does not grow with the
number of inputs. Workers hash each file (its identity for `--resume` and the
manifest), plan its work items from the Parquet footer, and reuse the parts of items an
earlier run of the same job finished. The items, small descriptors, are reshuffled so
that one large file spreads over every worker; then each item is read as chunks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.chunks import Chunk
from transforms.io import (
    InputError,
    file_sha256,
    iter_tables,
    parquet_metadata,
    read_schema,
    table_format,
)
from transforms.staging import WorkItem, find_staged_parts

__all__ = ["DEFAULT_WORK_ITEM_BYTES", "ReadTables", "plan_work_items", "write_listing"]

_MIME = "application/octet-stream"

#: Target size of a Parquet work item, in compressed row-group bytes: large enough that
#: per-item costs (a footer read, a part file, a marker) vanish, small enough that a
#: 1 GB file spreads over 16 workers and a killed run loses little on `--resume`.
DEFAULT_WORK_ITEM_BYTES = 64 << 20


def write_listing(path: str, files: Sequence[tuple[str, int]]) -> None:
    """Writes the input listing, one `{"index", "path", "size"}` JSON line per file."""
    lines = (
        json.dumps({"index": i, "path": name, "size": size}, ensure_ascii=False) + "\n"
        for i, (name, size) in enumerate(files)
    )
    with FileSystems.create(path, _MIME) as handle:
        handle.write("".join(lines).encode("utf-8"))


def _read_listing(path: str) -> Iterator[dict]:
    with FileSystems.open(path, _MIME) as handle:
        for line in handle.read().decode("utf-8").splitlines():
            if line:
                yield json.loads(line)


def plan_work_items(
    file_index: int,
    path: str,
    sha256: str,
    *,
    work_item_bytes: int = DEFAULT_WORK_ITEM_BYTES,
    stop_row: int | None = None,
) -> list[WorkItem]:
    """One input file's work items, in row order.

    A Parquet file becomes items of whole row groups, about `work_item_bytes` of
    compressed data each (at least one row group per item), from its footer. A CSV
    file is one item: a quoted cell may hold newlines, so no byte offset is known to
    start a row.

    Args:
        file_index: the file's position in the sorted input list.
        path: the input file.
        sha256: its content hash.
        work_item_bytes: target compressed size of a Parquet item.
        stop_row: read no row from this file row on (`--limit`); None: all rows.

    Raises:
        InputError: the Parquet footer cannot be read.
    """
    if table_format(path) != "parquet":
        return [WorkItem(file_index, path, sha256, stop_row=stop_row)]
    metadata = parquet_metadata(path)
    items: list[WorkItem] = []
    groups: list[int] = []
    first = row = size = 0
    end = metadata.num_rows if stop_row is None else min(stop_row, metadata.num_rows)

    def close() -> None:
        if groups and row > first:
            rows = min(row, end) - first
            items.append(WorkItem(file_index, path, sha256, first, rows, tuple(groups), stop_row))

    for index in range(metadata.num_row_groups):
        if row >= end:
            break
        group = metadata.row_group(index)
        if groups and size + _compressed_size(group) > work_item_bytes:
            close()
            groups, first, size = [], row, 0
        groups.append(index)
        size += _compressed_size(group)
        row += group.num_rows
    close()
    return items


def _compressed_size(group: pq.RowGroupMetaData) -> int:
    return sum(group.column(i).total_compressed_size for i in range(group.num_columns))


class _PlanWorkItems(beam.DoFn):
    """Per input file: checks its schema if the launcher did not, hashes it, plans its
    work items; an item already staged by an interrupted run (`resume`) yields its
    parts to `reused` instead. Each file's record (path, size, sha256, items) goes to
    `inputs`, for the manifest."""

    def __init__(
        self,
        files_dir: str,
        schema: pa.Schema,
        checked: frozenset[int],
        *,
        work_item_bytes: int,
        row_limits: dict[int, int],
        resume: bool,
    ):
        self._files_dir = files_dir
        self._schema = schema
        self._checked = checked
        self._work_item_bytes = work_item_bytes
        self._row_limits = row_limits
        self._resume = resume

    def process(self, record: dict):
        index, path = record["index"], record["path"]
        if index not in self._checked:
            schema = read_schema(path)
            if not schema.equals(self._schema):
                raise InputError(
                    f"input files disagree on their columns: {path} has {schema.names} "
                    f"({', '.join(map(str, schema.types))}), not {self._schema.names} "
                    f"({', '.join(map(str, self._schema.types))}); enrich them in separate runs"
                )
        _, sha256 = file_sha256(path)
        items = plan_work_items(
            index,
            path,
            sha256,
            work_item_bytes=self._work_item_bytes,
            stop_row=self._row_limits.get(index),
        )
        reused = 0
        for item in items:
            parts = find_staged_parts(self._files_dir, item) if self._resume else None
            if parts:
                reused += 1
                for part in parts:
                    yield beam.pvalue.TaggedOutput("reused", part)
            else:
                yield item
        yield beam.pvalue.TaggedOutput(
            "inputs",
            {
                **record,
                "sha256": sha256,
                "items": [
                    {"stem": item.stem, "first_row": item.first_row, "rows": item.rows}
                    for item in items
                ],
                "reused_items": reused,
            },
        )


class _ReadWorkItem(beam.DoFn):
    """Streams one work item as chunks of about `rows_per_chunk` rows; the last is
    marked `item_end`."""

    def __init__(self, rows_per_chunk: int):
        self._rows_per_chunk = rows_per_chunk
        self._rows = beam.metrics.Metrics.counter("beam_enrich", "rows_read")

    def process(self, item: WorkItem) -> Iterator[Chunk]:
        first_row, previous = item.first_row, None
        tables = iter_tables(
            item.path, self._rows_per_chunk, row_groups=item.row_groups, first_row=first_row
        )
        for table in tables:
            if item.stop_row is not None and first_row + table.num_rows >= item.stop_row:
                table = table.slice(0, item.stop_row - first_row)
            table = table.replace_schema_metadata(None)
            if previous is not None:
                yield previous
            previous = Chunk(
                item.file_index,
                item.path,
                first_row,
                first_row,
                table,
                rows_read=table.num_rows,
                item=item.stem,
                item_end=False,
            )
            first_row += table.num_rows
            self._rows.inc(table.num_rows)
            if item.stop_row is not None and first_row >= item.stop_row:
                tables.close()  # the limit is reached: stop reading the file
                break
        if previous is not None:
            yield dataclasses.replace(previous, item_end=True)


class ReadTables(beam.PTransform):
    """Reads the listed Parquet / CSV files as `Chunk`s of about `rows_per_chunk` rows.

    Returns a dict: `chunks` (the rows to enrich), `reused` (`PartInfo`s of items an
    interrupted run finished, with `resume`) and `inputs` (one record per file: path,
    size, sha256, its planned items).

    Args:
        listing: the JSON-lines input listing (`write_listing`).
        schema: the schema every input must have.
        files_dir: the staging folder of the job's fingerprint (for `resume`).
        checked: indices of files whose schema the launcher already checked.
        rows_per_chunk: rows per element.
        work_item_bytes: target compressed size of a Parquet work item.
        row_limits: file index -> read only that many first rows of the file (`--limit`).
        resume: reuse the items staged under `files_dir`.
        spread: reshuffle the work items so that any worker may read any of them
            (default); False reads each file's items where the file was planned
            (benchmarks/scale.py measures what the reshuffle costs).
    """

    def __init__(
        self,
        listing: str,
        schema: pa.Schema,
        files_dir: str,
        *,
        checked: Sequence[int] = (),
        rows_per_chunk: int = 512,
        work_item_bytes: int = DEFAULT_WORK_ITEM_BYTES,
        row_limits: dict[int, int] | None = None,
        resume: bool = False,
        spread: bool = True,
    ):
        super().__init__()
        self._listing = listing
        self._spread = spread
        self._rows_per_chunk = rows_per_chunk
        self._plan = _PlanWorkItems(
            files_dir,
            schema,
            frozenset(checked),
            work_item_bytes=work_item_bytes,
            row_limits=dict(row_limits or {}),
            resume=resume,
        )

    def expand(self, pbegin):
        planned = (
            pbegin
            | "ListInputs" >> beam.Create([self._listing])
            | "ReadListing" >> beam.FlatMap(_read_listing)
            # Hashing reads each file once: spread the files before it.
            | "SpreadFiles" >> beam.Reshuffle()
            | "PlanWorkItems"
            >> beam.ParDo(self._plan).with_outputs("reused", "inputs", main="items")
        )
        items = planned.items
        if self._spread:
            # Descriptors only, never rows: one large file spreads over every worker.
            items = items | "SpreadWorkItems" >> beam.Reshuffle()
        chunks = items | "ReadWorkItems" >> beam.ParDo(_ReadWorkItem(self._rows_per_chunk))
        return {"chunks": chunks, "reused": planned.reused, "inputs": planned.inputs}
