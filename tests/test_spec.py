"""The job spec: defaults, rejections with the key's path, and the CLI's exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pydantic
import pytest

from pipelines.cli import main
from pipelines.spec import JobSpec, SpecError, load_spec, parse_spec
from transforms.tasks import ADAPTERS
from transforms.tasks.feature_extraction import FeatureExtractionParams
from transforms.tasks.text_classification import TextClassification
from transforms.tasks.token_classification import TokenClassificationParams

REPO_ROOT = Path(__file__).resolve().parents[1]

FULL_SPEC = {
    "tasks": [
        {"name": "sentiment", "task": "sentiment-analysis"},
        {
            "name": "entities",
            "task": "ner",
            "model": "dslim/bert-base-NER",
            "revision": "v1.0",
            "input": "body",
            "params": {"aggregation_strategy": "first"},
        },
        {"name": "embedding", "task": "feature-extraction", "params": {"normalize": True}},
    ]
}

GOOD_YAML = """\
text_column: body
rows_per_chunk: 64
keep_order: true
tasks:
  - name: sentiment
    task: sentiment-analysis
    device: cpu
    dtype: fp32
    max_batch_tokens: 1024
"""


def _task(**fields) -> dict:
    return {"name": "sentiment", "task": "sentiment-analysis", **fields}


def _rejection(data) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(data, "job.yaml")
    return str(caught.value)


# --- a valid spec -------------------------------------------------------------------


def test_full_spec_parses_with_defaults():
    spec = parse_spec(FULL_SPEC)

    assert isinstance(spec, JobSpec)
    assert (spec.text_column, spec.rows_per_chunk, spec.keep_order) == ("text", 512, False)
    assert [t.name for t in spec.tasks] == ["sentiment", "entities", "embedding"]
    for task in spec.tasks:
        assert (task.device, task.dtype, task.max_batch_tokens) == ("auto", "auto", None)
        assert task.trust_remote_code is False
    sentiment, entities, _ = spec.tasks
    assert sentiment.revision == "main"
    assert entities.revision == "v1.0"


def test_params_are_typed_per_task_family():
    sentiment, entities, embedding = parse_spec(FULL_SPEC).tasks

    assert sentiment.params == ADAPTERS["sentiment-analysis"].params_type()
    assert isinstance(entities.params, TokenClassificationParams)
    assert entities.params.aggregation_strategy == "first"
    assert entities.params.ignore_labels == ("O",)
    assert isinstance(embedding.params, FeatureExtractionParams)
    assert embedding.params.normalize is True


def test_model_id_falls_back_to_the_task_default():
    sentiment, entities, embedding = parse_spec(FULL_SPEC).tasks

    assert sentiment.model is None
    assert sentiment.model_id == TextClassification.default_model
    assert embedding.model_id == ADAPTERS["feature-extraction"].default_model
    assert entities.model_id == "dslim/bert-base-NER"


def test_input_column_falls_back_to_text_column():
    spec = parse_spec({**FULL_SPEC, "text_column": "review"})
    sentiment, entities, _ = spec.tasks

    assert spec.input_column(sentiment) == "review"
    assert spec.input_column(entities) == "body"


def test_spec_objects_are_frozen():
    spec = parse_spec(FULL_SPEC)

    with pytest.raises(pydantic.ValidationError):
        spec.rows_per_chunk = 1
    with pytest.raises(pydantic.ValidationError):
        spec.tasks[0].model = "other/model"
    with pytest.raises(pydantic.ValidationError):
        spec.tasks[1].params.aggregation_strategy = "none"
    assert spec.rows_per_chunk == 512


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:1"])
def test_device_accepts_auto_cpu_and_cuda(device):
    assert parse_spec({"tasks": [_task(device=device)]}).tasks[0].device == device


# --- reading a file -----------------------------------------------------------------


def test_load_spec_reads_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD_YAML, encoding="utf-8")

    spec = load_spec(path)

    assert (spec.text_column, spec.rows_per_chunk, spec.keep_order) == ("body", 64, True)
    task = spec.tasks[0]
    assert (task.device, task.dtype, task.max_batch_tokens) == ("cpu", "fp32", 1024)
    assert spec.input_column(task) == "body"
    assert load_spec(str(path)) == spec


def test_load_spec_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"

    with pytest.raises(SpecError, match="cannot read job spec") as caught:
        load_spec(path)
    assert str(path) in str(caught.value)
    assert "No such file" in str(caught.value)


def test_load_spec_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("tasks: [\n  - name: a\n", encoding="utf-8")

    with pytest.raises(SpecError, match="not valid YAML") as caught:
        load_spec(path)
    assert str(path) in str(caught.value)


def test_load_spec_names_the_file_in_validation_errors(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("rows_per_chunk: many\ntasks: [{name: s, task: ner}]\n", encoding="utf-8")

    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(path) in str(caught.value)
    assert "rows_per_chunk" in str(caught.value)


def test_load_spec_empty_file_is_not_a_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")

    with pytest.raises(SpecError, match="mapping") as caught:
        load_spec(path)
    assert str(path) in str(caught.value)


def test_load_spec_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"text_column: \xe9\n")

    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(path) in str(caught.value)


# --- rejections ---------------------------------------------------------------------


def test_unknown_top_level_key():
    message = _rejection({"rows_per_chunks": 5, "tasks": [_task()]})

    assert "rows_per_chunks: unknown key" in message
    assert "accepted keys:" in message
    for key in ("text_column", "rows_per_chunk", "keep_order", "tasks"):
        assert key in message.split("accepted keys:")[1]
    assert "job.yaml" in message


def test_unknown_task_key():
    message = _rejection({"tasks": [_task(), _task(name="other", modle="x/y")]})

    assert "tasks[1].modle: unknown key" in message
    accepted = message.split("accepted keys:")[1]
    for key in ("model", "revision", "input", "device", "dtype", "params"):
        assert key in accepted


@pytest.mark.parametrize("task", ["ner", "token-classification"])
def test_unknown_param(task):
    message = _rejection(
        {"tasks": [{"name": "n", "task": task, "params": {"aggregation": "simple"}}]}
    )

    assert "tasks[0].params.aggregation: unknown key" in message
    accepted = message.split("accepted keys:")[1]
    assert "aggregation_strategy" in accepted
    assert "ignore_labels" in accepted
    # the discriminator tag is not part of the user's path
    assert f"tasks[0].{task}" not in message


def test_unknown_param_lists_only_that_family():
    message = _rejection(
        {"tasks": [{"name": "e", "task": "feature-extraction", "params": {"x": 1}}]}
    )

    assert (
        "tasks[0].params.x: unknown key; accepted keys: pooling, normalize, prompt, prompt_name"
        in message
    )
    assert "aggregation_strategy" not in message


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"rows_per_chunk": "many", "tasks": [_task()]}, "rows_per_chunk:"),
        ({"rows_per_chunk": 0, "tasks": [_task()]}, "rows_per_chunk:"),
        ({"keep_order": "maybe", "tasks": [_task()]}, "keep_order:"),
        ({"text_column": "", "tasks": [_task()]}, "text_column:"),
        ({"tasks": [_task(max_batch_tokens=-1)]}, "tasks[0].max_batch_tokens:"),
        ({"tasks": [_task(max_batch_tokens="lots")]}, "tasks[0].max_batch_tokens:"),
        ({"tasks": [_task(model=5)]}, "tasks[0].model:"),
        ({"tasks": [_task(params=["x"])]}, "tasks[0].params:"),
        ({"tasks": "sentiment"}, "tasks:"),
        ({"text_column": "text"}, "tasks:"),
    ],
)
def test_wrong_type_names_the_path(data, path):
    message = _rejection(data)

    assert f"  {path} " in message


def test_wrong_types_are_all_reported():
    message = _rejection({"rows_per_chunk": "many", "keep_order": "maybe", "tasks": [_task()]})

    assert "rows_per_chunk:" in message
    assert "keep_order:" in message


def test_bad_dtype_lists_accepted_values():
    message = _rejection({"tasks": [_task(dtype="fp8")]})

    assert "tasks[0].dtype:" in message
    assert "'fp8'" in message
    for dtype in ("auto", "fp32", "fp16", "bf16", "int8"):
        assert f"'{dtype}'" in message


def test_bad_aggregation_strategy_lists_accepted_values():
    message = _rejection(
        {"tasks": [{"name": "n", "task": "ner", "params": {"aggregation_strategy": "bogus"}}]}
    )

    assert "tasks[0].params.aggregation_strategy:" in message
    assert "'bogus'" in message
    for strategy in ("none", "simple", "first", "average", "max"):
        assert f"'{strategy}'" in message


def test_unknown_task_lists_known_tasks():
    message = _rejection({"tasks": [_task(), {"name": "s2", "task": "sentiment"}]})

    assert "tasks[1]" in message
    assert "unknown task" in message
    assert "'sentiment'" in message
    for task in ADAPTERS:
        assert task in message


def test_unknown_task_message_shows_only_the_value():
    message = _rejection(
        {"tasks": [{"name": "s", "task": "sentiment", "model": "org/very-long-model-name"}]}
    )

    assert "tasks[0].task: unknown task 'sentiment'" in message
    assert "org/very-long-model-name" not in message


def test_missing_task_key_lists_known_tasks():
    message = _rejection({"tasks": [{"name": "s"}]})

    assert "tasks[0]" in message
    assert "sentiment-analysis" in message


def test_duplicate_task_names():
    message = _rejection({"tasks": [_task(), {"name": "sentiment", "task": "ner"}]})

    assert "duplicate task name 'sentiment'" in message
    assert "tasks[1].name" in message


@pytest.mark.parametrize("name", ["my task", "1abc", "a-b", "", "ü"])
def test_task_name_must_be_a_column_prefix(name):
    message = _rejection({"tasks": [_task(name=name)]})

    assert "tasks[0].name:" in message


def test_empty_tasks():
    message = _rejection({"tasks": []})

    assert "tasks:" in message
    assert "at least 1" in message


@pytest.mark.parametrize("data", [[{"tasks": []}], "tasks", None, 3])
def test_top_level_must_be_a_mapping(data):
    assert "expected a mapping" in _rejection(data)


def test_top_level_yaml_list_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: s\n  task: ner\n", encoding="utf-8")

    with pytest.raises(SpecError, match="expected a mapping of keys at the top level"):
        load_spec(path)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_bad_device(device):
    message = _rejection({"tasks": [_task(device=device)]})

    assert "tasks[0].device:" in message
    assert "cpu" in message
    assert "cuda" in message


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"ner": 1, "tasks": [_task()]}, "  ner: unknown key"),
        ({"tasks": [_task(params={"ner": 1})]}, "  tasks[0].params.ner: unknown key"),
    ],
)
def test_unknown_key_spelled_like_a_task(data, path):
    assert path in _rejection(data)


# --- the command line ---------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_cli_bad_spec_exits_2_before_reading_input(tmp_path, capsys):
    spec = _write(
        tmp_path,
        "job.yaml",
        """\
        tasks:
          - name: entities
            task: ner
            params: {aggregation: simple}
        """,
    )
    missing_input = tmp_path / "does-not-exist.parquet"

    code = main(
        ["--input", str(missing_input), "--output", str(tmp_path / "out"), "--spec", str(spec)]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("beam-enrich: error:")
    assert "tasks[0].params.aggregation" in err
    assert "aggregation_strategy" in err
    assert "does-not-exist" not in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_missing_spec_file_exits_2(tmp_path, capsys):
    spec = tmp_path / "missing.yaml"

    code = main(
        ["--input", str(tmp_path / "x.csv"), "--output", str(tmp_path / "out"), "--spec", str(spec)]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("beam-enrich: error: cannot read job spec")
    assert str(spec) in err


def test_cli_input_glob_matching_nothing_exits_2(tmp_path, capsys):
    spec = _write(tmp_path, "job.yaml", GOOD_YAML)
    pattern = str(tmp_path / "nothing-*.parquet")

    code = main(["--input", pattern, "--output", str(tmp_path / "out"), "--spec", str(spec)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("beam-enrich: error:")
    assert pattern in err
    assert "matches no file" in err
    assert "Traceback" not in err


def test_cli_subprocess_bad_spec_exits_2(tmp_path):
    spec = _write(tmp_path, "job.yaml", "rows_per_chunks: 5\ntasks: [{name: s, task: ner}]\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "pipelines.enrich",
        "--input", str(tmp_path / "missing.csv"),
        "--output", str(tmp_path / "out"),
        "--spec", str(spec),
    ]  # fmt: skip

    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "beam-enrich: error:" in result.stderr
    assert "rows_per_chunks: unknown key" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"rows_per_chunk": "512"}, "rows_per_chunk"),
        ({"keep_order": "yes"}, "keep_order"),
        ({"tasks": [_task(trust_remote_code="yes")]}, "tasks[0].trust_remote_code"),
        ({"tasks": [_task(device="cuda:01")]}, "tasks[0].device"),
    ],
)
def test_loose_values_are_not_coerced(data, path):
    message = _rejection({"tasks": [_task()], **data})
    assert f"{path}:" in message


def test_device_error_says_what_is_accepted():
    message = _rejection({"tasks": [_task(device="gpu")]})
    assert "expected auto, cpu, cuda or cuda:N, got 'gpu'" in message


def test_empty_params_mean_defaults():
    spec = parse_spec({"tasks": [_task(params=None)]})
    assert spec.tasks[0].params == type(spec.tasks[0].params)()


def test_adapter_checks_become_spec_errors_with_the_task_path():
    message = _rejection(
        {
            "tasks": [
                _task(),
                {
                    "name": "ents",
                    "task": "ner",
                    "on_long_input": "chunk",
                    "params": {"aggregation_strategy": "none"},
                },
            ]
        }
    )
    assert "tasks[1]: on_long_input 'chunk' merges entities" in message


def test_chunking_only_where_supported():
    message = _rejection({"tasks": [_task(on_long_input="chunk")]})
    assert "tasks[0].on_long_input:" in message and "ner" in message
    spec = parse_spec({"tasks": [{"name": "e", "task": "ner", "on_long_input": "chunk"}]})
    assert spec.tasks[0].on_long_input == "chunk"


def test_generation_is_capped_by_the_spec_limit():
    task = {"name": "g", "task": "text-generation", "params": {"max_new_tokens": 2000}}
    message = _rejection({"tasks": [task]})
    assert "tasks[0].params.max_new_tokens: 2000 is above max_new_tokens_limit (1024)" in message
    spec = parse_spec({"max_new_tokens_limit": 4096, "tasks": [task]})
    assert spec.tasks[0].params.max_new_tokens == 2000
