"""Atomic output and --resume: real CLI runs, SIGKILLed at named points, then resumed.

Each run is `python -m pipelines.enrich` in a subprocess; `BEAM_ENRICH_KILL_AT` (see
`transforms.staging._kill_point`) makes the process SIGKILL itself at a named point, so
the kill lands at the same place on every machine.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.cli import main
from tests.conftest import REPO, SAMPLE_DATA
from transforms.staging import input_key

SLICES = [(0, 15), (15, 15), (30, 15), (45, 15), (60, 11)]


def _spec(path: Path, models: dict, tasks: list[str]) -> Path:
    known = {
        "sentiment": {
            "name": "sentiment",
            "task": "sentiment-analysis",
            "model": str(models["text-classification"]),
        },
        # A second task whose model loads without sentence-transformers: the killed
        # runs are fresh processes, and that import alone takes seconds.
        "entities": {
            "name": "entities",
            "task": "ner",
            "model": str(models["token-classification"]),
        },
    }
    spec = {"rows_per_chunk": 4, "keep_order": True, "tasks": [known[t] for t in tasks]}
    path.write_text(json.dumps(spec))
    return path


def _inputs(folder: Path) -> list[Path]:
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet")
    texts = table.column("text").to_pylist()
    texts[20] = "   "  # a per-row failure, so errors.jsonl has to be carried over too
    table = table.set_column(table.schema.get_field_index("text"), "text", [texts])
    folder.mkdir()
    paths = []
    for i, (start, length) in enumerate(SLICES):
        paths.append(folder / f"in-{i}.parquet")
        pq.write_table(table.slice(start, length), paths[-1])
    return paths


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _cli(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    # One torch thread, as in this process: the other test process shares the two cores.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("BEAM_ENRICH_KILL_AT", None)
    if kill_at:
        env["BEAM_ENRICH_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "pipelines.enrich", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _markers(output: Path) -> dict[str, str]:
    folder = output.parent / f".{output.name}.beam-enrich" / "files"
    return {p.name: p.read_text() for p in folder.glob("*/*.done.json")}


def test_killed_runs_leave_old_output_and_resume_matches_uninterrupted(tmp_path, tiny_models):
    inputs = _inputs(tmp_path / "in")
    pattern = str(tmp_path / "in" / "*.parquet")
    spec = _spec(tmp_path / "job.yaml", tiny_models, ["sentiment", "entities"])
    old_spec = _spec(tmp_path / "old.yaml", tiny_models, ["sentiment"])
    output, reference = tmp_path / "out", tmp_path / "reference"

    # The previous complete output under the name, and an uninterrupted run to compare.
    assert main(["--input", pattern, "--output", str(output), "--spec", str(old_spec)]) == 0
    previous = _snapshot(output)
    assert main(["--input", pattern, "--output", str(reference), "--spec", str(spec)]) == 0
    args = ["--input", pattern, "--output", str(output), "--spec", str(spec)]

    # 1. Killed while work items (here one per input file) are being staged: two of
    #    five are done.
    killed = _cli(args, kill_at="staged:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _snapshot(output) == previous
    staged = _markers(output)
    assert len(staged) == 2

    # 2. Resumed, then killed inside the swap: the old output is moved aside and the
    #    new one is not yet in place, so the name holds nothing.
    killed = _cli([*args, "--resume"], kill_at="swapping")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not output.exists()
    root = tmp_path / ".out.beam-enrich"
    (moved_aside,) = root.glob("previous-*")
    assert _snapshot(moved_aside) == previous
    (assembled,) = root.glob("runs/*/manifest.json")
    reused = {
        input_key(entry["path"], entry["sha256"])
        for entry in json.loads(assembled.read_text())["inputs"]
        if entry["reused"]
    }
    assert reused == {name.split(".")[0] for name in staged}
    # The reused files were not recomputed: their markers still name the first run's data.
    assert {name: text for name, text in _markers(output).items() if name in staged} == staged
    assert len(_markers(output)) == len(inputs)

    # 3. Resumed again: everything is staged, so nothing is recomputed; the output equals
    #    the uninterrupted run's.
    assert main([*args, "--resume"]) == 0  # in-process: no kill needed, saves a start-up
    assert sorted(p.name for p in root.iterdir()) == ["files"]  # kept for final reuse
    manifest = json.loads((output / "manifest.json").read_text())
    expected = json.loads((reference / "manifest.json").read_text())
    assert [entry["reused"] for entry in manifest["inputs"]] == [True] * len(inputs)
    assert manifest["fingerprint"] == expected["fingerprint"]
    assert (
        manifest["rows"]
        == expected["rows"]
        == {
            "in": 71,
            "limit": None,
            "out": 71,
            "failed": {"sentiment": 1, "entities": 1},
        }
    )
    for task in manifest["tasks"]:
        assert task["succeeded"] + task["failed"] == task["rows"] == 71
    # keep_order: one part per work item, named in input order; nothing merged.
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in reference.iterdir())
    parts = [f"part-{i:05d}-of-00005.parquet" for i in range(5)]
    assert sorted(p.name for p in output.iterdir()) == [
        "errors.jsonl",
        "manifest.json",
        *parts,
        "report.html",
    ]
    ids = pq.read_table(SAMPLE_DATA / "reviews.parquet").column("id").to_pylist()
    assert [
        i for part in parts for i in pq.read_table(output / part).column("id").to_pylist()
    ] == ids
    for part in parts:
        assert pq.read_table(output / part).equals(pq.read_table(reference / part))
    assert (output / "errors.jsonl").read_text() == (reference / "errors.jsonl").read_text()

    # 4. Resumed once more after the complete run: its final results are reused whole.
    assert main([*args, "--resume"]) == 0
    again = json.loads((output / "manifest.json").read_text())
    assert [entry["reused"] for entry in again["inputs"]] == [True] * len(inputs)
    for part in parts:
        assert pq.read_table(output / part).equals(pq.read_table(reference / part))


def test_killed_run_resumes_inside_one_large_file(tmp_path, tiny_models):
    """One Parquet file of five row groups, one work item each: a run killed after two
    items are staged resumes from them; the result equals an uninterrupted run's."""
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet").slice(0, 40)
    source = tmp_path / "big.parquet"
    pq.write_table(table, source, row_group_size=8)
    spec = _spec(tmp_path / "job.yaml", tiny_models, ["sentiment"])
    output, reference = tmp_path / "out", tmp_path / "reference"
    # A work item of (at least) one row group each.
    args = ["--input", str(source), "--spec", str(spec), "--work-item-mb", "0.000001"]
    assert main([*args, "--output", str(reference)]) == 0

    killed = _cli([*args, "--output", str(output)], kill_at="staged:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    staged = _markers(output)
    assert len(staged) == 2

    assert main([*args, "--output", str(output), "--resume"]) == 0
    (entry,) = json.loads((output / "manifest.json").read_text())["inputs"]
    assert (entry["work_items"], entry["reused_work_items"], entry["reused"]) == (5, 2, False)
    # The reused items were not enriched again: their markers are the killed run's.
    assert {name: text for name, text in _markers(output).items() if name in staged} == staged
    assert len(_markers(output)) == 5
    parts = sorted(p.name for p in output.glob("part-*.parquet"))
    assert parts == sorted(p.name for p in reference.glob("part-*.parquet"))
    assert len(parts) == 5
    for part in parts:
        assert pq.read_table(output / part).equals(pq.read_table(reference / part))
    ids = [i for part in parts for i in pq.read_table(output / part).column("id").to_pylist()]
    assert ids == table.column("id").to_pylist()


def test_run_killed_before_swap_keeps_old_output_and_cleans_up(tmp_path, tiny_models):
    """Killed once the new output is assembled: the old one stays, and a plain rerun
    (no --resume) throws away what the killed run left and replaces the output."""
    inputs = _inputs(tmp_path / "in")
    spec = _spec(tmp_path / "job.yaml", tiny_models, ["sentiment"])
    output = tmp_path / "out"
    args = ["--input", str(inputs[0]), "--output", str(output), "--spec", str(spec)]
    assert main(args) == 0
    previous = _snapshot(output)

    killed = _cli(args, kill_at="assembled")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _snapshot(output) == previous
    root = tmp_path / ".out.beam-enrich"
    assert list(root.glob("runs/*/manifest.json"))  # complete, but not under the name

    assert main(args) == 0
    assert not list(root.glob("runs/*")) and not list(root.glob("previous-*"))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["run_id"] != json.loads(previous["manifest.json"])["run_id"]
    assert manifest["inputs"][0]["reused"] is False
    assert sorted(p.name for p in output.iterdir()) == sorted(previous)


def test_output_folder_with_foreign_files_is_refused(tmp_path, tiny_models, capsys):
    spec = _spec(tmp_path / "job.yaml", tiny_models, ["sentiment"])
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    args = ["--input", str(SAMPLE_DATA / "reviews.parquet"), "--output", str(output)]
    assert main([*args, "--spec", str(spec)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert _snapshot(output) == {"notes.txt": b"mine"}


def test_keep_order_csv_parts_follow_input_order_each_with_its_header(tmp_path, tiny_models):
    inputs = _inputs(tmp_path / "in")
    spec = _spec(tmp_path / "job.yaml", tiny_models, ["sentiment"])
    output = tmp_path / "out"
    args = ["--input", str(inputs[0]), "--input", str(inputs[1]), "--output", str(output)]
    assert main([*args, "--spec", str(spec), "--output-format", "csv"]) == 0
    parts = [f"part-{i:05d}-of-00002.csv" for i in range(2)]
    assert sorted(p.name for p in output.iterdir()) == [
        "errors.jsonl",
        "manifest.json",
        *parts,
        "report.html",
    ]
    rows = [
        row
        for part in parts
        for row in csv.DictReader(io.StringIO((output / part).read_text(), newline=""))
    ]
    ids = pq.read_table(SAMPLE_DATA / "reviews.parquet").column("id").to_pylist()[:30]
    assert [int(row["id"]) for row in rows] == ids
    assert all(row["sentiment_label"] in {"POSITIVE", "NEGATIVE", ""} for row in rows)
    manifest = json.loads((output / "manifest.json").read_text())
    assert [f["rows"] for f in manifest["output"]["files"]] == [15, 15]
    assert manifest["rows"]["out"] == 30
