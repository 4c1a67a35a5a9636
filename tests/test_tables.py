"""Input and output tables keep every row, type and metadata: Parquet metadata, CSV blank
lines, CSV output of every type, invalid UTF-8, literal paths, error positions, staging."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from transforms.chunks import ERRORS_COLUMN, ERRORS_TYPE, Chunk
from transforms.io import (
    InputError,
    check_output_schema,
    expand_inputs,
    iter_tables,
    neutralize_formulas,
    write_table,
)
from transforms.staging import _WriteParts


def _spec(path: Path, models: dict, **top) -> Path:
    task = {"name": "s", "task": "sentiment-analysis", "model": str(models["text-classification"])}
    path.write_text(json.dumps({"rows_per_chunk": 4, **top, "tasks": [task]}))
    return path


def _run(tmp_path: Path, spec: Path, *inputs: Path, extra=()) -> tuple[int, Path]:
    output = tmp_path / "out"
    args = [a for i in inputs for a in ("--input", str(i))]
    return main([*args, "--output", str(output), "--spec", str(spec), *extra]), output


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("beam-enrich: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- 4: file-level Parquet metadata ------------------------------------------------------


def test_pandas_dtypes_index_and_metadata_keys_survive(tmp_path, tiny_models):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {
            "text": ["A fine day.", "Awful.", "Fine, I guess."],
            "n": pd.array([1, None, 3], dtype="Int64"),
        },
        index=pd.Index(["a", "b", "c"], name="key"),
    )
    source = tmp_path / "frame.parquet"
    frame.to_parquet(source)
    table = pq.read_table(source)
    geo = json.dumps({"version": "1.1.0", "primary_column": "geometry", "columns": {}})
    extra = {b"geo": geo.encode(), b"owner": b"team-data"}
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, **extra}), source)

    code, output = _run(tmp_path, _spec(tmp_path / "job.yaml", tiny_models), source)

    assert code == 0
    (part,) = output.glob("part-*.parquet")
    result = pd.read_parquet(part)
    assert result.index.equals(frame.index)
    assert result[frame.columns].dtypes.equals(frame.dtypes)
    assert result[frame.columns].equals(frame)
    assert result["s_score"].dtype == "float32"
    metadata = pq.read_schema(part).metadata
    assert metadata[b"geo"] == extra[b"geo"] and metadata[b"owner"] == b"team-data"
    # CSV output of the same schema: the metadata does not reach (or break) the header.
    schema = pq.read_schema(part)
    write_table(str(tmp_path / "t.csv"), schema.empty_table(), "csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith('"text","n","key"')


# --- 5: blank lines in CSV ------------------------------------------------------------------


def test_one_column_csv_keeps_blank_lines_as_empty_cells(tmp_path, tiny_models):
    source = tmp_path / "texts.csv"
    source.write_text("text\nA fine day.\n\nAwful.\n")  # the final newline adds no row
    wide = tmp_path / "wide.csv"
    wide.write_text("id,text\n1,A fine day.\n\n2,Awful.\n")
    assert pa.concat_tables(iter_tables(str(wide), 10)).column("id").to_pylist() == ["1", "2"]

    code, output = _run(tmp_path, _spec(tmp_path / "job.yaml", tiny_models), source)

    assert code == 0
    (part,) = output.glob("part-*.csv")
    rows = pacsv.read_csv(part, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    assert rows.column("text").to_pylist() == ["A fine day.", "", "Awful."]
    errors = [json.loads(cell) for cell in rows.column("enrich_errors").to_pylist()]
    assert errors[0] == [] and errors[2] == []
    assert errors[1] == [{"task": "s", "error": "InvalidInput: text is empty"}]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["rows"]["in"] == manifest["rows"]["out"] == 3


# --- 8: CSV output of every column type -------------------------------------------------


def test_csv_output_writes_every_convertible_type(tmp_path):
    table = pa.table(
        {
            "view": pa.array(["=1+1", "plain"], pa.string_view()),
            "large": pa.array(["@SUM(A1)", "ok"], pa.large_string()),
            "bytes": pa.array([b"\xff\x00", None], pa.binary()),
            "large_bytes": pa.array([b"\xed\xa0\x80", b""], pa.large_binary()),
            "fixed": pa.array([b"\x01\x02", b"\xfe\xff"], pa.binary(2)),
            "nested": pa.array([{"raw": b"\x00"}, None], pa.struct([("raw", pa.binary())])),
            "map": pa.array([[("k", 1)], []], pa.map_(pa.string(), pa.int32())),
            "encoded": pa.array(["=x", "y"]).dictionary_encode(),
            "json": pa.array(['{"a": 1}', "[]"], pa.json_()),
        }
    )
    check_output_schema(table.schema, "csv")
    path = tmp_path / "all.csv"
    write_table(str(path), neutralize_formulas(table), "csv")
    read = pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(table.column_names, pa.string()),
            strings_can_be_null=True,  # a null is an unquoted empty cell, "" stays ""
            quoted_strings_can_be_null=False,
        ),
    ).to_pydict()
    assert read["view"] == ["'=1+1", "plain"]
    assert read["large"] == ["'@SUM(A1)", "ok"]
    assert read["bytes"] == ["ff00", None]
    assert read["large_bytes"] == ["eda080", ""]
    assert read["fixed"] == ["0102", "feff"]
    assert read["nested"] == ['{"raw": "00"}', None]
    assert read["map"] == ['[["k", 1]]', "[]"]
    assert read["encoded"] == ["'=x", "y"]
    assert read["json"] == ['{"a": 1}', "[]"]


def test_csv_output_refuses_before_the_run_a_type_it_cannot_write():
    # Parquet cannot store intervals, so no input brings one: the check guards the rest.
    schema = pa.schema([("text", pa.string()), ("gap", pa.month_day_nano_interval())])
    with pytest.raises(InputError, match=r"'gap' \(month_day_nano_interval\).*--output-format"):
        check_output_schema(schema, "csv")
    check_output_schema(schema, "parquet")


def test_parquet_types_reach_csv_output_after_inference(tmp_path, tiny_models):
    source = tmp_path / "types.parquet"
    table = pa.table(
        {
            "text": pa.array(["=A fine day.", "Awful."], pa.large_string()),
            "view": pa.array(["-3", "b"], pa.string_view()),
            "raw": pa.array([b"\xff\xfe", b"ok"], pa.binary()),
            "id": pa.array([b"0123456789abcdef"] * 2, pa.uuid()),
        }
    )
    pq.write_table(table, source)

    spec = _spec(tmp_path / "job.yaml", tiny_models)
    extra = ["--output-format", "csv", "--csv-neutralize-formulas"]
    code, output = _run(tmp_path, spec, source, extra=extra)

    assert code == 0
    (part,) = output.glob("part-*.csv")
    exact = pacsv.ConvertOptions(column_types={"id": pa.string()}, strings_can_be_null=False)
    read = pacsv.read_csv(part, convert_options=exact)
    assert read.column("text").to_pylist() == ["'=A fine day.", "Awful."]
    assert read.column("view").to_pylist() == ["'-3", "b"]
    assert read.column("raw").to_pylist() == ["fffe", "6f6b"]
    assert read.column("id").to_pylist() == [b"0123456789abcdef".hex()] * 2


# --- 9: invalid UTF-8 in a Parquet text column ------------------------------------------


def test_invalid_utf8_in_parquet_text_fails_only_its_row(tmp_path, tiny_models):
    # pyarrow checks UTF-8 when it builds arrays from Python, not from raw buffers.
    payload = b"Good.\xed\xa0\x80Bad.Fine."
    offsets = pa.array([0, 5, 12, 17], pa.int32()).buffers()[1]
    texts = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(payload)])
    source = tmp_path / "java.parquet"
    pq.write_table(pa.table({"text": texts}), source)

    code, output = _run(tmp_path, _spec(tmp_path / "job.yaml", tiny_models), source)

    assert code == 0
    (part,) = output.glob("part-*.parquet")
    result = pq.read_table(part)
    cells = result.column("text").cast(pa.binary()).to_pylist()
    assert cells == [b"Good.", b"\xed\xa0\x80Bad.", b"Fine."]
    errors = result.column("enrich_errors").to_pylist()
    assert errors[0] == [] and errors[2] == []
    assert len(errors[1]) == 1 and "text is not valid UTF-8" in errors[1][0]["error"]
    assert result.column("s_label").to_pylist()[1] is None
    assert None not in [result.column("s_label").to_pylist()[i] for i in (0, 2)]


# --- 15: literal paths with glob characters ---------------------------------------------


def test_an_existing_path_with_brackets_is_taken_literally(tmp_path):
    named = tmp_path / "[2024] data.parquet"
    pq.write_table(pa.table({"text": ["x"]}), named)
    (tmp_path / "2 data.parquet").write_bytes(b"")  # what the glob `[2024] data` matches

    assert expand_inputs([str(named)]) == [str(named)]


# --- 16, 17: where an unreadable CSV goes wrong, in one printable line -------------------


def test_csv_errors_past_the_first_block_name_their_row_and_line(tmp_path):
    rows = [f"{i},{'text ' * 40}" for i in range(6000)]
    ragged, broken = list(rows), list(rows)
    ragged[4999] = "1,2,3"
    ragged_path = tmp_path / "ragged.csv"
    ragged_path.write_text("id,text\n" + "\n".join(ragged) + "\n")
    lines = [line.encode() for line in broken]
    lines[5414] = b'5414,"quoted\nacross lines"'
    lines[5415] = b"5415,caf\xed\xa0\x80"
    broken_path = tmp_path / "broken.csv"
    broken_path.write_bytes(b"id,text\n" + b"\n".join(lines) + b"\n")

    with pytest.raises(InputError, match=r"at data row 5000 \(line 5001\): .*got 3: 1,2,3"):
        list(iter_tables(str(ragged_path), 512))
    with pytest.raises(InputError, match=r"at data row 5416 \(line 5418\): .*UTF8"):
        list(iter_tables(str(broken_path), 512))


def test_binary_content_named_csv_gives_one_printable_line_saying_what_it_is(tmp_path):
    columns = {"text": [f"row {i}\x00\x01\x7f" for i in range(200)], "n": list(range(200))}
    parquet = tmp_path / "table.csv"
    pq.write_table(pa.table(columns), parquet, compression="none")
    packed = tmp_path / "packed.csv"
    packed.write_bytes(gzip.compress(b"text\nhello\n"))

    messages = []
    for path in (parquet, packed):
        with pytest.raises(InputError) as raised:
            list(iter_tables(str(path), 100))
        messages.append(str(raised.value))

    assert all(message.isprintable() and len(message) < 700 for message in messages)
    assert "looks Parquet" in messages[0] and "name it .parquet" in messages[0]
    assert "looks gzip-compressed" in messages[1] and "name it .csv.gz" in messages[1]


# --- 19: keep_order staging and row groups ----------------------------------------------


def test_keep_order_resume_leaves_no_merged_copies_and_few_row_groups(tmp_path, tiny_models):
    sources = []
    for name, count in (("a.parquet", 7), ("b.parquet", 5)):
        sources.append(tmp_path / name)
        pq.write_table(pa.table({"text": [f"{name} row {i}" for i in range(count)]}), sources[-1])
    spec = _spec(tmp_path / "job.yaml", tiny_models, rows_per_chunk=1, keep_order=True)

    for extra in ([], ["--resume"], ["--resume"]):
        code, output = _run(tmp_path, spec, *sources, extra=extra)
        assert code == 0

    # One part per work item (here: per file), named in input order, written once.
    parts = sorted(output.glob("part-*.parquet"))
    assert len(parts) == 2
    assert all(pq.ParquetFile(part).num_row_groups == 1 for part in parts)
    assert pa.concat_tables(pq.read_table(p) for p in parts).column("text").to_pylist() == [
        f"{source.name} row {i}"
        for source, count in zip(sources, (7, 5), strict=True)
        for i in range(count)
    ]
    staging = tmp_path / ".out.beam-enrich"
    assert not [path for path in staging.rglob("*") if "merged" in path.name]
    staged = [p for p in staging.rglob("*.parquet")]
    assert staged and all(pq.ParquetFile(p).num_row_groups == 1 for p in staged)


def test_staged_parts_hold_row_groups_of_many_chunks(tmp_path):
    schema = pa.schema([("n", pa.int64()), (ERRORS_COLUMN, ERRORS_TYPE)])
    writer = _WriteParts(str(tmp_path), schema, "parquet")
    writer.start_bundle()
    infos = []
    for i in range(30):
        table = pa.table({"n": [i], ERRORS_COLUMN: pa.array([None], ERRORS_TYPE)})
        chunk = Chunk(0, "in.parquet", i, i, table, rows_read=1, item="item")
        chunk = dataclasses.replace(chunk, item_end=i == 29)
        infos.extend(writer.process(chunk))
    assert list(writer.finish_bundle()) == []

    (info,) = infos
    assert (info.first, info.rows, info.item_end) == ((0, 0), 30, True)
    assert pq.ParquetFile(info.path).num_row_groups == 1
    assert pq.read_table(info.path).column("n").to_pylist() == list(range(30))
