"""JSON-Schema typed output: schema -> Arrow types, spec checks.

SmolLM2 constrained to a schema: `test_task_chat.py`, which loads the model once for
every test of it.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipelines.spec import SpecError, parse_spec
from tests.smollm2 import REVIEW_SCHEMA
from transforms.json_schema import SchemaError, arrow_type, load_schema, to_arrow_value


def test_schema_types_map_to_arrow_types():
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "count": {"type": "integer"},
            "price": {"type": "number"},
            "ok": {"type": "boolean"},
            "mood": {"enum": ["up", "down"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"$ref": "#/$defs/Place"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["name", "count", "price", "ok", "mood", "tags", "where"],
        "$defs": {
            "Place": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "lat": {"type": "number"}},
                "required": ["city"],
            }
        },
    }
    place = pa.struct([pa.field("city", pa.string(), False), pa.field("lat", pa.float64())])
    assert arrow_type(load_schema(schema)) == pa.struct(
        [
            pa.field("name", pa.string(), False),
            pa.field("count", pa.int64(), False),
            pa.field("price", pa.float64(), False),
            pa.field("ok", pa.bool_(), False),
            pa.field("mood", pa.string(), False),
            pa.field("tags", pa.list_(pa.string()), False),
            pa.field("where", place, False),
            pa.field("note", pa.string()),
        ]
    )


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object", "properties": {"x": {"type": "nope"}}}, "not a valid JSON Schema"),
        ({"type": "string"}, "top level must be"),
        ({"type": "object", "properties": {"x": {"type": ["string", "integer"]}}}, "x.type"),
        ({"type": "object", "properties": {"x": {"type": "array"}}}, r"properties\.x\.items"),
        ({"type": "object", "properties": {"x": {"enum": ["a", 1]}}}, r"properties\.x\.enum"),
        (
            {"type": "object", "properties": {"x": {}}, "additionalProperties": True},
            "additionalProperties",
        ),
    ],
)
def test_schemas_without_an_arrow_type_are_refused(schema, message):
    with pytest.raises(SchemaError, match=message):
        arrow_type(load_schema(schema))


def test_the_spec_names_the_schema_key_it_cannot_type(tmp_path):
    bad = {"type": "object", "properties": {"tags": {"type": "array"}}}
    spec = {
        "tasks": [
            {"name": "x", "task": "text-generation", "params": {"json_schema": bad}},
        ]
    }
    with pytest.raises(SpecError, match=r"tasks\[0\]\.params\.json_schema\.properties\.tags"):
        parse_spec(spec)
    path = tmp_path / "review.json"
    path.write_text(json.dumps(REVIEW_SCHEMA), encoding="utf-8")
    spec["tasks"][0]["params"]["json_schema"] = str(path)
    task = parse_spec(spec).tasks[0]
    assert task.params.json_schema == REVIEW_SCHEMA  # the schema itself, for the manifest
    with pytest.raises(SpecError, match="raw_output needs a json_schema"):
        parse_spec({"tasks": [{**spec["tasks"][0], "params": {"raw_output": True}}]})


def test_values_are_checked_against_the_column_type():
    kind = arrow_type(REVIEW_SCHEMA)
    value = {"sentiment": "positive", "product": "kettle", "stars": 4}
    assert to_arrow_value(value, kind) == value
    with pytest.raises(ValueError, match="stars"):
        to_arrow_value({**value, "stars": "four"}, kind)
    with pytest.raises(ValueError, match="unexpected key"):
        to_arrow_value({**value, "extra": 1}, kind)


def test_the_main_job_validates_and_a_prompt_column_the_input_lacks_exits_2(tmp_path, capsys):
    import yaml

    from pipelines.cli import main
    from tests.conftest import SAMPLE_DATA

    source = str(SAMPLE_DATA / "reviews.csv")
    spec = SAMPLE_DATA / "job-main.yaml"
    assert main(["validate", "--spec", str(spec), "--input", source]) == 0
    data = yaml.safe_load(spec.read_text(encoding="utf-8"))
    data["tasks"][1]["params"]["prompt"] = "Text: {body}"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    capsys.readouterr()
    assert main(["validate", "--spec", str(bad), "--input", source]) == 2
    assert "column 'body'" in capsys.readouterr().err
