"""transforms/io.py and transforms/work_items.py without models: Parquet / CSV reading and
writing, inputs, work items, ReadTables."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import decimal
import gzip
import hashlib
import io
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

import transforms.io
from transforms.chunks import ERRORS_COLUMN, ERRORS_TYPE, Chunk
from transforms.io import (
    InputError,
    expand_inputs,
    file_sha256,
    iter_tables,
    list_inputs,
    read_schema,
    table_format,
    write_table,
)
from transforms.staging import WorkItem, _WriteParts, check_coverage, find_staged_parts
from transforms.work_items import ReadTables, plan_work_items, write_listing

ROWS = 23


def _with_nulls(values, every: int = 4, offset: int = 3):
    """Every `every`-th value (from `offset`) replaced by None, so each column has nulls."""
    return [None if i % every == offset else v for i, v in enumerate(values)]


def _many_types_table(rows: int = ROWS) -> pa.Table:
    berlin = dt.datetime(2024, 3, 30, 23, 30, tzinfo=dt.timezone.utc)  # crosses DST
    utc = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    naive = dt.datetime(1999, 12, 31, 23, 59, 59)
    columns = {
        "i8": pa.array(_with_nulls([i - 10 for i in range(rows)]), pa.int8()),
        "i64": pa.array(_with_nulls([(i - 5) * 2**40 for i in range(rows)]), pa.int64()),
        "u32": pa.array(_with_nulls([2**32 - 1 - i for i in range(rows)]), pa.uint32()),
        "f64": pa.array(
            _with_nulls([float("nan") if i % 5 == 0 else i / 3 - 2 for i in range(rows)]),
            pa.float64(),
        ),
        "flag": pa.array(_with_nulls([i % 2 == 0 for i in range(rows)]), pa.bool_()),
        "text": pa.array(
            _with_nulls([f'café 👍 {i}\nline two\r\n"quoted", ok' for i in range(rows)]),
            pa.string(),
        ),
        "large": pa.array(
            _with_nulls([f"large ✓ {i}" * (i % 3) for i in range(rows)]), pa.large_string()
        ),
        "blob": pa.array(_with_nulls([bytes([i, 0, 255, 10]) for i in range(rows)]), pa.binary()),
        "ts_berlin": pa.array(
            _with_nulls([berlin + dt.timedelta(hours=i) for i in range(rows)]),
            pa.timestamp("us", tz="Europe/Berlin"),
        ),
        "ts_utc": pa.array(
            _with_nulls([utc + dt.timedelta(microseconds=7 * i) for i in range(rows)]),
            pa.timestamp("us", tz="UTC"),
        ),
        "ts_naive": pa.array(
            _with_nulls([naive + dt.timedelta(seconds=i) for i in range(rows)]), pa.timestamp("us")
        ),
        "day": pa.array(
            _with_nulls([dt.date(2000, 2, 28) + dt.timedelta(days=i) for i in range(rows)]),
            pa.date32(),
        ),
        "amount": pa.array(
            _with_nulls([decimal.Decimal(f"-{i}1234567890.123456") for i in range(rows)]),
            pa.decimal128(20, 6),
        ),
        "ints": pa.array(
            _with_nulls([list(range(i % 4)) for i in range(rows)]), pa.list_(pa.int64())
        ),
        "strs": pa.array(
            _with_nulls([["a", None, "ü\n"][: i % 4] for i in range(rows)]), pa.list_(pa.string())
        ),
        "pair": pa.array(
            _with_nulls([{"a": i, "b": None if i % 2 else f"s{i}"} for i in range(rows)]),
            pa.struct([("a", pa.int32()), ("b", pa.string())]),
        ),
        "mapping": pa.array(
            _with_nulls([[("k", i), ("z", None)][: i % 3] for i in range(rows)]),
            pa.map_(pa.string(), pa.int32()),
        ),
        "colour": pa.array(
            _with_nulls([["red", "green", "blue"][i % 3] for i in range(rows)]), pa.string()
        ).dictionary_encode(),
    }
    return pa.table(columns)


def _assert_identical(actual: pa.Table, expected: pa.Table) -> None:
    """Same schema (names, types, nullability) and the same values; NaN equals NaN.

    Schema metadata and the names of list/map child fields are not compared: pyarrow's
    Parquet reader itself names them (`element`, the column name), not the code under test.
    """
    assert actual.schema.equals(expected.schema), f"{actual.schema}\n!=\n{expected.schema}"
    assert [f.type for f in actual.schema] == [f.type for f in expected.schema]
    assert actual.num_rows == expected.num_rows
    for name in expected.column_names:
        got, want = actual.column(name), expected.column(name)
        if pa.types.is_floating(want.type):
            assert got.is_null().equals(want.is_null()), name
            assert pc.is_nan(got).equals(pc.is_nan(want)), name
            assert pc.fill_null(pc.if_else(pc.is_nan(got), 0.0, got), 0.0).equals(
                pc.fill_null(pc.if_else(pc.is_nan(want), 0.0, want), 0.0)
            ), name
        else:
            assert got.equals(want), name
            assert got.to_pylist() == want.to_pylist(), name


# --- Parquet ----------------------------------------------------------------------------------


def test_parquet_round_trip_keeps_every_type_and_value(tmp_path):
    table = _many_types_table()
    path = str(tmp_path / "many.parquet")
    pq.write_table(table, path, row_group_size=7)

    chunks = list(iter_tables(path, rows_per_chunk=5))

    assert [c.num_rows for c in chunks] == [5, 5, 5, 5, 3]
    for chunk in chunks:
        assert chunk.schema.equals(table.schema)
    _assert_identical(pa.concat_tables(chunks), table)
    schema = read_schema(path)
    assert schema.equals(table.schema)
    assert [f.type for f in schema] == [f.type for f in table.schema]
    assert not schema.metadata  # the footer's ARROW:schema entry is removed

    for index, chunk in enumerate(chunks):
        out = str(tmp_path / f"out-{index}.parquet")
        write_table(out, chunk, "parquet")
        _assert_identical(pq.read_table(out), chunk)


def test_parquet_rows_per_chunk_larger_than_file_gives_one_chunk(tmp_path):
    table = _many_types_table(rows=4)
    path = str(tmp_path / "small.parquet")
    pq.write_table(table, path, row_group_size=3)

    chunks = list(iter_tables(path, rows_per_chunk=100))

    assert [c.num_rows for c in chunks] == [4]
    _assert_identical(chunks[0], table)


def test_parquet_row_group_is_read_in_bounded_pieces(tmp_path, monkeypatch):
    # One row group of 4 MB (pyarrow writes a million rows per group by default): the
    # reader must fetch it page by page, not the whole column chunk into memory at once.
    rows = 40_000
    letters = pa.array([f"{i:08d}" + "abcdefghij" * 9 + "xy" for i in range(rows)])
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "text": letters})
    path = str(tmp_path / "one-group.parquet")
    pq.write_table(table, path, compression="none")
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    reads: list[int] = []
    open_stored = transforms.io._open_stored

    class _Counted(io.RawIOBase):
        def __init__(self, handle):
            self._handle = handle

        def read(self, size=-1):
            data = self._handle.read(size)
            reads.append(len(data))
            return data

        def seek(self, offset, whence=io.SEEK_SET):
            return self._handle.seek(offset, whence)

        def tell(self):
            return self._handle.tell()

        def seekable(self):
            return True

        def readable(self):
            return True

        def close(self):
            self._handle.close()
            super().close()

    monkeypatch.setattr(transforms.io, "_open_stored", lambda p: _Counted(open_stored(p)))

    chunks = list(iter_tables(path, rows_per_chunk=5000))

    assert pa.concat_tables(chunks).equals(table)
    assert sum(reads) >= 4_000_000
    assert max(reads) <= 1 << 20


_cells = {
    "text": st.text(max_size=12),
    "int": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "float": st.floats(allow_nan=False),
}
_arrow_types = {"text": pa.string(), "int": pa.int64(), "float": pa.float64()}


@st.composite
def _tables(draw) -> pa.Table:
    rows = draw(st.integers(min_value=1, max_value=30))
    kinds = draw(st.lists(st.sampled_from(sorted(_cells)), min_size=1, max_size=4))
    columns = {}
    for number, kind in enumerate(kinds):
        cell = _cells[kind]
        if draw(st.booleans()):
            cell = st.none() | cell
        values = draw(st.lists(cell, min_size=rows, max_size=rows))
        columns[f"c{number}_{kind}"] = pa.array(values, _arrow_types[kind])
    return pa.table(columns)


@settings(max_examples=25, deadline=None)
@given(table=_tables(), rows_per_chunk=st.integers(min_value=1, max_value=10))
def test_parquet_round_trip_property(tmp_path_factory, table, rows_per_chunk):
    path = str(tmp_path_factory.mktemp("prop") / "t.parquet")
    write_table(path, table, "parquet")

    chunks = list(iter_tables(path, rows_per_chunk=rows_per_chunk))

    sizes = [c.num_rows for c in chunks]
    full, rest = divmod(table.num_rows, rows_per_chunk)
    assert sizes == [rows_per_chunk] * full + ([rest] if rest else [])
    assert pa.concat_tables(chunks).equals(table, check_metadata=True)


# --- CSV reading ------------------------------------------------------------------------------

_CSV_BYTES = (
    b'id,text,note,"with ""quotes"""\r\n'
    b'007,"a, b","she said ""hi""",x\r\n'
    b'NA,"line one\nline two","crlf one\r\ncrlf two",null\r\n'
    b',"","  spaced  ",1e5\r\n'
    b"true,caf\xc3\xa9 \xf0\x9f\x91\x8d,NaN,-0\r\n"
    b'"",N/A,"",""\n'
)


def _python_csv(data: bytes) -> list[list[str]]:
    text = data.decode("utf-8-sig")
    return list(csv.reader(io.StringIO(text, newline="")))


def _as_rows(chunks: list[pa.Table]) -> list[list[str]]:
    return [list(row.values()) for chunk in chunks for row in chunk.to_pylist()]


def _check_csv_cells(path: str, data: bytes) -> None:
    expected = _python_csv(data)
    chunks = list(iter_tables(path, rows_per_chunk=100))
    for chunk in chunks:
        assert chunk.column_names == expected[0]
        assert all(field.type == pa.string() for field in chunk.schema)
    assert _as_rows(chunks) == expected[1:]


def test_csv_cells_are_exact_strings(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_bytes(_CSV_BYTES)

    _check_csv_cells(str(path), _CSV_BYTES)
    # Spot checks that do not depend on the csv module agreeing.
    rows = _as_rows(list(iter_tables(str(path), rows_per_chunk=100)))
    assert rows[0][0] == "007"
    assert rows[1][1] == "line one\nline two"
    assert rows[1][2] == "crlf one\r\ncrlf two"
    assert rows[2][:3] == ["", "", "  spaced  "]
    assert rows[3][1] == "café 👍"
    assert rows[1][3] == "null"
    assert rows[1][0] == "NA"


def test_csv_with_bom_has_clean_first_column_name(tmp_path):
    data = b"\xef\xbb\xbf" + _CSV_BYTES
    path = tmp_path / "bom.csv"
    path.write_bytes(data)

    assert read_schema(str(path)).names[0] == "id"
    _check_csv_cells(str(path), data)


def test_gzipped_csv_reads_the_same(tmp_path):
    plain = tmp_path / "cells.csv"
    plain.write_bytes(_CSV_BYTES)
    packed = tmp_path / "cells.csv.gz"
    packed.write_bytes(gzip.compress(_CSV_BYTES))

    _check_csv_cells(str(packed), _CSV_BYTES)
    assert read_schema(str(packed)) == read_schema(str(plain))
    assert pa.concat_tables(iter_tables(str(packed), 2)).equals(
        pa.concat_tables(iter_tables(str(plain), 2))
    )


def test_csv_chunks_keep_row_order(tmp_path):
    lines = ["n,text"] + [f'{i:04d},"row {i}\nsecond line"' for i in range(23)]
    path = tmp_path / "many.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    chunks = list(iter_tables(str(path), rows_per_chunk=5))

    assert [c.num_rows for c in chunks] == [5, 5, 5, 5, 3]
    assert [v for c in chunks for v in c.column("n").to_pylist()] == [f"{i:04d}" for i in range(23)]
    assert chunks[-1].column("text").to_pylist()[-1] == "row 22\nsecond line"


def test_read_schema_of_csv_is_all_strings(tmp_path):
    path = tmp_path / "typed.csv"
    path.write_text("count,price,when,ok\n1,2.5,2024-01-01,true\n", encoding="utf-8")

    schema = read_schema(str(path))

    assert schema == pa.schema(
        [("count", pa.string()), ("price", pa.string()), ("when", pa.string()), ("ok", pa.string())]
    )


def test_read_schema_rejects_duplicate_csv_header(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("text,label,text\na,b,c\n", encoding="utf-8")

    with pytest.raises(InputError, match="text"):
        read_schema(str(path))
    with pytest.raises(InputError, match="repeats"):
        list(iter_tables(str(path), rows_per_chunk=5))


# --- Inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        ("a.parquet", "parquet"),
        ("dir/A.PARQUET", "parquet"),
        ("a.csv", "csv"),
        ("gs://bucket/a.csv.gz", "csv"),
        ("A.CSV.GZ", "csv"),
    ],
)
def test_table_format_from_extension(path, fmt):
    assert table_format(path) == fmt


@pytest.mark.parametrize("path", ["notes.txt", "a.csv.txt", "parquet", "a.gz"])
def test_table_format_rejects_unknown_extension(path):
    with pytest.raises(InputError, match="cannot tell the format"):
        table_format(path)


def test_expand_inputs_returns_sorted_matches(tmp_path):
    for name in ["b.csv", "a.csv", "c.parquet", "a10.csv"]:
        (tmp_path / name).write_text("x\n1\n", encoding="utf-8")

    assert expand_inputs([str(tmp_path / "*.csv")]) == [
        str(tmp_path / name) for name in ["a.csv", "a10.csv", "b.csv"]
    ]
    both = expand_inputs([str(tmp_path / "c.parquet"), str(tmp_path / "*")])
    assert both == sorted(str(tmp_path / n) for n in ["a.csv", "a10.csv", "b.csv", "c.parquet"])


def test_expand_inputs_without_match_names_the_pattern(tmp_path):
    (tmp_path / "a.csv").write_text("x\n1\n", encoding="utf-8")
    pattern = str(tmp_path / "missing-*.parquet")

    with pytest.raises(InputError) as raised:
        expand_inputs([str(tmp_path / "a.csv"), pattern])

    assert pattern in str(raised.value)


def test_file_sha256_hashes_stored_bytes(tmp_path):
    data = gzip.compress(b"text\n" + "héllo\n".encode() * 1000)
    path = tmp_path / "data.csv.gz"
    path.write_bytes(data)

    assert file_sha256(str(path)) == (len(data), hashlib.sha256(data).hexdigest())


# --- CSV writing ------------------------------------------------------------------------------


def test_write_csv_turns_nested_cells_into_json(tmp_path):
    entity = pa.struct([("word", pa.string()), ("score", pa.float32()), ("start", pa.int32())])
    table = pa.table(
        {
            "text": pa.array(['a, "b"\nc', "", None, "plain 👍"], pa.string()),
            "entities": pa.array(
                [
                    [{"word": 'x "y"', "score": 0.5, "start": 0}],
                    [],
                    None,
                    [{"word": "ü,\n", "score": 0.25, "start": 3}, None],
                ],
                pa.list_(entity),
            ),
            "vector": pa.array([[0.1, -2.5e-7, 1e300], None, [], [1 / 3]], pa.list_(pa.float64())),
            "label": pa.array(["POS", "NEG", None, "POS"]).dictionary_encode(),
        }
    )
    path = tmp_path / "out.csv"

    write_table(str(path), table, "csv")

    with open(path, encoding="utf-8", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == table.column_names
    assert len(rows) == table.num_rows
    columns = dict(zip(header, zip(*rows, strict=True), strict=True))

    assert list(columns["text"]) == ['a, "b"\nc', "", "", "plain 👍"]
    for name in ["entities", "vector"]:
        for cell, value in zip(columns[name], table.column(name).to_pylist(), strict=True):
            if value is None:
                assert cell == ""
            else:
                assert json.loads(cell) == value
    assert list(columns["label"]) == ["POS", "NEG", "", "POS"]


# --- ReadTables in a pipeline -----------------------------------------------------------------


_READ_SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string())])
# Chunks carry no schema metadata (ReadTables drops the Parquet footer's ARROW:schema).
_SCHEMA_TEXT = _READ_SCHEMA.to_string(show_schema_metadata=True)


def _chunk_summary(chunk) -> tuple:
    """What a chunk says about its place in the input, plus its first and last row ids."""
    ids = chunk.table.column("id").to_pylist()
    return (chunk.file_index, chunk.first_row, chunk.rows_read, chunk.item_end, ids[0], ids[-1])


def _chunk_source(chunk) -> tuple:
    return (chunk.file_index, chunk.source, chunk.table.schema.to_string(show_schema_metadata=True))


def _input_summary(record) -> tuple:
    return (record["index"], record["sha256"], [item["rows"] for item in record["items"]])


def _write_ids(path, ids, row_group_size=None):
    table = pa.table({"id": ids, "text": [f"row {i}" for i in ids]}, schema=_READ_SCHEMA)
    pq.write_table(table, path, row_group_size=row_group_size)


def test_read_tables_plans_row_group_items_on_workers(tmp_path):
    big, small = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    _write_ids(big, list(range(12)), row_group_size=4)
    _write_ids(small, [100, 101, 102])
    listing = str(tmp_path / "listing.jsonl")
    write_listing(listing, list_inputs([big, small]))
    digest = {p: hashlib.sha256((tmp_path / p).read_bytes()).hexdigest() for p in (big, small)}

    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        # Work items of one row group each (1 byte target); chunks never cross an item.
        read = pipeline | "Read" >> ReadTables(
            listing, _READ_SCHEMA, str(tmp_path / "staged"), rows_per_chunk=3, work_item_bytes=1
        )
        assert_that(
            read["chunks"] | "Summarize" >> beam.Map(_chunk_summary),
            equal_to(
                [
                    (0, 0, 3, False, 0, 2),
                    (0, 3, 1, True, 3, 3),
                    (0, 4, 3, False, 4, 6),
                    (0, 7, 1, True, 7, 7),
                    (0, 8, 3, False, 8, 10),
                    (0, 11, 1, True, 11, 11),
                    (1, 0, 3, True, 100, 102),
                ]
            ),
            label="CheckChunks",
        )
        assert_that(
            read["chunks"] | "Sources" >> beam.Map(_chunk_source),
            equal_to([(0, big, _SCHEMA_TEXT)] * 6 + [(1, small, _SCHEMA_TEXT)]),
            label="CheckSources",
        )
        assert_that(
            read["inputs"] | "Inputs" >> beam.Map(_input_summary),
            equal_to([(0, digest[big], [4, 4, 4]), (1, digest[small], [3])]),
            label="CheckInputs",
        )
        assert_that(read["reused"], equal_to([]), label="CheckReused")


def test_plan_work_items_groups_row_groups_by_size_and_stops_at_the_limit(tmp_path):
    path = str(tmp_path / "a.parquet")
    _write_ids(path, list(range(10)), row_group_size=2)
    one_group = pq.ParquetFile(path).metadata.row_group(0)
    size = sum(one_group.column(i).total_compressed_size for i in range(one_group.num_columns))

    items = plan_work_items(3, path, "f" * 64, work_item_bytes=2 * size)
    assert [(i.first_row, i.rows, i.row_groups) for i in items] == [
        (0, 4, (0, 1)),
        (4, 4, (2, 3)),
        (8, 2, (4,)),
    ]
    assert {i.file_index for i in items} == {3}
    assert len({i.stem for i in items}) == 3
    # --limit 5: the items that hold the first five rows, the last one cut short.
    limited = plan_work_items(3, path, "f" * 64, work_item_bytes=2 * size, stop_row=5)
    assert [(i.first_row, i.rows, i.row_groups) for i in limited] == [
        (0, 4, (0, 1)),
        (4, 1, (2,)),
    ]
    csv_path = tmp_path / "b.csv"
    csv_path.write_text("id,text\n1,x\n")
    (whole,) = plan_work_items(0, str(csv_path), "e" * 64)
    assert (whole.first_row, whole.rows, whole.row_groups) == (0, None, None)


def test_workers_check_schemas_the_launcher_did_not_read(tmp_path):
    good, odd = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    _write_ids(good, [1, 2])
    pq.write_table(pa.table({"other": [1]}), odd)
    listing = str(tmp_path / "listing.jsonl")
    write_listing(listing, list_inputs([good, odd]))

    pipeline = beam.Pipeline(runner=FnApiRunner())
    read = pipeline | "Read" >> ReadTables(
        listing, _READ_SCHEMA, str(tmp_path / "staged"), checked=[0]
    )
    _ = read["chunks"] | beam.Map(lambda chunk: None)
    with pytest.raises(Exception, match="disagree on their columns") as raised:
        pipeline.run().wait_until_finish()
    assert odd in str(raised.value)


# --- Staging: parts written once, idempotent, coverage checked at publish ---------------------


def _item_chunks(item, rows: int, per_chunk: int) -> list:
    chunks = []
    for first in range(0, rows, per_chunk):
        count = min(per_chunk, rows - first)
        table = pa.table(
            {"id": list(range(first, first + count)), ERRORS_COLUMN: pa.nulls(count, ERRORS_TYPE)}
        )
        end = first + count == rows
        chunks.append(Chunk(0, "in.parquet", first, first, table, count, item=item, item_end=end))
    return chunks


def _stage(folder, chunks) -> list:
    writer = _WriteParts(str(folder), chunks[0].table.schema, "parquet")
    writer.start_bundle()
    infos = [info for chunk in chunks for info in writer.process(chunk)]
    return infos + [value.value for value in writer.finish_bundle()]


def test_a_rerun_work_item_replaces_its_part_with_the_same_content(tmp_path):
    item = WorkItem(0, "in.parquet", "a" * 64, 0, 10, (0,))
    chunks = _item_chunks(item.stem, 10, 4)
    (first,) = _stage(tmp_path, chunks)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (again,) = _stage(tmp_path, chunks)  # a retried or speculative duplicate

    assert first == again
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert sorted(before) == [f"{item.stem}.000000000000{s}" for s in (".done.json", ".parquet")]
    assert find_staged_parts(str(tmp_path), item) == [first]
    # Another item of the same file (other rows) is not found under this one's name.
    other = dataclasses.replace(item, first_row=10, rows=5)
    assert find_staged_parts(str(tmp_path), other) is None


def test_an_item_split_over_bundles_still_sorts_and_covers_its_rows(tmp_path):
    item = WorkItem(0, "in.parquet", "b" * 64, 0, 10, (0,))
    chunks = _item_chunks(item.stem, 10, 4)
    parts = _stage(tmp_path, chunks[:1]) + _stage(tmp_path, chunks[1:])  # two bundles

    assert [(p.first, p.rows, p.item_end) for p in parts] == [((0, 0), 4, False), ((0, 4), 6, True)]
    planned = [{"stem": item.stem, "first_row": 0, "rows": 10}]
    check_coverage(parts, planned)
    assert find_staged_parts(str(tmp_path), item) == parts
    with pytest.raises(RuntimeError, match="missing"):
        check_coverage(parts[1:], planned)
    with pytest.raises(RuntimeError, match="written twice"):
        check_coverage([*parts, parts[1]], planned)
    with pytest.raises(RuntimeError, match="missing"):
        check_coverage(parts[:1], planned)
