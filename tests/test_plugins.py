"""Plugin tasks: a spec's `task` naming an adapter class or a `beam_enrich.tasks` entry point."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.spec import JobSpec, SpecError, parse_spec
from tests.plugins.toxicity_spans import ToxicitySpans, ToxicitySpansParams
from transforms.tasks import PLUGIN_GROUP, adapter_for, installed_plugins

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "tests.plugins.toxicity_spans:ToxicitySpans"


@pytest.fixture(autouse=True)
def plugins_importable(monkeypatch):
    """The example plugin imports as `tests.plugins…` whichever way pytest was started."""
    monkeypatch.syspath_prepend(str(REPO))


def _plugin_task(**fields) -> dict:
    return {"name": "tox", "task": PLUGIN, "model": "org/model", **fields}


def _rejection(*tasks: dict) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec({"tasks": list(tasks)}, "job.yaml")
    return str(caught.value)


def _install_entry_point(site: Path, name: str, target: str) -> None:
    """Registers an entry point the way an installed plugin package's metadata does."""
    dist = site / "beam_enrich_example_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: beam-enrich-example-plugin\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\n{name} = {target}\n")


# --- the spec -----------------------------------------------------------------------


def test_plugin_params_are_typed_by_the_plugin():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. pydantic serializing with the wrong model
        spec = parse_spec(
            {"tasks": [_plugin_task(params={"min_score": 0.25, "aggregation_strategy": "first"})]}
        )
        dumped = spec.model_dump(mode="json")

    (task,) = spec.tasks
    assert isinstance(task.params, ToxicitySpansParams)
    assert (task.params.min_score, task.params.aggregation_strategy) == (0.25, "first")
    adapter = spec.adapter(task)
    assert type(adapter) is ToxicitySpans
    assert [field.name for field in adapter.fields()] == ["tox", "tox_count"]
    assert task.model_id == "org/model"
    assert dumped["tasks"][0]["task"] == PLUGIN
    assert dumped["tasks"][0]["params"]["min_score"] == 0.25
    # The plugin inherits chunking from token classification.
    assert parse_spec({"tasks": [_plugin_task(on_long_input="chunk")]}).tasks[0].on_long_input


def test_bad_plugin_params_are_named_with_their_path():
    message = _rejection(
        _plugin_task(params={"min_score": 2}),
        _plugin_task(name="tox2", params={"min_scor": 0.5}),
    )

    assert "tasks[0].params.min_score: Input should be less than or equal to 1" in message
    assert "tasks[1].params.min_scor: unknown key; accepted keys:" in message
    assert "min_score" in message.split("accepted keys:")[1]
    assert "aggregation_strategy" in message.split("accepted keys:")[1]


def test_plugin_without_a_default_model_needs_one():
    task = _plugin_task()
    del task["model"]

    assert "tasks[0].model: task" in _rejection(task)
    assert "has no default model" in _rejection(task)


@pytest.mark.parametrize(
    ("task", "reason"),
    [
        ("no_such_plugin_pkg.adapters:Spans", "no module named 'no_such_plugin_pkg'"),
        ("tests.plugins.toxicity_spans:Nope", "has no attribute 'Nope'"),
        ("tests.plugins.toxicity_spans:ToxicitySpansParams", "not a TaskAdapter subclass"),
        ("json:dumps", "is a function, not a TaskAdapter subclass"),
        ("tests.plugins.toxicity_spans:", "expected module.path:ClassName"),
    ],
)
def test_unloadable_plugin_is_a_spec_error_on_its_task(task, reason):
    message = _rejection({"name": "p", "task": task, "model": "org/model"})

    assert "  tasks[0].task: " in message
    assert reason in message


def test_cli_exits_2_for_an_unloadable_plugin(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"tasks": [_plugin_task(task="no_such_plugin_pkg:X")]}))

    code = main(
        [
            "--input",
            str(tmp_path / "in.csv"),
            "--output",
            str(tmp_path / "out"),
            "--spec",
            str(spec),
        ]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert "tasks[0].task: plugin no_such_plugin_pkg:X: no module named" in err
    assert "Traceback" not in err


def test_schema_lists_plugins_beside_the_built_in_tasks():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(JobSpec.model_json_schema())

    validator.validate({"tasks": [_plugin_task(params={"anything": 1})]})
    validator.validate({"tasks": [{"name": "s", "task": "sentiment-analysis"}]})
    with pytest.raises(jsonschema.ValidationError):  # built-in params stay checked
        validator.validate({"tasks": [{"name": "s", "task": "ner", "params": {"aggregation": 1}}]})


# --- entry points -------------------------------------------------------------------


def test_entry_point_resolves_by_name(tmp_path, monkeypatch):
    _install_entry_point(tmp_path, "toxicity-spans", PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))

    assert installed_plugins()["toxicity-spans"] == PLUGIN
    assert adapter_for("toxicity-spans") is ToxicitySpans
    spec = parse_spec({"tasks": [_plugin_task(task="toxicity-spans", params={"min_score": 0.1})]})
    assert type(spec.adapter(spec.tasks[0])) is ToxicitySpans
    assert spec.tasks[0].params.min_score == 0.1
    # An unknown name lists what is installed.
    message = _rejection({"name": "t", "task": "toxicity"})
    assert "tasks[0].task: unknown task 'toxicity'" in message
    assert "toxicity-spans" in message


def test_broken_entry_point_names_itself(tmp_path, monkeypatch):
    _install_entry_point(tmp_path, "gone", "no_such_plugin_pkg.mod:Gone")
    monkeypatch.syspath_prepend(str(tmp_path))

    message = _rejection(_plugin_task(task="gone"))

    assert "tasks[0].task: plugin no_such_plugin_pkg.mod:Gone (entry point 'gone')" in message
    with pytest.raises(ValueError, match="no module named 'no_such_plugin_pkg'"):
        adapter_for("gone")


def test_unknown_name_without_plugins_says_none_are_installed():
    if installed_plugins():
        pytest.skip("this environment has plugin tasks installed")
    with pytest.raises(ValueError, match="none installed") as caught:
        adapter_for("toxicity")
    assert "module.path:ClassName" in str(caught.value)


# --- a run --------------------------------------------------------------------------


def _threshold_between(scores: list[float]) -> float:
    """A threshold near the median that keeps some spans and drops others, far enough
    from every score that float32 output cannot land on the other side of it."""
    middle = len(scores) // 2
    for i in sorted(range(1, len(scores)), key=lambda i: abs(i - middle)):
        if scores[i] - scores[i - 1] > 1e-3:
            return (scores[i] + scores[i - 1]) / 2
    raise AssertionError(f"the tiny model's span scores are all alike: {scores}")


def test_plugin_run_adds_its_columns(tmp_path, tiny_models, sample_texts):
    from transformers import pipeline

    model = tiny_models["token-classification"]
    texts = sample_texts[:12]
    direct = pipeline("token-classification", model=str(model), aggregation_strategy="simple")
    expected_all = [direct(text) for text in texts]
    scores = sorted(float(e["score"]) for found in expected_all for e in found)
    min_score = _threshold_between(scores)
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        json.dumps({"tasks": [_plugin_task(model=str(model), params={"min_score": min_score})]})
    )
    output = tmp_path / "out"

    code = main(["--input", str(source), "--output", str(output), "--spec", str(spec)])

    assert code == 0
    parts = sorted(output.glob("part-*.parquet"))
    result = pa.concat_tables(pq.read_table(p) for p in parts).sort_by("id")
    assert result.column_names == ["id", "text", "tox", "tox_count", "enrich_errors"]
    assert result.schema.field("tox_count").type == pa.int32()
    kept_total = 0
    for spans, count, found in zip(
        result.column("tox").to_pylist(),
        result.column("tox_count").to_pylist(),
        expected_all,
        strict=True,
    ):
        expected = [e for e in found if float(e["score"]) >= min_score]
        assert count == len(spans) == len(expected)
        for ours, theirs in zip(spans, expected, strict=True):
            assert (ours["entity_group"], ours["start"], ours["end"]) == (
                theirs["entity_group"],
                theirs["start"],
                theirs["end"],
            )
            assert ours["score"] == pytest.approx(float(theirs["score"]), abs=1e-4)
        kept_total += count
    assert 0 < kept_total < len(scores)
    manifest = json.loads((output / "manifest.json").read_text())
    (described,) = manifest["tasks"]
    assert described["task"] == PLUGIN
    assert described["parameters"]["min_score"] == min_score
