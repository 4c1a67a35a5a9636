"""The notebook API: a job spec's tasks on in-memory tables, equal to a pipeline run."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines.notebook
from pipelines import clear_model_cache, enrich_dataframe, enrich_table
from pipelines.cli import main
from pipelines.spec import SpecError
from tests.conftest import SAMPLE_DATA, sentiment_ner_spec
from transforms.io import InputError


@pytest.fixture(scope="module")
def reviews() -> pa.Table:
    return pq.read_table(SAMPLE_DATA / "reviews.parquet").slice(0, 20)


def test_enrich_table_equals_pipeline_run(tmp_path, tiny_models, reviews):
    source = tmp_path / "reviews.parquet"
    pq.write_table(reviews, source)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(json.dumps(sentiment_ner_spec(tiny_models)))  # JSON is YAML
    output = tmp_path / "out"
    assert main(["--input", str(source), "--output", str(output), "--spec", str(spec_path)]) == 0
    (part,) = output.glob("part-*.parquet")
    expected = pq.read_table(part)

    result = enrich_table(reviews, spec_path)

    # Same chunks, same micro-batches: the same values, bit for bit, and the same types.
    assert result.schema.remove_metadata() == expected.schema.remove_metadata()
    assert result.equals(expected.replace_schema_metadata(result.schema.metadata))
    assert result.select(reviews.column_names).equals(reviews)
    assert any(result.column("entities").to_pylist())


def test_enrich_dataframe_keeps_index_and_input_columns(tiny_models, reviews):
    df = reviews.to_pandas()
    df.index = pd.Index([f"row-{i}" for i in range(len(df))], name="key")

    result = enrich_dataframe(df, sentiment_ner_spec(tiny_models), progress=True)

    pd.testing.assert_frame_equal(result[df.columns], df)
    assert list(result.columns) == [
        *df.columns,
        "sentiment_label",
        "sentiment_score",
        "entities",
        "enrich_errors",
    ]
    assert result["sentiment_score"].dtype == "float32"
    assert set(result["sentiment_label"]) <= {"NEGATIVE", "POSITIVE"}
    first = result["entities"].iloc[0]
    assert all(
        entity.keys() == {"entity_group", "word", "score", "start", "end"} for entity in first
    )
    assert [list(errors) for errors in result["enrich_errors"]] == [[]] * len(df)


def test_bad_rows_become_errors_not_exceptions(tiny_models):
    texts = ["A fine, sturdy kettle.", None, "", "   ", "Paris welcomed the delegates."]
    table = pa.table({"text": pa.array(texts, pa.string())})

    result = enrich_table(table, sentiment_ner_spec(tiny_models))

    errors = result.column("enrich_errors").to_pylist()
    assert errors[0] == errors[4] == []
    for row in (1, 2, 3):
        assert [entry["task"] for entry in errors[row]] == ["sentiment", "entities"]
        assert errors[row][0]["error"].startswith("InvalidInput: text is")
    labels = result.column("sentiment_label").to_pylist()
    assert labels[1:4] == [None] * 3 and None not in (labels[0], labels[4])


def test_empty_table_gets_the_output_columns(tiny_models):
    empty = pa.table({"text": pa.array([], pa.string())})
    result = enrich_table(empty, sentiment_ner_spec(tiny_models))
    assert result.num_rows == 0
    assert result.column_names == [
        "text",
        "sentiment_label",
        "sentiment_score",
        "entities",
        "enrich_errors",
    ]


def test_bad_spec_raises_spec_error_naming_the_key(tiny_models, reviews):
    spec = sentiment_ner_spec(tiny_models)
    spec["tasks"][1]["params"] = {"aggregation": "simple"}
    with pytest.raises(SpecError, match=r"tasks\[1\]\.params\.aggregation: unknown key"):
        enrich_table(reviews, spec)
    with pytest.raises(SpecError, match="expected a JobSpec, a mapping or a YAML file's path"):
        enrich_table(reviews, 42)


def test_missing_column_and_column_clash_raise_input_error(tiny_models, reviews):
    with pytest.raises(InputError, match=r"reads column 'body'.*set `input:`"):
        enrich_table(reviews, sentiment_ner_spec(tiny_models, text_column="body"))
    clashing = reviews.append_column("sentiment_label", reviews.column("text"))
    with pytest.raises(InputError, match=r"already has column\(s\) \['sentiment_label'\]"):
        enrich_table(clashing, sentiment_ner_spec(tiny_models))
    mixed = pd.DataFrame({"text": ["fine", "also fine"], "id": [1, "two"]})
    with pytest.raises(InputError, match=r"Conversion failed for column id.*one type"):
        enrich_dataframe(mixed, sentiment_ner_spec(tiny_models))


def test_models_load_once_across_calls(monkeypatch, tiny_models, reviews):
    loads = []
    load_task = pipelines.notebook.load_task
    monkeypatch.setattr(
        pipelines.notebook,
        "load_task",
        lambda binding: loads.append(binding.name) or load_task(binding),
    )
    clear_model_cache()
    rows = reviews.slice(0, 4)

    first = enrich_table(rows, sentiment_ner_spec(tiny_models))
    second = enrich_table(rows, sentiment_ner_spec(tiny_models))
    assert loads == ["sentiment", "entities"]
    assert first.equals(second)

    changed = sentiment_ner_spec(tiny_models)
    changed["tasks"][1]["params"] = {"aggregation_strategy": "first"}
    enrich_table(rows, changed)  # other parameters: that task's model loads again
    assert loads == ["sentiment", "entities", "entities"]

    clear_model_cache()
    enrich_table(rows, sentiment_ner_spec(tiny_models))
    assert loads.count("sentiment") == 2
