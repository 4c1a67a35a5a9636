"""Parquet and CSV files <-> pyarrow tables: listing, schemas, streaming reads, writers.

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
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.chunks import ERRORS_COLUMN, Chunk
from transforms.errors import JobError

__all__ = [
    "FORMATS",
    "InputError",
    "TableWriter",
    "check_output_schema",
    "expand_inputs",
    "failure_records",
    "file_sha256",
    "iter_tables",
    "list_inputs",
    "neutralize_chunk_formulas",
    "neutralize_formulas",
    "parquet_metadata",
    "read_schema",
    "table_format",
    "write_table",
]

FORMATS = ("parquet", "csv")
_MIME = "application/octet-stream"
# pyarrow decompresses; Beam's own decompressing reader cannot be handed to pyarrow.
_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
#: Parquet pages are read through a buffer of this size: by default pyarrow fetches a
#: row group's whole column chunk first, and a row group may hold a million rows (the
#: pyarrow writer's default), so memory would grow with the row group (+160 MiB for 1M
#: rows of text, measured); buffered, a read holds about one page per column.
_PARQUET_READ_BUFFER = 1 << 20


class InputError(JobError):
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
    return [path for path, _ in list_inputs(patterns)]


def list_inputs(patterns: Sequence[str]) -> list[tuple[str, int]]:
    """(path, size in bytes) of every file the patterns match, sorted, without duplicates.

    Metadata only (`FileSystems.match`): no file is opened.

    A path that names an existing file is taken literally, even if it holds glob
    characters (`[`, `*`, `?`).

    Raises:
        InputError: a pattern matches no file.
    """
    files: dict[str, int] = {}
    for pattern in patterns:
        if pattern.endswith("/") or _is_folder(pattern):
            # A folder: the table files directly inside it.
            inside = _match(FileSystems.join(pattern.rstrip("/"), "*"))
            matched = [(path, size) for path, size in inside if _is_table(path)]
        elif FileSystems.exists(pattern):
            # An existing file is taken as named: `[2024] data.parquet` is no glob.
            matched = [(pattern, _size(pattern))]
        else:
            matched = _match(pattern)
        if not matched:
            raise InputError(f"--input {pattern!r} matches no file")
        files.update(matched)
    return sorted(files.items())


def _size(path: str) -> int:
    if "://" not in path:
        return os.path.getsize(path)  # a literal name: Beam's match would read it as a glob
    (result,) = FileSystems.match([path])
    return next((m.size_in_bytes for m in result.metadata_list if m.path == path), 0)


def _match(pattern: str) -> list[tuple[str, int]]:
    (result,) = FileSystems.match([pattern])
    return sorted((m.path, m.size_in_bytes) for m in result.metadata_list if not _is_folder(m.path))


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

    The CSV file is opened once: its header and first block (about 1 MB) are parsed,
    so a ragged row or invalid UTF-8 near the top fails here, before the run, for the
    cost of one block.

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
                reader = _csv_reader(handle)
                names = reader.schema.names
                schema = pa.schema([pa.field(name, pa.string()) for name in names])
                if len(set(names)) == len(names) and len(names) > 1:
                    # Types are guessed in this check; text columns are still checked
                    # for UTF-8 and every row for its cell count.
                    with contextlib.suppress(StopIteration):
                        reader.read_next_batch()
        if fmt == "csv" and len(names) == 1:
            # One column: blank lines are rows, read as the run reads them.
            with _open(path) as handle, contextlib.suppress(StopIteration):
                _csv_reader(handle, names).read_next_batch()
    except (pa.ArrowInvalid, OSError) as err:
        where = _csv_problem_position(path, len(names)) if fmt == "csv" else None
        raise InputError(_unreadable(path, err, where or "")) from err
    duplicates = sorted(name for name, n in Counter(schema.names).items() if n > 1)
    if duplicates:
        raise InputError(f"{path} repeats column name(s) {duplicates}; names must be unique")
    return schema


def parquet_metadata(path: str) -> pq.FileMetaData:
    """A Parquet file's footer: row groups, their rows and sizes; no data page is read.

    Raises:
        InputError: the footer cannot be read.
    """
    try:
        with _open_stored(path) as handle:
            return pq.ParquetFile(handle).metadata
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(_unreadable(path, err)) from err


def iter_tables(
    path: str,
    rows_per_chunk: int,
    *,
    row_groups: Sequence[int] | None = None,
    first_row: int = 0,
) -> Iterator[pa.Table]:
    """Streams a file as tables of `rows_per_chunk` rows (the last may be shorter).

    Args:
        path: the input file.
        rows_per_chunk: rows per table.
        row_groups: Parquet only: read just these row groups; None: the whole file.
        first_row: the file row the first table starts at (for error messages).

    Raises:
        InputError: part of the file cannot be parsed (a ragged CSV row, invalid
            UTF-8, a corrupt Parquet page); the message names the file and where: for
            CSV the data row and line of the problem, for Parquet how many rows were
            read before it.
    """
    rows = first_row
    names: list[str] = []

    def counted(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        nonlocal rows
        for batch in batches:
            yield batch
            rows += batch.num_rows

    try:
        with _open(path) as handle:
            if table_format(path) == "parquet":
                parquet = pq.ParquetFile(handle, buffer_size=_PARQUET_READ_BUFFER, pre_buffer=False)
                batches: Iterable[pa.RecordBatch] = parquet.iter_batches(
                    batch_size=rows_per_chunk, row_groups=row_groups
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


class TableWriter:
    """One open output file; Parquet or CSV with the same calls."""

    def __init__(self, path: str, schema: pa.Schema, fmt: str):
        self.path = path
        self._fmt = fmt
        self._handle = FileSystems.create(path, _MIME)
        if fmt == "parquet":
            self._writer = pq.ParquetWriter(self._handle, _parquet_schema(schema))
        else:
            self._writer = pacsv.CSVWriter(self._handle, csv_schema(schema))

    def write(self, table: pa.Table, row_group_size: int | None = None) -> None:
        """Appends `table`; Parquet: as row groups of `row_group_size` rows (pyarrow's
        default when None)."""
        if self._fmt == "csv":
            self._writer.write_table(to_csv_table(table))
        else:
            self._writer.write_table(table, row_group_size=row_group_size)

    def close(self) -> None:
        """Closes the writer and the file."""
        self._writer.close()
        self._handle.close()


def write_table(path: str, table: pa.Table, fmt: str) -> None:
    """Writes one whole table to `path` as Parquet or CSV."""
    writer = TableWriter(path, table.schema, fmt)
    writer.write(table)
    writer.close()


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
