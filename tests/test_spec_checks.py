"""The whole spec is checked before any row: column clashes, duplicate YAML keys, and the
type of every column a task reads as text."""

from __future__ import annotations

import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.job import bind_tasks
from pipelines.spec import SpecError, load_spec, parse_spec
from transforms.io import InputError


def _rejection(data: dict) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(data, "job.yaml")
    return str(caught.value)


def _write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# --- 3: every added column is distinct -------------------------------------------------


def test_tasks_adding_the_same_column_are_refused_naming_both():
    message = _rejection(
        {
            "tasks": [
                {"name": "s", "task": "sentiment-analysis"},
                {"name": "s_label", "task": "text-generation"},
            ]
        }
    )
    assert "tasks[1].name: task 's_label' adds column 's_label'" in message
    assert "task 's' (tasks[0]) adds too" in message


def test_a_task_named_like_the_errors_column_is_refused():
    message = _rejection({"tasks": [{"name": "enrich_errors", "task": "feature-extraction"}]})
    assert "tasks[0].name: task 'enrich_errors' would add column 'enrich_errors'" in message


def test_input_columns_clashing_with_added_ones_are_refused_before_models():
    spec = parse_spec(
        {"tasks": [{"name": "s", "task": "sentiment-analysis", "model": "acme/not-cached"}]}
    )
    # Refused before the model is looked up: acme/not-cached would fail otherwise.
    with pytest.raises(InputError, match=r"\['s_score'\] that task 's' would add"):
        bind_tasks(spec, pa.schema([("text", pa.string()), ("s_score", pa.float64())]))
    with pytest.raises(InputError, match="already has column 'enrich_errors'"):
        bind_tasks(spec, pa.schema([("text", pa.string()), ("enrich_errors", pa.string())]))


def test_column_clash_exits_2_before_any_row(tmp_path, capsys):
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a"]}), source)
    spec = _write(
        tmp_path,
        """\
        tasks:
          - {name: s, task: sentiment-analysis}
          - {name: s_label, task: text-generation}
        """,
    )
    output = tmp_path / "out"
    code = main(["--input", str(source), "--output", str(output), "--spec", str(spec)])
    err = capsys.readouterr().err
    assert code == 2
    assert "task 's_label' adds column 's_label'" in err and "Traceback" not in err
    assert not output.exists()


# --- 6: duplicate keys in the YAML ------------------------------------------------------


def test_duplicate_keys_are_refused_at_any_depth_naming_both_lines(tmp_path):
    top = _write(
        tmp_path,
        """\
        rows_per_chunk: 4
        tasks:
          - {name: s, task: sentiment-analysis}
        rows_per_chunk: 8
        """,
    )
    with pytest.raises(SpecError, match=r"key 'rows_per_chunk' appears twice .*lines 1 and 4"):
        load_spec(top)
    nested = _write(
        tmp_path,
        """\
        tasks:
          - name: s
            task: sentiment-analysis
            params:
              top_k: 2
            params:
              function_to_apply: sigmoid
        """,
    )
    with pytest.raises(SpecError, match=r"key 'params' appears twice .*lines 4 and 6"):
        load_spec(nested)
    flow = _write(tmp_path, "tasks: [{name: s, task: ner, params: {stride: 8, stride: 9}}]\n")
    with pytest.raises(SpecError, match=r"key 'stride' appears twice .*line 1, columns"):
        load_spec(flow)


def test_merge_keys_still_override_an_anchor(tmp_path):
    spec = _write(
        tmp_path,
        """\
        tasks:
          - &base {name: s, task: sentiment-analysis, device: cpu}
          - <<: *base
            name: t
        """,
    )
    assert [(t.name, t.device) for t in load_spec(spec).tasks] == [("s", "cpu"), ("t", "cpu")]


# --- 12: every column read as text is text ----------------------------------------------


def _qa(**params) -> dict:
    return {"name": "qa", "task": "question-answering", "input": "body", "params": params}


def test_a_question_column_that_is_not_text_is_refused():
    spec = parse_spec({"tasks": [_qa(question_column="q")]})
    schema = pa.schema([("body", pa.string()), ("q", pa.int64())])
    with pytest.raises(InputError, match=r"'qa' reads text from column 'q', which holds int64"):
        bind_tasks(spec, schema)


def test_an_earlier_tasks_non_text_column_is_refused_before_models():
    spec = parse_spec(
        {
            "tasks": [
                # Refused before any model is looked up: the default model is not cached.
                {"name": "emb", "task": "feature-extraction"},
                {"name": "s", "task": "sentiment-analysis", "input": "emb"},
            ]
        }
    )
    with pytest.raises(InputError, match=r"column 'emb', which task 'emb' fills with list<"):
        bind_tasks(spec, pa.schema([("text", pa.string())]))


def test_text_types_and_prompt_columns_of_any_type_are_accepted(tiny_models):
    spec = parse_spec(
        {
            "tasks": [
                _qa(question_column="q") | {"model": str(tiny_models["question-answering"])},
                {
                    "name": "gen",
                    "task": "text-generation",
                    "model": str(tiny_models["text-generation"]),
                    "input": "qa_answer",  # an earlier task's string column
                    # A prompt pastes any cell: an int column is fine there.
                    "params": {"prompt": "{qa_answer} ({stars} stars)"},
                },
            ]
        }
    )
    schema = pa.schema(
        [
            ("body", pa.large_string()),
            ("q", pa.dictionary(pa.int32(), pa.string())),
            ("stars", pa.int64()),
        ]
    )
    _, output_schema = bind_tasks(spec, schema)
    assert output_schema.names[:3] == ["body", "q", "stars"]
    assert "gen" in output_schema.names
