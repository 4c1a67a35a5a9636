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


def _unreadable(path: str, err: BaseException, rows_before: int | None = None) -> str:
    # One line: pyarrow's reason (for a CSV parse error it quotes the bad row), where.
    reason = " ".join(str(err).split())[:300]
    where = "" if rows_before is None else f" after its first {rows_before} data row(s)"
    return f"cannot read {path}{where}: {reason}; fix the file or leave it out of --input"


def read_schema(path: str) -> pa.Schema:
    """The schema of one input file, read from the Parquet footer or the CSV header.

    A CSV file's first block (about 1 MB) is parsed too, so a ragged row or invalid
    UTF-8 near the top fails here, before the run, for the cost of one block.

    Raises:
        InputError: the file is empty or unreadable, has no header, or repeats a
            column name.
    """
    fmt = table_format(path)
    try:
        with _open(path) as handle:
            if fmt == "parquet":
                schema = pq.read_schema(handle)
            else:
                names = _csv_reader(handle).schema.names
                schema = pa.schema([pa.field(name, pa.string()) for name in names])
        if fmt == "csv" and len(set(schema.names)) == len(schema.names):
            with _open(path) as handle, contextlib.suppress(StopIteration):
                _csv_reader(handle, schema.names).read_next_batch()
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(_unreadable(path, err)) from err
    duplicates = sorted(name for name, n in Counter(schema.names).items() if n > 1)
    if duplicates:
        raise InputError(f"{path} repeats column name(s) {duplicates}; names must be unique")
    return schema.remove_metadata()


def iter_tables(path: str, rows_per_chunk: int) -> Iterator[pa.Table]:
    """Streams a file as tables of `rows_per_chunk` rows (the last may be shorter).

    Raises:
        InputError: part of the file cannot be parsed (a ragged CSV row, invalid
            UTF-8, a corrupt Parquet page); the message names the file and how many
            rows were read before the problem (pyarrow's streaming readers do not
            know line numbers; for a CSV parse error it quotes the bad row).
    """
    rows = 0

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
                batches = _csv_reader(handle, read_schema(path).names)
            yield from _rebatch(counted(batches), rows_per_chunk)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(_unreadable(path, err, rows)) from err


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
        flagged = pc.match_substring_regex(array, _FORMULA_START)
        return pc.if_else(flagged, pc.binary_join_element_wise("'", array, ""), array)

    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        type_ = field.type
        if pa.types.is_string(type_) or pa.types.is_large_string(type_):
            column = neutralize(column)
        elif pa.types.is_dictionary(type_) and (
            pa.types.is_string(type_.value_type) or pa.types.is_large_string(type_.value_type)
        ):
            column = pa.chunked_array(
                [
                    pa.DictionaryArray.from_arrays(chunk.indices, neutralize(chunk.dictionary))
                    for chunk in column.chunks
                ],
                type_,
            )
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=table.schema)


def neutralize_chunk_formulas(chunk: Chunk) -> Chunk:
    """`neutralize_formulas` on a chunk's table."""
    return dataclasses.replace(chunk, table=neutralize_formulas(chunk.table))


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


def concatenate_parts(
    sources: Sequence[str], destination: str, fmt: str, schema: pa.Schema
) -> None:
    """Concatenates part files into one, in order, one row group (or block) at a time."""
    if fmt == "parquet":
        with FileSystems.create(destination, _MIME) as out:
            writer = None
            for source in sources:
                with FileSystems.open(source, _MIME) as handle:
                    staged = pq.ParquetFile(handle)
                    if writer is None:
                        writer = pq.ParquetWriter(out, staged.schema_arrow)
                    for group in range(staged.num_row_groups):
                        writer.write_table(staged.read_row_group(group))
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
