"""End to end through the command line, on Parquet and CSV, as a user runs it."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.cli import main
from tests.conftest import SAMPLE_DATA, sentiment_ner_spec

MANIFEST_KEYS = {
    "run_id",
    "started_at",
    "finished_at",
    "argv",
    "runner",
    "options",
    "inputs",
    "output",
    "rows",
    "tasks",
    "spec",
    "versions",
}
TASK_KEYS = {
    "name",
    "task",
    "model",
    "requested_revision",
    "resolved_revision",
    "parameters",
    "device",
    "dtype",
    "devices_used",
    "batching",
    "rows",
    "succeeded",
    "failed",
    "rows_per_second",
}


def write_spec(path: Path, models: dict, **top) -> Path:
    spec = sentiment_ner_spec(models, **{"rows_per_chunk": 16, **top})
    spec["tasks"].append(
        {
            "name": "embedding",
            "task": "feature-extraction",
            "model": str(models["feature-extraction"]),
            "params": {"normalize": True},
        }
    )
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def read_parts(output: Path) -> pa.Table:
    parts = sorted(output.glob("part-*.parquet"))
    assert parts, "no part files"
    return pa.concat_tables(pq.read_table(p) for p in parts)


def read_csv_parts(output: Path) -> list[dict[str, str]]:
    parts = sorted(output.glob("part-*.csv"))
    assert parts, "no part files"
    return [
        row
        for part in parts
        for row in csv.DictReader(io.StringIO(part.read_text(encoding="utf-8"), newline=""))
    ]


def test_parquet_end_to_end(tmp_path, tiny_models):
    spec = write_spec(tmp_path / "job.yaml", tiny_models)
    output = tmp_path / "out"
    source = SAMPLE_DATA / "reviews.parquet"
    code = main(["--input", str(source), "--output", str(output), "--spec", str(spec)])
    assert code == 0

    original = pq.read_table(source)
    result = read_parts(output).sort_by("id")
    # Input columns first, unchanged, with their exact types (dictionary, date32, ...).
    assert result.select(original.column_names).equals(original.sort_by("id"))
    assert result.column_names == [
        *original.column_names,
        "sentiment_label",
        "sentiment_score",
        "entities",
        "embedding",
        "enrich_errors",
    ]
    assert result.schema.field("sentiment_score").type == pa.float32()
    assert result.schema.field("embedding").type == pa.list_(pa.float32())
    entity = result.schema.field("entities").type.value_type
    assert [f.name for f in entity] == ["entity_group", "word", "score", "start", "end"]
    assert entity.field("start").type == pa.int32()
    assert result.column("enrich_errors").to_pylist() == [[]] * original.num_rows

    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest.keys() >= MANIFEST_KEYS
    assert manifest["rows"] == {
        "in": 71,
        "limit": None,
        "out": 71,
        "failed": {"sentiment": 0, "entities": 0, "embedding": 0},
    }
    (entry,) = manifest["inputs"]
    assert entry["size"] == source.stat().st_size and len(entry["sha256"]) == 64
    for task in manifest["tasks"]:
        assert task.keys() >= TASK_KEYS
        assert task["resolved_revision"].startswith("sha256:")
        assert task["devices_used"] == ["cpu/fp32"]
        assert task["succeeded"] + task["failed"] == task["rows"] == 71
        assert task["model_loads"] == 1  # in process: this process is the one worker
    # The pooling the model used, resolved from its files, is recorded beside the params.
    assert manifest["tasks"][2]["parameters"]["normalize"] is True
    assert manifest["tasks"][2]["parameters"]["pooling"] == "mean"
    assert {"python", "apache-beam", "transformers", "torch", "pyarrow"} <= manifest[
        "versions"
    ].keys()
    assert (output / "errors.jsonl").read_text() == ""
    assert not (output / "_temporary").exists()


def test_csv_end_to_end_multiprocess_with_bad_rows(tmp_path, tiny_models):
    """CSV in, CSV out, on two worker processes; blank texts become per-row errors.

    The sentiment model is shared by the machine (`share_model: machine`: one model served
    to both SDK processes through MultiProcessShared); its column equals an in-process run's.
    """
    raw = (SAMPLE_DATA / "reviews.csv").read_bytes()
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    header, body = rows[0], rows[1:]
    text = header.index("text")
    body[3][text] = ""
    body[10][text] = "   "
    source = tmp_path / "in.csv"
    with source.open("w", encoding="utf-8-sig", newline="") as handle:  # with a BOM
        csv.writer(handle).writerows([header, *body])

    spec = write_spec(tmp_path / "job.yaml", tiny_models)
    shared = json.loads(spec.read_text())
    shared["tasks"][0]["share_model"] = "machine"
    shared_spec = tmp_path / "machine.yaml"
    shared_spec.write_text(json.dumps(shared))
    output = tmp_path / "out"
    code = main(
        [
            "--input",
            str(source),
            "--output",
            str(output),
            "--spec",
            str(shared_spec),
            "--direct_running_mode=multi_processing",
            "--direct_num_workers=2",
        ]
    )
    assert code == 0
    # The reference runs in process, as the fastest run does, each model its own.
    reference = tmp_path / "in-process"
    assert main(["--input", str(source), "--output", str(reference), "--spec", str(spec)]) == 0

    out_rows = read_csv_parts(output)
    assert list(out_rows[0])[: len(header)] == header
    by_id = {row["id"]: row for row in out_rows}
    assert len(by_id) == len(body) == len(out_rows)
    for cells in body:  # every input cell, exactly as it was
        assert [by_id[cells[0]][name] for name in header] == cells

    bad = {body[3][0], body[10][0]}
    for row_id, row in by_id.items():
        errors = json.loads(row["enrich_errors"])
        if row_id in bad:
            assert {e["task"] for e in errors} == {"sentiment", "entities", "embedding"}
            assert row["sentiment_label"] == "" and row["entities"] == ""
        else:
            assert errors == []
            assert row["sentiment_label"] in {"POSITIVE", "NEGATIVE"}
            assert isinstance(json.loads(row["entities"]), list)
            assert len(json.loads(row["embedding"])) == 32

    records = [json.loads(line) for line in (output / "errors.jsonl").read_text().splitlines()]
    assert sorted({(r["row"], r["task"]) for r in records}) == sorted(
        (row, task) for row in (3, 10) for task in ("sentiment", "entities", "embedding")
    )
    assert all(r["file"] == str(source) and r["error_type"] == "InvalidInput" for r in records)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["rows"]["failed"] == {"sentiment": 2, "entities": 2, "embedding": 2}
    assert manifest["options"]["direct_num_workers"] == 2
    # No SDK process loaded the shared model: the machine's model server holds it.
    assert manifest["tasks"][0]["model_loads"] == 0

    by_id_in_process = {row["id"]: row for row in read_csv_parts(reference)}
    assert by_id_in_process.keys() == by_id.keys()
    for row_id, row in by_id.items():
        expected = by_id_in_process[row_id]
        for name in ("sentiment_label", "sentiment_score"):
            assert row[name] == expected[name], (row_id, name)


def test_keep_order_across_files(tmp_path, tiny_models):
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet")
    inputs = tmp_path / "in"
    inputs.mkdir()
    pq.write_table(table.slice(0, 40), inputs / "a.parquet")
    pq.write_table(table.slice(40), inputs / "b.parquet")
    spec = write_spec(tmp_path / "job.yaml", tiny_models, keep_order=True, rows_per_chunk=7)
    output = tmp_path / "out"
    assert (
        main(
            [
                "--input",
                str(inputs / "*.parquet"),
                "--output",
                str(output),
                "--spec",
                str(spec),
                "--direct_num_workers=2",
                "--direct_running_mode=multi_threading",
            ]
        )
        == 0
    )
    # keep_order: part files in input order (one per work item), rows in order inside.
    parts = sorted(output.glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:05d}-of-00002.parquet" for i in range(2)]
    ids = [i for part in parts for i in pq.read_table(part).column("id").to_pylist()]
    assert ids == table.column("id").to_pylist()


def test_rerun_replaces_previous_output(tmp_path, tiny_models):
    spec = write_spec(tmp_path / "job.yaml", tiny_models)
    output = tmp_path / "out"
    source = SAMPLE_DATA / "reviews.parquet"
    args = ["--input", str(source), "--output", str(output), "--spec", str(spec)]
    assert main(args) == 0
    first = json.loads((output / "manifest.json").read_text())["run_id"]
    (output / "part-00099-of-00100.parquet").write_bytes(b"stale")
    assert main(args) == 0
    second = json.loads((output / "manifest.json").read_text())
    assert second["run_id"] != first
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [
            *(Path(f["path"]).name for f in second["output"]["files"]),
            "errors.jsonl",
            "manifest.json",
            "report.html",
        ]
    )


def test_missing_column_and_column_clash_exit_2(tmp_path, tiny_models, capsys):
    spec = tmp_path / "job.yaml"
    source = str(SAMPLE_DATA / "reviews.parquet")
    model = str(tiny_models["text-classification"])
    spec.write_text(
        json.dumps(
            {
                "tasks": [
                    {"name": "s", "task": "sentiment-analysis", "model": model, "input": "body"}
                ]
            }
        )
    )
    assert main(["--input", source, "--output", str(tmp_path / "o"), "--spec", str(spec)]) == 2
    assert "column 'body'" in capsys.readouterr().err

    spec.write_text(
        json.dumps({"tasks": [{"name": "source", "task": "feature-extraction", "model": model}]})
    )
    assert main(["--input", source, "--output", str(tmp_path / "o"), "--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "['source']" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_inputs_the_launcher_did_not_read_fail_the_run_on_workers(
    tmp_path, tiny_models, capsys, monkeypatch
):
    """Past the launcher's sample, workers check each file as they plan it: a corrupt
    footer or other columns fail the run with exit 2, the file named, nothing published."""
    import pipelines.job

    monkeypatch.setattr(pipelines.job, "CHECKED_FILES", 2)
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet").slice(0, 4)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "c"):
        pq.write_table(table, inputs / f"{name}.parquet")
    spec = write_spec(tmp_path / "job.yaml", tiny_models)
    output = tmp_path / "out"
    args = ["--input", str(inputs), "--output", str(output), "--spec", str(spec)]
    for bad, content in (("b-other", None), ("b-corrupt", b"PAR1 not a parquet file PAR1")):
        path = inputs / f"{bad}.parquet"
        if content is None:
            pq.write_table(pa.table({"other": [1]}), path)
        else:
            path.write_bytes(content)
        assert main([*args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("beam-enrich: error: ") and str(path) in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not output.exists()
        path.unlink()


def test_inputs_without_rows_give_one_empty_part_with_the_full_schema(tmp_path, tiny_models):
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet").slice(0, 0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    pq.write_table(table, inputs / "a.parquet")
    pq.write_table(table, inputs / "b.parquet")
    spec = write_spec(tmp_path / "job.yaml", tiny_models)
    output = tmp_path / "out"
    assert main(["--input", str(inputs), "--output", str(output), "--spec", str(spec)]) == 0

    (part,) = output.glob("part-*.parquet")
    assert part.name == "part-00000-of-00001.parquet"
    written = pq.read_table(part)
    assert written.num_rows == 0
    assert written.column_names[: table.num_columns] == table.column_names
    assert written.column_names[-1] == "enrich_errors"
    manifest = json.loads((output / "manifest.json").read_text())
    assert (manifest["rows"]["in"], manifest["rows"]["out"]) == (0, 0)
    assert [entry["work_items"] for entry in manifest["inputs"]] == [0, 0]


def test_missing_model_directory_exits_2(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(
        json.dumps(
            {"tasks": [{"name": "s", "task": "sentiment-analysis", "model": "./no/such/model"}]}
        )
    )
    code = main(
        [
            "--input",
            str(SAMPLE_DATA / "reviews.parquet"),
            "--output",
            str(tmp_path / "o"),
            "--spec",
            str(spec),
        ]
    )
    assert code == 2
    assert "./no/such/model" in capsys.readouterr().err


def test_validate_checks_without_running(tmp_path, tiny_models, capsys):
    spec = write_spec(tmp_path / "job.yaml", tiny_models)
    source = str(SAMPLE_DATA / "reviews.csv")
    assert main(["validate", "--spec", str(spec), "--input", source]) == 0
    out = capsys.readouterr().out
    assert "is valid for 1 input file(s)" in out
    assert "entities: ner reading text with" in out and "sha256:" in out

    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"tasks": [{"name": "s", "task": "ner", "input": "body"}]}))
    assert main(["validate", "--spec", str(bad), "--input", source]) == 2
    assert "column 'body'" in capsys.readouterr().err


def test_input_folder_means_the_table_files_in_it(tmp_path):
    from transforms.io import expand_inputs

    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "b.csv").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    expected = [str(tmp_path / "a.parquet"), str(tmp_path / "b.csv")]
    assert expand_inputs([str(tmp_path)]) == expected
    assert expand_inputs([f"{tmp_path}/"]) == expected
    assert expand_inputs([str(tmp_path / "*.csv")]) == expected[1:]


def test_failed_run_exits_1_and_leaves_no_manifest_and_no_parts(tmp_path, tiny_models, capsys):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["feature-extraction"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        json.dumps({"tasks": [{"name": "e", "task": "feature-extraction", "model": str(broken)}]})
    )
    output = tmp_path / "out"
    args = ["--input", str(SAMPLE_DATA / "reviews.csv"), "--output", str(output)]
    assert main([*args, "--spec", str(spec)]) == 1
    err = capsys.readouterr().err
    assert err.strip().endswith(f"nothing was written to {output}")
    assert "safetensors" in err.lower() or "header" in err.lower()
    assert not (output / "manifest.json").exists()
    assert not list(output.glob("part-*"))


def test_local_workers_get_their_share_of_the_cores():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.job import _cpu_threads_per_process

    cores = os.cpu_count()
    two = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert _cpu_threads_per_process(two) == max(1, cores // 2)
    assert _cpu_threads_per_process(PipelineOptions([])) is None
    assert _cpu_threads_per_process(PipelineOptions(["--runner=DataflowRunner"])) is None
