"""The ETL quality gate: too many failed rows publish the output, then exit 3."""

from __future__ import annotations

import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import job_spec_schema, main
from pipelines.quality_gate import evaluate_gate, gate_limits
from pipelines.spec import SpecError, parse_spec


def _limits(rows=None, fraction=None) -> dict:
    return {"max_failed_rows": rows, "max_failed_fraction": fraction}


def test_a_tasks_own_limit_wins_then_the_command_line_then_the_spec():
    spec = parse_spec(
        {
            "max_failed_rows": 5,
            "max_failed_fraction": 0.5,
            "tasks": [
                {"name": "a", "task": "sentiment-analysis", "max_failed_rows": 0},
                {"name": "b", "task": "ner", "max_failed_fraction": 0.1},
            ],
        }
    )
    assert gate_limits(spec)["tasks"] == {"a": _limits(0, 0.5), "b": _limits(5, 0.1)}
    limits = gate_limits(spec, max_failed_rows=2, max_failed_fraction=0.25)
    assert limits["tasks"] == {"a": _limits(0, 0.25), "b": _limits(2, 0.1)}
    assert limits["command_line"] == _limits(2, 0.25)


def test_the_gate_fails_only_above_a_limit():
    limits = {"tasks": {"a": _limits(1, None), "b": _limits(None, 0.25), "c": _limits(0, 0.0)}}
    counts = [
        types.SimpleNamespace(name="a", rows=8, failed=1),  # at the limit: passes
        types.SimpleNamespace(name="b", rows=8, failed=3),  # 0.375 > 0.25
        types.SimpleNamespace(name="c", rows=0, failed=0),  # no rows: nothing failed
    ]
    gate = evaluate_gate(limits, counts)
    assert not gate["passed"]
    assert gate["exceeded"] == [
        {
            "task": "b",
            "rows": 8,
            "failed": 3,
            "failed_fraction": 0.375,
            "limit": "max_failed_fraction",
            "allowed": 0.25,
        }
    ]
    counts[1].failed = 2
    assert evaluate_gate(limits, counts) == {
        "limits": limits["tasks"],
        "command_line": {},
        "passed": True,
        "exceeded": [],
    }


@pytest.mark.parametrize(
    ("where", "value"),
    [("max_failed_rows", -1), ("max_failed_rows", 1.5), ("max_failed_rows", True)]
    + [("max_failed_fraction", v) for v in (-0.1, 1.5, "0.5", float("nan"))],
)
def test_limits_are_validated_in_the_spec(where, value):
    task = {"name": "s", "task": "sentiment-analysis"}
    with pytest.raises(SpecError, match=rf"  {where}: "):
        parse_spec({where: value, "tasks": [task]})
    with pytest.raises(SpecError, match=rf"tasks\[0\]\.{where}: "):
        parse_spec({"tasks": [task | {where: value}]})


def test_limits_are_in_the_json_schema():
    schema = job_spec_schema()
    assert {"max_failed_rows", "max_failed_fraction"} <= set(schema["properties"])
    for variant in schema["$defs"].values():
        if "task" in variant.get("properties", {}):
            assert {"max_failed_rows", "max_failed_fraction"} <= set(variant["properties"])


@pytest.mark.parametrize("flag", [["--max-failed-rows", "-1"], ["--max-failed-fraction", "1.5"]])
def test_bad_limits_on_the_command_line_exit_2(tmp_path, capsys, flag):
    args = ["--input", "x.parquet", "--output", str(tmp_path / "o"), "--spec", "job.yaml"]
    with pytest.raises(SystemExit) as caught:
        main([*args, *flag])
    assert caught.value.code == 2
    assert f"argument {flag[0]}" in capsys.readouterr().err


def test_a_run_above_the_gate_publishes_then_exits_3(tmp_path, tiny_models, capsys):
    source = tmp_path / "in.parquet"
    texts = ["Lovely.", "", "Fine enough.", "Broke at once."]  # the empty text fails
    pq.write_table(pa.table({"id": [0, 1, 2, 3], "text": texts}), source)
    spec = tmp_path / "job.yaml"
    task = {
        "name": "s",
        "task": "sentiment-analysis",
        "model": str(tiny_models["text-classification"]),
    }
    spec.write_text(json.dumps({"rows_per_chunk": 2, "max_failed_fraction": 0.25, "tasks": [task]}))
    output = tmp_path / "out"
    args = ["--input", str(source), "--output", str(output), "--spec", str(spec)]

    assert main([*args, "--max-failed-rows", "0"]) == 3
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("beam-enrich: error")]
    assert len(lines) == 1
    assert "task 's' failed 1 of 4 rows (25.0%), above max_failed_rows 0;" in lines[0]
    manifest = json.loads((output / "manifest.json").read_text())
    assert pq.read_table(output / manifest["output"]["files"][0]["path"]).num_rows == 4
    gate = manifest["quality_gate"]
    assert gate["passed"] is False
    assert gate["command_line"] == _limits(0, None)
    assert gate["limits"] == {"s": _limits(0, 0.25)}
    assert [(e["task"], e["failed"], e["rows"], e["limit"]) for e in gate["exceeded"]] == [
        ("s", 1, 4, "max_failed_rows")
    ]

    # The same job within the spec's own limit (1/4 is not above 0.25): exit 0. The
    # command-line limit is not in the fingerprint, so the staged results are reused.
    assert main([*args, "--resume"]) == 0
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["quality_gate"]["passed"] is True
    assert manifest["quality_gate"]["limits"] == {"s": _limits(None, 0.25)}
    assert manifest["inputs"][0]["reused"] is True
