"""The command line: `run` by default, manifest-schema, and exit codes chosen by error type."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipelines.cli import exit_status, main
from pipelines.manifest import MANIFEST, Manifest
from pipelines.quality_gate import QualityGateError
from tests.conftest import REPO, SAMPLE_DATA, sentiment_ner_spec
from transforms.io import InputError
from transforms.models import ModelError


def write_spec(path, models):
    path.write_text(json.dumps(sentiment_ner_spec(models)))  # JSON is YAML
    return path


def _read_output(folder) -> list:
    return [pq.read_table(path).to_pylist() for path in sorted(folder.glob("part-*.parquet"))]


def test_run_is_the_default_and_the_manifest_matches_its_schema(tmp_path, tiny_models, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    spec = write_spec(tmp_path / "job.yaml", tiny_models)
    source = str(SAMPLE_DATA / "reviews.parquet")
    common = ["--input", source, "--spec", str(spec), "--limit", "5", "--quiet"]

    assert main([*common, "--output", str(tmp_path / "default")]) == 0
    assert main(["run", *common, "--output", str(tmp_path / "named")]) == 0
    assert _read_output(tmp_path / "default") == _read_output(tmp_path / "named")

    schema_file = tmp_path / "manifest.schema.json"
    assert main(["manifest-schema", "--output", str(schema_file)]) == 0
    assert f"schema written to {schema_file}" in capsys.readouterr().out
    validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text()))
    validator.check_schema(validator.schema)
    text = (tmp_path / "default" / MANIFEST).read_text()
    written = json.loads(text)
    assert not list(validator.iter_errors(written))
    # The typed record reads back to the same JSON, key for key and in the same order.
    again = Manifest.model_validate_json(text).to_json()
    assert json.dumps(again) == json.dumps(written)
    assert written["rows"]["in"] == written["rows"]["out"] == 5
    broken = {**written, "rows": {**written["rows"], "in": "five"}}
    assert not validator.is_valid(broken)

    assert main(["manifest-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(schema_file.read_text())


def test_a_subcommand_refuses_arguments_it_does_not_take(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["spec-schema", "--runner", "DataflowRunner"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --runner" in capsys.readouterr().err


def _worker_traceback(line: str) -> RuntimeError:
    return RuntimeError(
        "Pipeline failed in a worker:\nTraceback (most recent call last):\n"
        '  File "/x/transforms/work_items.py", line 90, in process\n'
        f"    raise InputError(...)\n{line}\n"
    )


def test_exit_codes_follow_error_types():
    assert exit_status(InputError("no  such\nfile")) == (2, "no such file")
    assert exit_status(ModelError("no model")) == (2, "no model")
    gate = {
        "exceeded": [
            {
                "task": "s",
                "rows": 4,
                "failed": 2,
                "failed_fraction": 0.5,
                "limit": "max_failed_rows",
                "allowed": 1,
            }
        ]
    }
    code, message = exit_status(QualityGateError(gate, "out"))
    assert code == 3 and message.startswith("quality gate failed: task 's' failed 2 of 4")

    # An in-process runner re-raises a step's error with the original as its cause.
    try:
        try:
            raise InputError("cannot read a.csv: row 3 has 3 fields, the header 2")
        except InputError as err:
            raise RuntimeError("step ReadInput failed") from err
    except RuntimeError as wrapped:
        assert exit_status(wrapped) == (2, "cannot read a.csv: row 3 has 3 fields, the header 2")

    # A worker process's error arrives as text: only a JobError's type name counts.
    line = "transforms.io.InputError: cannot read b.csv: row 9 [while running 'ReadInput']"
    assert exit_status(_worker_traceback(line)) == (
        2,
        "cannot read b.csv: row 9 [while running 'ReadInput']",
    )
    assert exit_status(_worker_traceback("ModelError: gone"))[0] == 2
    assert exit_status(_worker_traceback("ValueError: InputError: quoted"))[0] == 1
    assert exit_status(RuntimeError("see InputError: in the docs"))[0] == 1
    assert exit_status(RuntimeError("worker died")) == (1, "RuntimeError: worker died")


def test_a_ragged_csv_row_in_a_worker_process_exits_2_naming_the_file(
    tmp_path, tiny_models, capsys
):
    source = tmp_path / "reviews.csv"
    rows = [f'{i},"review {i}"' for i in range(40)]
    rows[30] = '30,"review 30",surplus'  # past the header: only a worker reads it
    source.write_text("id,text\n" + "\n".join(rows) + "\n", encoding="utf-8")
    spec = write_spec(tmp_path / "job.yaml", tiny_models)
    output = tmp_path / "out"
    code = main(
        [
            "--input",
            str(source),
            "--output",
            str(output),
            "--spec",
            str(spec),
            "--direct_running_mode=multi_processing",
            "--direct_num_workers=2",
            "--quiet",
        ]
    )
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("beam-enrich: error: ") and str(source) in last
    assert "Traceback" not in last
    assert not output.exists()


def test_every_command_named_for_the_default_rule_is_a_subcommand(capsys):
    from pipelines.cli import COMMANDS, parser

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exited:
            parser().parse_args([command, "--help"])
        assert exited.value.code == 0
        assert f"usage: beam-enrich {command}" in capsys.readouterr().out


_ENDS_THE_PROCESS = """
import atexit, sys, threading
from pipelines.process_exit import exit_process

release = threading.Event()

def work():
    release.wait()
    with open(sys.argv[1], "w") as handle:
        handle.write("thread done")

threading.Thread(target=work).start()  # not a daemon: an exit waits for it
atexit.register(sys.stdout.write, "exit handler ran")  # stays in stdout's buffer
release.set()
exit_process(3)
"""


def test_the_command_ends_as_python_would_but_without_its_teardown(tmp_path):
    """`beam-enrich` ends with `exit_process`: threads waited for, exit handlers run,
    stdout flushed, the exit code kept."""
    marker = tmp_path / "thread.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-c", _ENDS_THE_PROCESS, str(marker)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert (done.returncode, done.stdout) == (3, "exit handler ran"), done.stderr
    assert marker.read_text() == "thread done"
