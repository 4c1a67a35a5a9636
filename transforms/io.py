"""ReadTables / WriteTables: Parquet and CSV files <-> pyarrow.Table chunks.

Files are opened through Beam's `FileSystems`, so local paths, `gs://` and `s3://` work
the same on every runner; pyarrow does the parsing and writing. CSV is read with every
column as a string, so each cell comes out exactly as it went in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from transforms.chunks import ERRORS_COLUMN, Chunk

__all__ = [
    "FORMATS",
    "InputError",
    "PartInfo",
    "ReadTables",
    "WriteTables",
    "expand_inputs",
    "file_sha256",
    "iter_tables",
    "read_schema",
    "table_format",
    "write_table",
]

FORMATS = ("parquet", "csv")
_MIME = "application/octet-stream"
# pyarrow decompresses; Beam's own decompressing reader cannot be handed to pyarrow.
_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}


class InputError(ValueError):
    """An input that cannot be read as a table: no match, unknown format, bad header."""


def table_format(path: str) -> str:
    """`parquet` or `csv`, from the file extension (`.parquet`, `.csv`, `.csv.gz`)."""
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zst")):
        return "csv"
    raise InputError(f"cannot tell the format of {path!r}: expected .parquet, .csv or .csv.gz")


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Every file the paths, globs or URIs match, sorted and without duplicates.

    Raises:
        InputError: a pattern matches no file.
    """
    files: list[str] = []
    for pattern in patterns:
        if pattern.endswith("/") or _is_folder(pattern):
            # A folder: the table files directly inside it.
            inside = _match(FileSystems.join(pattern.rstrip("/"), "*"))
            matched = [path for path in inside if _is_table(path)]
        else:
            matched = _match(pattern)
        if not matched:
            raise InputError(f"--input {pattern!r} matches no file")
        files.extend(matched)
    return sorted(dict.fromkeys(files))


def _match(pattern: str) -> list[str]:
    (result,) = FileSystems.match([pattern])
    return sorted(m.path for m in result.metadata_list if not _is_folder(m.path))


def _is_folder(path: str) -> bool:
    return "://" not in path and os.path.isdir(path)


def _is_table(path: str) -> bool:
    try:
        table_format(path)
    except InputError:
        return False
    return True


def file_sha256(path: str) -> tuple[int, str]:
    """The file's size in bytes and sha256, read as stored (no decompression)."""
    digest = hashlib.sha256()
    size = 0
    with _open_stored(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _csv_reader(handle, column_names: Sequence[str] | None = None):
    parse = pacsv.ParseOptions(newlines_in_values=True)
    convert = pacsv.ConvertOptions(
        # Exact cells: no type guessing, no null markers ("NA", "" stay strings).
        column_types={name: pa.string() for name in column_names} if column_names else None,
        strings_can_be_null=False,
    )
    return pacsv.open_csv(handle, parse_options=parse, convert_options=convert)


def _open_stored(path: str):
    """The file's bytes as stored, without decompression."""
    return FileSystems.open(path, _MIME, CompressionTypes.UNCOMPRESSED)


@contextlib.contextmanager
def _open(path: str):
    """The file's content, decompressed by extension."""
    with _open_stored(path) as handle:
        codec = next((c for ext, c in _CODECS.items() if path.lower().endswith(ext)), None)
        yield pa.CompressedInputStream(handle, codec) if codec else handle


def read_schema(path: str) -> pa.Schema:
    """The schema of one input file, read from the Parquet footer or the CSV header.

    Raises:
        InputError: the file has no header, or repeats a column name.
    """
    fmt = table_format(path)
    try:
        with _open(path) as handle:
            if fmt == "parquet":
                schema = pq.read_schema(handle)
            else:
                names = _csv_reader(handle).schema.names
                schema = pa.schema([pa.field(name, pa.string()) for name in names])
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"cannot read {path}: {err}") from err
    duplicates = sorted(name for name, n in Counter(schema.names).items() if n > 1)
    if duplicates:
        raise InputError(f"{path} repeats column name(s) {duplicates}; names must be unique")
    return schema.remove_metadata()


def iter_tables(path: str, rows_per_chunk: int) -> Iterator[pa.Table]:
    """Streams a file as tables of `rows_per_chunk` rows (the last may be shorter)."""
    with _open(path) as handle:
        if table_format(path) == "parquet":
            batches: Iterable[pa.RecordBatch] = pq.ParquetFile(handle).iter_batches(
                batch_size=rows_per_chunk
            )
            schema = None
        else:
            schema = read_schema(path)
            batches = _csv_reader(handle, schema.names)
        yield from _rebatch(batches, rows_per_chunk)


def _rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows).combine_chunks()
            rest = table.slice(rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending).combine_chunks()


class _ReadChunks(beam.DoFn):
    def __init__(self, rows_per_chunk: int):
        self._rows_per_chunk = rows_per_chunk
        self._rows = beam.metrics.Metrics.counter("beam_enrich", "rows_read")

    def process(self, element: tuple[int, str]) -> Iterator[Chunk]:
        file_index, path = element
        first_row = 0
        for index, table in enumerate(iter_tables(path, self._rows_per_chunk)):
            table = table.replace_schema_metadata(None)
            yield Chunk(file_index, path, index, first_row, table, rows_read=table.num_rows)
            first_row += table.num_rows
            self._rows.inc(table.num_rows)


class ReadTables(beam.PTransform):
    """Reads Parquet / CSV files as `Chunk`s of about `rows_per_chunk` rows.

    Args:
        files: the input files (see `expand_inputs`); their order fixes `file_index`.
        rows_per_chunk: rows per element.
    """

    def __init__(self, files: Sequence[str], *, rows_per_chunk: int = 512):
        super().__init__()
        self._files = list(files)
        self._rows_per_chunk = rows_per_chunk

    def expand(self, pbegin):
        return (
            pbegin
            | "ListFiles" >> beam.Create(list(enumerate(self._files)))
            # Spread files over workers before the (sequential) per-file read.
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadChunks" >> beam.ParDo(_ReadChunks(self._rows_per_chunk))
        )


def csv_schema(schema: pa.Schema) -> pa.Schema:
    """The schema a table takes in CSV: nested and dictionary columns become text."""
    return pa.schema([pa.field(f.name, _csv_type(f.type)) for f in schema])


def _csv_type(type_: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(type_):
        return _csv_type(type_.value_type)
    if pa.types.is_nested(type_):
        return pa.string()
    return type_


def to_csv_table(table: pa.Table) -> pa.Table:
    """Nested cells become JSON text and dictionary columns plain values, for CSV output."""
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        target = _csv_type(field.type)
        if target == field.type:
            columns.append(column)
        elif pa.types.is_dictionary(field.type) and not pa.types.is_nested(target):
            columns.append(column.cast(target))
        else:
            text = [
                None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                for v in column.to_pylist()
            ]
            columns.append(pa.array(text, pa.string()))
    return pa.Table.from_arrays(columns, schema=csv_schema(table.schema))


class _TableWriter:
    """One open output file; Parquet or CSV with the same calls."""

    def __init__(self, path: str, schema: pa.Schema, fmt: str):
        self.path = path
        self._fmt = fmt
        self._handle = FileSystems.create(path, _MIME)
        if fmt == "parquet":
            self._writer = pq.ParquetWriter(self._handle, schema)
        else:
            self._writer = pacsv.CSVWriter(self._handle, csv_schema(schema))

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(to_csv_table(table) if self._fmt == "csv" else table)

    def close(self) -> None:
        self._writer.close()
        self._handle.close()


def write_table(path: str, table: pa.Table, fmt: str) -> None:
    """Writes one whole table to `path` as Parquet or CSV."""
    writer = _TableWriter(path, table.schema, fmt)
    writer.write(table)
    writer.close()


@dataclasses.dataclass(frozen=True)
class PartInfo:
    """A staged part file and what is in it.

    Attributes:
        path: the staged data file.
        errors_path: the staged errors file (JSON lines), or None when no row failed.
        first: position of the part's first chunk, for naming parts in input order.
        rows: rows written.
        rows_read: rows read from the inputs, as the reader counted them.
        failed: failed rows per task.
        stats: task name -> (rows, failed, truncated, seconds), summed over chunks.
        devices: task name -> sorted "device/dtype" strings the workers used.
    """

    path: str
    errors_path: str | None
    first: tuple[int, int]
    rows: int
    rows_read: int
    failed: dict[str, int]
    stats: dict[str, tuple[int, int, int, float]]
    devices: dict[str, list[str]]


def failure_records(chunk: Chunk) -> list[dict]:
    """One `errors.jsonl` record per task failure in the chunk."""
    records = []
    errors = chunk.table.column(ERRORS_COLUMN)
    for offset, entries in enumerate(errors.to_pylist()):
        for entry in entries or ():
            error_type, _, message = entry["error"].partition(": ")
            records.append(
                {
                    "file": chunk.source,
                    "row": chunk.first_row + offset,
                    "task": entry["task"],
                    "error_type": error_type,
                    "message": message,
                }
            )
    return records


class _PartAccumulator:
    """Writes chunks to one staged part file and sums what they carry."""

    def __init__(self, staging_dir: str, schema: pa.Schema, fmt: str):
        name = uuid.uuid4().hex
        self._data = _TableWriter(f"{staging_dir}/{name}.{fmt}", schema, fmt)
        self._errors_path = f"{staging_dir}/{name}.errors.jsonl"
        self._errors = None
        self._schema = schema
        self._first: tuple[int, int] | None = None
        self._rows = 0
        self._rows_read = 0
        self._failed: Counter = Counter()
        self._stats: dict[str, list] = {}
        self._devices: dict[str, set] = {}

    def add(self, chunk: Chunk) -> None:
        table = chunk.table
        if not table.schema.equals(self._schema):
            table = table.cast(self._schema)
        self._data.write(table)
        self._first = min(self._first or chunk.position, chunk.position)
        self._rows += table.num_rows
        self._rows_read += chunk.rows_read
        records = failure_records(chunk)
        if records:
            if self._errors is None:
                self._errors = FileSystems.create(self._errors_path, _MIME)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            self._errors.write(lines.encode("utf-8"))
            self._failed.update(r["task"] for r in records)
        for s in chunk.stats:
            totals = self._stats.setdefault(s.task, [0, 0, 0, 0.0])
            totals[0] += s.rows
            totals[1] += s.failed
            totals[2] += s.truncated
            totals[3] += s.seconds
            self._devices.setdefault(s.task, set()).add(f"{s.device}/{s.dtype}")

    def close(self) -> PartInfo:
        self._data.close()
        if self._errors is not None:
            self._errors.close()
        return PartInfo(
            path=self._data.path,
            errors_path=self._errors_path if self._errors is not None else None,
            first=self._first or (0, 0),
            rows=self._rows,
            rows_read=self._rows_read,
            failed=dict(self._failed),
            stats={task: tuple(v) for task, v in self._stats.items()},
            devices={task: sorted(v) for task, v in self._devices.items()},
        )


class _WriteParts(beam.DoFn):
    """One staged part file per bundle, as Beam's own file sinks do."""

    def __init__(self, staging_dir: str, schema: pa.Schema, fmt: str):
        self._staging_dir = staging_dir
        self._schema = schema
        self._fmt = fmt

    def start_bundle(self):
        self._part = None

    def process(self, chunk: Chunk):
        if self._part is None:
            self._part = _PartAccumulator(self._staging_dir, self._schema, self._fmt)
        self._part.add(chunk)

    def finish_bundle(self):
        if self._part is not None:
            yield WindowedValue(
                self._part.close(), GlobalWindow().max_timestamp(), [GlobalWindow()]
            )
            self._part = None


class _WriteOrdered(beam.DoFn):
    """All chunks into one part file, in input order (`keep_order: true`)."""

    def __init__(self, staging_dir: str, schema: pa.Schema, fmt: str):
        self._staging_dir = staging_dir
        self._schema = schema
        self._fmt = fmt

    def process(self, keyed: tuple[None, Iterable[Chunk]]):
        part = _PartAccumulator(self._staging_dir, self._schema, self._fmt)
        for chunk in sorted(keyed[1], key=lambda c: c.position):
            part.add(chunk)
        yield part.close()


class WriteTables(beam.PTransform):
    """Writes chunks to staged part files; yields a `PartInfo` per file.

    The files are staged: `finalize` (in the application) moves them to their final
    names once every part is written, so a failed run leaves nothing under them.

    Args:
        staging_dir: where part files are written first.
        schema: the output schema (input schema + task columns + `enrich_errors`).
        output_format: `parquet` or `csv`.
        keep_order: write one part whose rows follow input order exactly. Holds the
            whole output on one worker while it sorts, so it suits moderate sizes.
    """

    def __init__(
        self, staging_dir: str, schema: pa.Schema, *, output_format: str, keep_order: bool = False
    ):
        super().__init__()
        if output_format not in FORMATS:
            raise ValueError(f"output_format {output_format!r}: expected one of {FORMATS}")
        self._args = (staging_dir, schema, output_format)
        self._keep_order = keep_order

    def expand(self, chunks):
        if not self._keep_order:
            return chunks | "WriteParts" >> beam.ParDo(_WriteParts(*self._args))
        return (
            chunks
            | "KeyForOrder" >> beam.Map(lambda chunk: (None, chunk))
            | "GatherAll" >> beam.GroupByKey()
            | "WriteOrdered" >> beam.ParDo(_WriteOrdered(*self._args))
        )
