"""ReadTables / WriteTables: Parquet and CSV files <-> pyarrow.Table chunks.

Files are opened through Beam's `FileSystems`, so local paths, `gs://` and `s3://` work
the same on every runner; pyarrow does the parsing and writing. CSV is read with every
column as a string, so each cell comes out exactly as it went in.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import signal
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.chunks import ERRORS_COLUMN, Chunk

__all__ = [
    "FORMATS",
    "InputError",
    "PartInfo",
    "ReadTables",
    "WriteTables",
    "check_output_schema",
    "concatenate_files",
    "concatenate_parts",
    "expand_inputs",
    "file_sha256",
    "iter_tables",
    "kill_point",
    "neutralize_chunk_formulas",
    "neutralize_formulas",
    "read_schema",
    "staged_parts",
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

    A path that names an existing file is taken literally, even if it holds glob
    characters (`[`, `*`, `?`).

    Raises:
        InputError: a pattern matches no file.
    """
    files: list[str] = []
    for pattern in patterns:
        if pattern.endswith("/") or _is_folder(pattern):
            # A folder: the table files directly inside it.
            inside = _match(FileSystems.join(pattern.rstrip("/"), "*"))
            matched = [path for path in inside if _is_table(path)]
        elif FileSystems.exists(pattern):
            # An existing file is taken as named: `[2024] data.parquet` is no glob.
            matched = [pattern]
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
    # In a one-column file a blank line is a row whose cell is empty; with more columns
    # it cannot be a row of cells, so it is skipped (as pandas and spreadsheets do).
    one_column = column_names is not None and len(column_names) == 1
    parse = pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=not one_column)
    convert = pacsv.ConvertOptions(
        # Exact cells: no type guessing, no null markers ("NA", "" stay strings).
        column_types={name: pa.string() for name in column_names} if column_names else None,
        strings_can_be_null=False,
    )
    reader = pacsv.open_csv(handle, parse_options=parse, convert_options=convert)
    if one_column and reader.schema.names != list(column_names):
        # Blank lines before the header: kept, the first of them would become the header.
        raise pa.ArrowInvalid("blank line(s) before the header; remove them")
    return reader


def _open_stored(path: str):
    """The file's bytes as stored, without decompression."""
    return FileSystems.open(path, _MIME, CompressionTypes.UNCOMPRESSED)


@contextlib.contextmanager
def _open(path: str):
    """The file's content, decompressed by extension."""
    with _open_stored(path) as handle:
        codec = next((c for ext, c in _CODECS.items() if path.lower().endswith(ext)), None)
        yield pa.CompressedInputStream(handle, codec) if codec else handle


def _unreadable(path: str, err: BaseException, where: str = "") -> str:
    # One printable line: pyarrow's reason (for a CSV parse error it quotes the bad row,
    # escaped: a binary file must not print raw bytes to the terminal), where, and why.
    reason = _printable(" ".join(str(err).split()))
    if len(reason) > 300:
        reason = reason[:300] + "..."
    return (
        f"cannot read {_printable(path)}{where}: {reason}{_content_hint(path)}; "
        "fix the file or leave it out of --input"
    )


def _printable(text: str) -> str:
    """`text` with control and other non-printable characters escaped (`\\x00`, `\\udc80`)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


#: Leading bytes of files that are often named `.csv` by mistake.
_MAGIC = {
    b"PAR1": ("Parquet", "name it .parquet"),
    b"\x1f\x8b": ("gzip-compressed", "name it .csv.gz"),
    b"BZh": ("bzip2-compressed", "name it .csv.bz2"),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", "name it .csv.zst"),
}


def _content_hint(path: str) -> str:
    """For a plain `.csv` file whose bytes are Parquet or compressed: what they look like."""
    if not path.lower().endswith(".csv"):
        return ""
    try:
        with _open_stored(path) as handle:
            head = handle.read(4)
    except OSError:
        return ""
    for magic, (kind, fix) in _MAGIC.items():
        if head.startswith(magic):
            return f" (the content looks {kind}: it starts with {_printable(repr(magic))}; {fix})"
    return ""


def _csv_problem_position(path: str, columns: int = 0) -> str | None:
    """Where the first row that pyarrow rejects is: `at data row N (line L)`, or None.

    `columns`: the header's column count, 0 to count them here.

    pyarrow parses CSV a block (about 1 MB) at a time and does not know line numbers,
    so after a parse error the file is scanned again, with Python's csv module, up to
    the first ragged row or invalid UTF-8 cell. Only runs on the error path.
    """
    if _content_hint(path):
        return None  # not CSV at all: its "rows" mean nothing
    try:
        with _open(path) as handle:
            text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
            reader = csv.reader(text)
            header = next(reader, [])
            columns = columns or len(header)
            row, line = 0, reader.line_num + 1
            for cells in reader:
                if not cells and columns > 1:
                    line = reader.line_num + 1
                    continue  # skipped by the reader too
                cells = cells or [""]
                try:
                    "".join(cells).encode("utf-8")
                    valid = len(cells) == columns
                except UnicodeEncodeError:  # undecodable bytes became lone surrogates
                    valid = False
                row += 1
                if not valid:
                    return f" at data row {row} (line {line})"
                line = reader.line_num + 1
    except Exception:  # a best-effort hint: the caller reports the error itself
        return None
    return None


def read_schema(path: str) -> pa.Schema:
    """The schema of one input file, read from the Parquet footer or the CSV header.

    A CSV file's first block (about 1 MB) is parsed too, so a ragged row or invalid
    UTF-8 near the top fails here, before the run, for the cost of one block.

    Raises:
        InputError: the file is empty or unreadable, has no header, or repeats a
            column name.
    """
    fmt = table_format(path)
    names: list[str] = []
    try:
        with _open(path) as handle:
            if fmt == "parquet":
                # File-level key-value metadata (pandas, GeoParquet `geo`, user keys) is
                # kept: the output carries it on (see `_parquet_schema`).
                schema = pq.read_schema(handle)
            else:
                names = _csv_reader(handle).schema.names
                schema = pa.schema([pa.field(name, pa.string()) for name in names])
        if fmt == "csv" and len(set(schema.names)) == len(schema.names):
            with _open(path) as handle, contextlib.suppress(StopIteration):
                _csv_reader(handle, schema.names).read_next_batch()
    except (pa.ArrowInvalid, OSError) as err:
        where = _csv_problem_position(path, len(names)) if fmt == "csv" else None
        raise InputError(_unreadable(path, err, where or "")) from err
    duplicates = sorted(name for name, n in Counter(schema.names).items() if n > 1)
    if duplicates:
        raise InputError(f"{path} repeats column name(s) {duplicates}; names must be unique")
    return schema


def iter_tables(path: str, rows_per_chunk: int) -> Iterator[pa.Table]:
    """Streams a file as tables of `rows_per_chunk` rows (the last may be shorter).

    Raises:
        InputError: part of the file cannot be parsed (a ragged CSV row, invalid
            UTF-8, a corrupt Parquet page); the message names the file and where: for
            CSV the data row and line of the problem, for Parquet how many rows were
            read before it.
    """
    rows = 0
    names: list[str] = []

    def counted(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        nonlocal rows
        for batch in batches:
            yield batch
            rows += batch.num_rows

    try:
        with _open(path) as handle:
            if table_format(path) == "parquet":
                batches: Iterable[pa.RecordBatch] = pq.ParquetFile(handle).iter_batches(
                    batch_size=rows_per_chunk
                )
            else:
                names = read_schema(path).names
                batches = _csv_reader(handle, names)
            yield from _rebatch(counted(batches), rows_per_chunk)
    except (pa.ArrowInvalid, OSError) as err:
        # The readers count rows a block or batch at a time: `rows` is where the block
        # that failed begins, not where the problem is.
        where = _csv_problem_position(path, len(names)) if names else None
        where = where or f" somewhere after its first {rows} data row(s)"
        raise InputError(_unreadable(path, err, where)) from err


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
    def __init__(self, rows_per_chunk: int, row_limits: dict[int, int] | None = None):
        self._rows_per_chunk = rows_per_chunk
        self._row_limits = dict(row_limits or {})
        self._rows = beam.metrics.Metrics.counter("beam_enrich", "rows_read")

    def process(self, element: tuple[int, str]) -> Iterator[Chunk]:
        file_index, path = element
        limit = self._row_limits.get(file_index)
        first_row = 0
        for index, table in enumerate(iter_tables(path, self._rows_per_chunk)):
            if limit is not None and first_row + table.num_rows >= limit:
                # The last chunk the limit reaches; leaving the loop stops reading the file.
                table = table.slice(0, limit - first_row).replace_schema_metadata(None)
                yield Chunk(file_index, path, index, first_row, table, rows_read=table.num_rows)
                self._rows.inc(table.num_rows)
                return
            table = table.replace_schema_metadata(None)
            yield Chunk(file_index, path, index, first_row, table, rows_read=table.num_rows)
            first_row += table.num_rows
            self._rows.inc(table.num_rows)


class ReadTables(beam.PTransform):
    """Reads Parquet / CSV files as `Chunk`s of about `rows_per_chunk` rows.

    Args:
        files: the input files (see `expand_inputs`); their order fixes `file_index`.
        rows_per_chunk: rows per element.
        skip: indices of files not to read (their results are reused from a resumed run).
        row_limits: file index -> read only that many first rows of the file (`--limit`).
    """

    def __init__(
        self,
        files: Sequence[str],
        *,
        rows_per_chunk: int = 512,
        skip: Iterable[int] = (),
        row_limits: dict[int, int] | None = None,
    ):
        super().__init__()
        self._files = list(files)
        self._rows_per_chunk = rows_per_chunk
        self._skip = frozenset(skip)
        self._row_limits = dict(row_limits or {})

    def expand(self, pbegin):
        listed = [(i, path) for i, path in enumerate(self._files) if i not in self._skip]
        return (
            pbegin
            | "ListFiles" >> beam.Create(listed)
            # Spread files over workers before the (sequential) per-file read.
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadChunks" >> beam.ParDo(_ReadChunks(self._rows_per_chunk, self._row_limits))
        )


#: Cells that start with one of these can run as formulas in spreadsheets (OWASP "CSV
#: injection"); `neutralize_formulas` prefixes them with `'`.
_FORMULA_START = r"^[=+\-@\t\r]"


def neutralize_formulas(table: pa.Table) -> pa.Table:
    """Text cells that start with =, +, -, @, tab or CR get a leading `'`, for CSV output.

    Only string columns (and dictionaries of strings) change; nested cells become
    JSON text, which starts with `[` or `{`. Numbers stored as text ("-5") are
    prefixed too: that is the rule spreadsheets need.
    """
    import pyarrow.compute as pc

    def neutralize(array):
        if pa.types.is_string_view(array.type):  # the regex kernels take no views
            return neutralize(array.cast(pa.string())).cast(array.type)
        flagged = pc.match_substring_regex(array, _FORMULA_START)
        # The joined pieces must have the column's own type (large_string has 64-bit
        # offsets; a plain "'" would be a string and match no kernel).
        quote, empty = pa.scalar("'", array.type), pa.scalar("", array.type)
        return pc.if_else(flagged, pc.binary_join_element_wise(quote, array, empty), array)

    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        type_ = field.type
        if _is_text(type_):
            column = neutralize(column)
        elif pa.types.is_dictionary(type_) and _is_text(type_.value_type):
            column = pa.chunked_array(
                [
                    pa.DictionaryArray.from_arrays(chunk.indices, neutralize(chunk.dictionary))
                    for chunk in column.chunks
                ],
                type_,
            )
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=table.schema)


def _is_text(type_: pa.DataType) -> bool:
    types = pa.types
    return types.is_string(type_) or types.is_large_string(type_) or types.is_string_view(type_)


def neutralize_chunk_formulas(chunk: Chunk) -> Chunk:
    """`neutralize_formulas` on a chunk's table."""
    return dataclasses.replace(chunk, table=neutralize_formulas(chunk.table))


def csv_schema(schema: pa.Schema) -> pa.Schema:
    """The schema a table takes in CSV (see `to_csv_table`)."""
    return pa.schema([pa.field(f.name, _csv_type(f.type)) for f in schema])


def _csv_type(type_: pa.DataType) -> pa.DataType:
    if isinstance(type_, pa.BaseExtensionType):
        return _csv_type(type_.storage_type)
    if pa.types.is_dictionary(type_) or pa.types.is_run_end_encoded(type_):
        return _csv_type(type_.value_type)
    if pa.types.is_nested(type_) or pa.types.is_string_view(type_) or _is_binary(type_):
        return pa.string()
    return type_


def _is_binary(type_: pa.DataType) -> bool:
    return (
        pa.types.is_binary(type_)
        or pa.types.is_large_binary(type_)
        or pa.types.is_binary_view(type_)
        or pa.types.is_fixed_size_binary(type_)
    )


def check_output_schema(schema: pa.Schema, output_format: str) -> None:
    """Checks, before the run, that every column can be written in `output_format`.

    Raises:
        InputError: CSV output and a column whose type has no CSV text form
            (intervals), naming the columns and the fix.
    """
    if output_format != "csv":
        return
    refused = []
    for field in schema:
        target = _csv_type(field.type)
        try:
            # pyarrow's writer refuses unknown types when it starts; intervals only
            # when it meets a value, so those are named here.
            pacsv.CSVWriter(pa.BufferOutputStream(), pa.schema([pa.field(field.name, target)]))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            refused.append(field)
            continue
        if pa.types.is_interval(target):
            refused.append(field)
    if refused:
        names = ", ".join(f"{f.name!r} ({f.type})" for f in refused)
        raise InputError(
            f"CSV output cannot hold column(s) {names}; write Parquet (--output-format "
            "parquet) or cast those columns to string first"
        )


def _json_default(value):
    # Bytes inside nested cells as hex, like binary columns; other values as their text.
    return value.hex() if isinstance(value, bytes) else str(value)


def _to_csv_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    type_ = column.type
    if isinstance(type_, pa.BaseExtensionType):
        storage = pa.chunked_array([chunk.storage for chunk in column.chunks], type_.storage_type)
        return _to_csv_column(storage)
    if pa.types.is_dictionary(type_):
        return _to_csv_column(column.cast(type_.value_type))
    if pa.types.is_run_end_encoded(type_):
        import pyarrow.compute as pc

        return _to_csv_column(pc.run_end_decode(column))
    if pa.types.is_string_view(type_):
        return column.cast(pa.string())
    if _is_binary(type_):
        # Hex, not base64: base64 text can start with "+", which spreadsheets run as
        # a formula, and hex needs no decoding rules beyond bytes.fromhex.
        return pa.chunked_array(
            [pa.array([None if v is None else v.hex() for v in column.to_pylist()], pa.string())]
        )
    if pa.types.is_nested(type_):
        text = [
            None if v is None else json.dumps(v, ensure_ascii=False, default=_json_default)
            for v in column.to_pylist()
        ]
        return pa.chunked_array([pa.array(text, pa.string())])
    return column


def to_csv_table(table: pa.Table) -> pa.Table:
    """The table as CSV can hold it: nested cells as JSON text, binary cells as hex text,
    dictionary, run-end encoded and extension columns as their plain values,
    `string_view` as string."""
    columns = [_to_csv_column(column) for column in table.columns]
    return pa.Table.from_arrays(columns, schema=csv_schema(table.schema))


_PANDAS = b"pandas"


def _parquet_schema(schema: pa.Schema) -> pa.Schema:
    """The schema with its pandas metadata (if any) describing the added columns too.

    The input's file-level metadata (GeoParquet `geo`, user keys) is kept as it is;
    pandas' entry lists each column's dtype and which columns are the index, so
    `pandas.read_parquet` gives back the input's dtypes (`Int64` with nulls) and index.
    An entry that cannot be parsed cannot be updated either: it is dropped.
    """
    metadata = dict(schema.metadata or {})
    if _PANDAS not in metadata:
        return schema
    try:
        pandas = json.loads(metadata[_PANDAS])
        described = {column.get("field_name", column["name"]) for column in pandas["columns"]}
        pandas["columns"].extend(
            _pandas_column(field) for field in schema if field.name not in described
        )
        metadata[_PANDAS] = json.dumps(pandas).encode("utf-8")
    except (ValueError, KeyError, TypeError, AttributeError):
        del metadata[_PANDAS]
    return schema.with_metadata(metadata)


def _pandas_column(field: pa.Field) -> dict:
    """pandas' description of a column it did not write, as pyarrow writes one."""
    import numpy as np
    from pyarrow.pandas_compat import get_logical_type

    try:
        numpy_type = np.dtype(field.type.to_pandas_dtype()).name
    except (NotImplementedError, TypeError):
        numpy_type = "object"
    return {
        "name": field.name,
        "field_name": field.name,
        "pandas_type": get_logical_type(field.type),
        "numpy_type": numpy_type,
        "metadata": None,
    }


class _TableWriter:
    """One open output file; Parquet or CSV with the same calls."""

    def __init__(self, path: str, schema: pa.Schema, fmt: str):
        self.path = path
        self._fmt = fmt
        self._handle = FileSystems.create(path, _MIME)
        if fmt == "parquet":
            self._writer = pq.ParquetWriter(self._handle, _parquet_schema(schema))
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

    def to_json(self) -> str:
        """The part as JSON: the marker that says a staged file is complete."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> PartInfo:
        """The part written by `to_json`."""
        data = json.loads(text)
        data["first"] = tuple(data["first"])
        data["stats"] = {task: tuple(v) for task, v in data["stats"].items()}
        return cls(**data)


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

    def __init__(self, staging_dir: str, schema: pa.Schema, fmt: str, name: str | None = None):
        name = name or uuid.uuid4().hex
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


class _WriteChunkParts(beam.DoFn):
    """Writes each chunk to its own staged file as soon as it arrives: nothing is held.

    Yields (file index, the chunk's `PartInfo`); data files carry a random suffix, so a
    retried or speculative attempt never overwrites another's data.
    """

    def __init__(self, staging_dir: str, schema: pa.Schema, fmt: str, names: dict[int, str]):
        self._staging_dir = staging_dir
        self._schema = schema
        self._fmt = fmt
        self._names = names

    def process(self, chunk: Chunk) -> Iterator[tuple[int, PartInfo]]:
        name = self._names.get(chunk.file_index, f"file-{chunk.file_index:05d}")
        part = _PartAccumulator(
            self._staging_dir,
            self._schema,
            self._fmt,
            name=f"{name}.chunk-{chunk.index:06d}.{uuid.uuid4().hex[:8]}",
        )
        part.add(chunk)
        yield chunk.file_index, part.close()


class _CompleteFileParts(beam.DoFn):
    """Joins one input file's chunk parts, in order, into its part; then marks it done.

    Only the chunks' small `PartInfo`s are grouped, never their rows, so memory stays
    one chunk deep however large the input (a runner that holds grouped data in memory,
    like the local one, would otherwise hold the whole output). The marker
    (`<name>.done.json`, the part's `PartInfo`) is written last and renamed into place,
    so its presence means the file's results are complete: a resumed run reuses them
    instead of reading and enriching that input again.
    """

    def __init__(self, staging_dir: str, schema: pa.Schema, fmt: str, names: dict[int, str]):
        self._staging_dir = staging_dir
        self._schema = schema
        self._fmt = fmt
        self._names = names

    def process(self, keyed: tuple[int, Iterable[PartInfo]]) -> Iterator[PartInfo]:
        file_index, chunk_parts = keyed
        chunk_parts = sorted(chunk_parts, key=lambda part: part.first)
        name = self._names.get(file_index, f"file-{file_index:05d}")
        info = _joined(chunk_parts)
        if len(chunk_parts) > 1:
            stem = f"{self._staging_dir}/{name}.{uuid.uuid4().hex[:8]}"
            concatenate_parts(
                [part.path for part in chunk_parts], f"{stem}.{self._fmt}", self._fmt, self._schema
            )
            errors = [part.errors_path for part in chunk_parts if part.errors_path]
            if errors:
                concatenate_files(errors, f"{stem}.errors.jsonl")
            info = dataclasses.replace(
                info,
                path=f"{stem}.{self._fmt}",
                errors_path=f"{stem}.errors.jsonl" if errors else None,
            )
        marker = f"{self._staging_dir}/{name}.done.json"
        temporary = f"{marker}.{uuid.uuid4().hex[:8]}.tmp"
        with FileSystems.create(temporary, _MIME) as handle:
            handle.write(info.to_json().encode("utf-8"))
        FileSystems.rename([temporary], [marker])
        if len(chunk_parts) > 1:
            joined = [p.path for p in chunk_parts] + [p.errors_path for p in chunk_parts]
            FileSystems.delete([path for path in joined if path])
        kill_point("staged")
        yield info


def _joined(parts: Sequence[PartInfo]) -> PartInfo:
    """One `PartInfo` summing consecutive parts (paths: the first part's)."""
    failed: Counter = Counter()
    stats: dict[str, list] = {}
    devices: dict[str, set] = {}
    for part in parts:
        failed.update(part.failed)
        for task, values in part.stats.items():
            totals = stats.setdefault(task, [0, 0, 0, 0.0])
            for i, value in enumerate(values):
                totals[i] += value
        for task, used in part.devices.items():
            devices.setdefault(task, set()).update(used)
    return dataclasses.replace(
        parts[0],
        rows=sum(part.rows for part in parts),
        rows_read=sum(part.rows_read for part in parts),
        failed=dict(failed),
        stats={task: tuple(v) for task, v in stats.items()},
        devices={task: sorted(v) for task, v in devices.items()},
    )


def concatenate_files(sources: Sequence[str], destination: str) -> None:
    """Copies files one after another into `destination`, a block at a time."""
    with FileSystems.create(destination, _MIME) as out:
        for source in sources:
            with FileSystems.open(source, _MIME) as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    out.write(block)


#: Joined Parquet row groups hold about this many rows or bytes, whichever comes first:
#: big enough for fast scans, small enough that joining holds little in memory.
_ROW_GROUP_ROWS = 65_536
_ROW_GROUP_BYTES = 64 << 20


def concatenate_parts(
    sources: Sequence[str], destination: str, fmt: str, schema: pa.Schema
) -> None:
    """Concatenates part files into one, in order, a row group (or block) at a time.

    Parquet row groups are joined up to `_ROW_GROUP_ROWS` rows or `_ROW_GROUP_BYTES`:
    a staged part holds one chunk, so `rows_per_chunk: 1` would otherwise give one row
    group per row (slow to read, a footer entry per row).
    """
    if fmt == "parquet":
        with FileSystems.create(destination, _MIME) as out:
            writer = None
            pending: list[pa.Table] = []
            rows = size = 0
            for source in sources:
                with FileSystems.open(source, _MIME) as handle:
                    staged = pq.ParquetFile(handle)
                    if writer is None:
                        writer = pq.ParquetWriter(out, staged.schema_arrow)
                    for group in range(staged.num_row_groups):
                        pending.append(staged.read_row_group(group))
                        rows += pending[-1].num_rows
                        size += pending[-1].nbytes
                        if rows >= _ROW_GROUP_ROWS or size >= _ROW_GROUP_BYTES:
                            writer.write_table(pa.concat_tables(pending), row_group_size=rows)
                            pending, rows, size = [], 0, 0
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=max(rows, 1))
            writer.close()
        return
    # CSV: each part starts with the same header; keep the first one only. Written by
    # hand: pyarrow cannot append CSV files without re-parsing their cells.
    header = pa.BufferOutputStream()
    pacsv.write_csv(csv_schema(schema).empty_table(), header)
    header = header.getvalue().to_pybytes()
    with FileSystems.create(destination, _MIME) as out:
        out.write(header)
        for source in sources:
            with FileSystems.open(source, _MIME) as handle:
                if handle.read(len(header)) != header:
                    raise ValueError(f"staged part {source} does not start with the CSV header")
                for block in iter(lambda: handle.read(1 << 20), b""):
                    out.write(block)


def staged_parts(staging_dir: str, names: dict[int, str]) -> dict[int, PartInfo]:
    """The parts `WriteTables` completed in `staging_dir`, by file index (for resuming)."""
    found = {}
    for file_index, name in names.items():
        marker = f"{staging_dir}/{name}.done.json"
        if FileSystems.exists(marker):
            with FileSystems.open(marker, _MIME) as handle:
                info = PartInfo.from_json(handle.read().decode("utf-8"))
            paths = [info.path] + ([info.errors_path] if info.errors_path else [])
            if all(FileSystems.exists(path) for path in paths):
                found[file_index] = dataclasses.replace(info, first=(file_index, 0))
    return found


_KILL_COUNTS: Counter = Counter()


def kill_point(name: str) -> None:
    """Crash-test hook: SIGKILLs this process at the named point, for the atomicity tests.

    `BEAM_ENRICH_KILL_AT=<name>:<n>` kills the process the n-th time it reaches `name`
    (`staged`: an input file's part is staged; `assembled`, `swapping`: see
    `pipelines.manifest.finalize_run`). Unset (always, outside tests), it does nothing.
    """
    wanted = os.environ.get("BEAM_ENRICH_KILL_AT")
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point == name:
        _KILL_COUNTS[name] += 1
        if _KILL_COUNTS[name] >= int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)


class WriteTables(beam.PTransform):
    """Writes chunks to staged part files, one per input file; yields a `PartInfo` per file.

    The files are staged: `finalize` (in the application) moves them to their final
    names once every part is written, so a failed run leaves nothing under them. Each
    part holds one input file's rows in input order, so parts sorted by `first` follow
    the input order exactly.

    Args:
        staging_dir: where part files are written first.
        schema: the output schema (input schema + task columns + `enrich_errors`).
        output_format: `parquet` or `csv`.
        part_names: file index -> stem of its staged part and marker (default
            `file-NNNNN`); stems that name the input's content let `staged_parts` find
            the results of an interrupted run.
    """

    def __init__(
        self,
        staging_dir: str,
        schema: pa.Schema,
        *,
        output_format: str,
        part_names: dict[int, str] | None = None,
    ):
        super().__init__()
        if output_format not in FORMATS:
            raise ValueError(f"output_format {output_format!r}: expected one of {FORMATS}")
        self._args = (staging_dir, schema, output_format, dict(part_names or {}))

    def expand(self, chunks):
        return (
            chunks
            # Each chunk is written as it comes; only the parts' descriptions are grouped
            # per input file, whose results are then joined and staged (and resumable)
            # as a unit.
            | "WriteChunks" >> beam.ParDo(_WriteChunkParts(*self._args))
            | "GatherFile" >> beam.GroupByKey()
            | "CompleteFiles" >> beam.ParDo(_CompleteFileParts(*self._args))
        )
