"""Clean runs: a clean exit after timed-out batches, no retries without network, a report
for every column type, quiet worker processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants

from pipelines.report import summarize_output
from tests.conftest import REPO, fake_hub_cache
from transforms.inference import TaskBinding, load_task
from transforms.models import ModelError, resolve_model, retry_transient
from transforms.tasks.text_classification import TextClassification, TextClassificationParams

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cli(tmp_path: Path, table: pa.Table, spec: dict, *extra: str):
    """`python -m pipelines.enrich` in its own process (what happens at exit counts)."""
    source, spec_path, output = tmp_path / "in.parquet", tmp_path / "job.yaml", tmp_path / "out"
    pq.write_table(table, source)
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "pipelines.enrich", "--input", str(source)]
    command += ["--output", str(output), "--spec", str(spec_path), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return done, output


# --- a timed-out batch still in torch at exit ---------------------------------------------


def test_a_batch_timed_out_and_still_in_torch_at_exit_leaves_a_clean_exit(tmp_path, tiny_models):
    texts = ["a good film", "SLOW to judge", "a bad film", "fine"]
    task = {
        "name": "s",
        "task": "tests.plugins.slow_inference:SlowInference",
        "model": str(tiny_models["text-classification"]),
        "inference_timeout_s": 2.0,
        "max_batch_tokens": 1,  # one row per micro-batch
    }
    table = pa.table({"text": texts})
    done, output = _cli(tmp_path, table, {"rows_per_chunk": 8, "tasks": [task]})

    assert done.returncode == 0, done.stderr
    assert "terminate called" not in done.stderr
    assert f"{len(texts)} rows written to {output}" in done.stdout
    written = pq.read_table(next(output.glob("part-*.parquet")))
    assert written.column("text").to_pylist() == texts
    errors = [[e["error"] for e in row] for row in written.column("enrich_errors").to_pylist()]
    for text, found in zip(texts, errors, strict=True):
        if "SLOW" in text:
            assert len(found) == 1 and found[0].startswith("TimeoutError: inference on a micro")
        else:
            assert found == []


# --- no network: fail or use the cache at once -----------------------------------------


def _tries(err: BaseException, attempts: int = 4) -> tuple[int, list[float]]:
    """Calls and waits `retry_transient` spends on a call that always raises `err`."""
    calls, waits = [], []

    def fail():
        calls.append(1)
        raise err

    with pytest.raises(type(err)):
        retry_transient(fail, "test", attempts=attempts, sleep=waits.append)
    return len(calls), waits


def test_a_host_that_cannot_be_reached_is_not_retried_but_a_timeout_is():
    request = httpx2.Request("GET", "https://huggingface.co/api/models/acme/m")
    lookup = httpx2.ConnectError("[Errno -2] Name or service not known", request=request)
    lookup.__cause__ = socket.gaierror(-2, "Name or service not known")
    refused = httpx2.ConnectError("[Errno 111] Connection refused", request=request)
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    # requests keeps only the text of urllib3's NameResolutionError.
    worded = ConnectionError(
        "HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded "
        "(Caused by NameResolutionError(\"Failed to resolve 'huggingface.co'\"))"
    )
    for err in (lookup, refused, worded):
        assert _tries(err) == (1, []), err
    assert _tries(httpx2.ConnectTimeout("timed out", request=request)) == (4, [1.0, 2.0, 4.0])


def test_without_network_a_cached_model_resolves_and_loads_from_the_cache_at_once(
    tmp_path, tiny_models, monkeypatch
):
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "acme/tiny", tiny_models["text-classification"], COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    lookups, waits = [], []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(time, "sleep", waits.append)  # huggingface_hub's own retries too

    model = resolve_model("acme/tiny", "main")
    assert (model.source, model.revision) == ("hub", COMMIT)
    with pytest.raises(ModelError, match=r"'acme/not-cached'.*cannot be reached"):
        resolve_model("acme/not-cached", "main")
    assert lookups and waits == []  # the hub was asked once per model, never again

    lookups.clear()
    loaded = load_task(
        TaskBinding(
            adapter=TextClassification("s", TextClassificationParams(), input_column="text"),
            model=model,
            device="cpu",
        )
    )
    results, errors, _ = loaded.run(["good", "bad"], 64)
    assert errors == [None, None] and all(label for label, _ in results)
    assert lookups == [] and waits == []  # a pinned commit's snapshot needs no hub request


# --- the report copes with every column type ---------------------------------------------


def _expected_lengths(cells: list) -> dict:
    """count, min, max and missing of characters per cell, computed in Python."""
    texts = [
        cell if isinstance(cell, str) else json.dumps(cell) if isinstance(cell, list) else str(cell)
        for cell in cells
        if cell is not None
    ]
    lengths = [len(text) for text in texts]
    found = (len(lengths), min(lengths, default=None), max(lengths, default=None))
    return {"found": found, "missing": cells.count(None)}


def _lengths(summary: dict) -> dict:
    characters = summary["input"]["characters"]
    found = (characters["count"], characters["min"], characters["max"])
    return {"found": found, "missing": summary["input"]["missing"]}


def test_the_report_summarizes_inputs_of_every_column_type(tmp_path):
    inputs = {
        "view": pa.array(["a", "bcd", None, "héé"], pa.string_view()),
        "nothing": pa.nulls(4),
        "stars": pa.array([7, 42, None, 1000], pa.int64()),
        "coded": pa.array(["xy", None, "z", "xy"]).dictionary_encode(),
        "labels": pa.array([["ab"], None, [], ["c", "d"]], pa.list_(pa.string())),
    }
    table = pa.table({**inputs, **{f"g_{name}": pa.array(["out"] * 4) for name in inputs}})
    tasks = [
        {"name": f"g_{n}", "task": "text-generation", "columns": [f"g_{n}"], "input_columns": [n]}
        for n in inputs
    ]
    pq.write_table(table, tmp_path / "part.parquet")
    summaries, _ = summarize_output(
        [str(tmp_path / "part.parquet")], [], tasks, table.schema, "parquet"
    )
    for name, column in inputs.items():
        assert _lengths(summaries[f"g_{name}"]) == _expected_lengths(column.to_pylist()), name

    # CSV output holds a string_view column as plain text; the report reads it back so.
    (tmp_path / "part.csv").write_text("view,g_view\na,out\nbcd,out\n,out\nhéé,out\n")
    csv_schema = table.select(["view", "g_view"]).schema
    summaries, _ = summarize_output([str(tmp_path / "part.csv")], [], tasks[:1], csv_schema, "csv")
    assert _lengths(summaries["g_view"]) == _expected_lengths(inputs["view"].to_pylist())


# --- --quiet with worker processes (and the report of a string_view column, end to end) --


def test_a_quiet_multi_process_run_prints_nothing_and_reports_a_string_view_column(
    tmp_path, tiny_models
):
    texts = ["a good film", None, "a bad film", "fine", "so-so"]
    table = pa.table({"id": range(len(texts)), "text": pa.array(texts, pa.string_view())})
    task = {
        "name": "s",
        "task": "sentiment-analysis",
        "model": str(tiny_models["text-classification"]),
    }
    done, output = _cli(
        tmp_path,
        table,
        {"rows_per_chunk": 2, "tasks": [task]},
        "--quiet",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    )

    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["output"]["report"] == str(output / "report.html")
    assert (output / "report.html").is_file()
    (described,) = manifest["tasks"]
    assert _lengths(described["summary"]) == _expected_lengths(texts)
