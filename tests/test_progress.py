"""Live progress and Beam metrics: the DoFn's metrics, the progress files, the display."""

from __future__ import annotations

import io
import json
import multiprocessing
import re
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipelines.cli import main
from pipelines.enrich import run
from pipelines.job import _rows_to_enrich
from pipelines.progress import ProgressMonitor, show_progress
from tests.conftest import SAMPLE_DATA, EchoRunner
from transforms.batching import plan_batches
from transforms.chunks import Chunk
from transforms.enrich import METRICS_NAMESPACE, EnrichTables
from transforms.inference import TaskBinding, apply_task, load_task, run_task
from transforms.models import resolve_model
from transforms.progress import ProgressWriter, TaskProgress, read_progress
from transforms.tasks.base import check_text
from transforms.tasks.text_classification import TextClassification, TextClassificationParams


def test_run_task_reports_each_planned_micro_batch_and_keeps_its_results():
    texts = ["a" * 9, "bb", None, "BOOM", "c" * 5, "dd", "e", "f" * 7]
    inputs = [check_text(t) for t in texts]
    seen: list[tuple[int, int]] = []

    with_hook = run_task(EchoRunner(), inputs, 20, on_batch=lambda r, t: seen.append((r, t)))

    assert with_hook == run_task(EchoRunner(), inputs, 20)
    valid = [t for t in texts if t is not None]
    expected = [
        (len(batch), len(batch) * max(len(valid[i]) for i in batch))
        for batch in plan_batches([len(t) for t in valid], 20)
    ]
    assert seen == expected and len(seen) > 1
    assert sum(rows for rows, _ in seen) == len(valid)  # the failing "BOOM" row too


def _binding(tiny_models, progress_dir: str | None = None) -> TaskBinding:
    return TaskBinding(
        adapter=TextClassification("sentiment", TextClassificationParams(), input_column="text"),
        model=resolve_model(str(tiny_models["text-classification"])),
        device="cpu",
        max_batch_tokens=64,  # several micro-batches per chunk
        progress_dir=progress_dir,
    )


def _metrics(result) -> dict:
    found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    return {
        m.key.metric.name: m.result for kind in ("counters", "distributions") for m in found[kind]
    }


def test_pipeline_reports_beam_metrics_and_publishes_progress(tmp_path, tiny_models, sample_texts):
    texts = [*sample_texts[:20], None, "", *sample_texts[20:30]]
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    chunks = [
        Chunk(0, "mem", i, start, table.slice(start, 16), table.slice(start, 16).num_rows)
        for i, start in enumerate(range(0, table.num_rows, 16))
    ]
    progress_dir = str(tmp_path / "progress")

    pipeline = beam.Pipeline(runner=FnApiRunner())
    _ = (
        pipeline
        | beam.Create(chunks)
        | "Enrich[sentiment]" >> EnrichTables(_binding(tiny_models, progress_dir))
    )
    result = pipeline.run()
    result.wait_until_finish()
    metrics = _metrics(result)

    # The same chunks run in-process give the micro-batches the metrics must describe.
    binding = _binding(tiny_models)
    loaded = load_task(binding)
    batches: list[tuple[int, int]] = []
    for chunk in chunks:
        apply_task(binding, loaded, chunk.table, on_batch=lambda r, t: batches.append((r, t)))
    rows, tokens = [r for r, _ in batches], [t for _, t in batches]

    assert metrics["sentiment_rows"] == len(texts)
    assert metrics["sentiment_failed_rows"] == 2
    batch_rows, batch_tokens = metrics["sentiment_batch_rows"], metrics["sentiment_batch_tokens"]
    assert (batch_rows.count, batch_rows.sum, batch_rows.min, batch_rows.max) == (
        len(rows),
        len(texts) - 2,
        min(rows),
        max(rows),
    )
    assert (batch_tokens.count, batch_tokens.sum, batch_tokens.max) == (
        len(tokens),
        sum(tokens),
        max(tokens),
    )
    assert len(rows) > len(chunks)
    assert metrics["sentiment_inference_ms"].count == len(chunks)
    assert read_progress(progress_dir) == {"sentiment": TaskProgress(rows=len(texts), failed=2)}


def _publish_from_a_child(progress_dir: str) -> None:
    writer = ProgressWriter.for_task(progress_dir, "sentiment")
    writer.add(10, 1)
    writer.flush()


def test_progress_reader_sums_every_process_file(tmp_path):
    progress_dir = str(tmp_path)
    parent = ProgressWriter.for_task(progress_dir, "sentiment")
    parent.add(5, 0)
    # Forked children inherit the parent's writers; each must still count in its own file.
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_publish_from_a_child, args=(progress_dir,)) for _ in "ab"]
    for child in children:
        child.start()
    for child in children:
        child.join()
    assert [child.exitcode for child in children] == [0, 0]
    ProgressWriter(progress_dir, "entities").add(7, 3)
    (tmp_path / "torn.progress.json.tmp").write_text('{"task": "sentiment", "ro')
    (tmp_path / "notes.txt").write_text("not progress")

    assert read_progress(progress_dir) == {
        "sentiment": TaskProgress(rows=25, failed=2),
        "entities": TaskProgress(rows=7, failed=3),
    }
    assert len(list(tmp_path.glob("sentiment.*.progress.json"))) == 3
    assert read_progress(str(tmp_path / "missing")) == {}


def test_writer_throttles_writes_and_flush_publishes_the_rest(tmp_path, monkeypatch):
    # A machine booted 5 s ago: `time.monotonic()` counts from boot.
    monkeypatch.setattr("transforms.progress.time.monotonic", lambda: 5.0)
    writer = ProgressWriter(str(tmp_path), "sentiment", min_interval_s=3600)
    writer.add(4, 1)  # the first count is published at once, whatever the uptime
    writer.add(6, 0)
    assert read_progress(str(tmp_path))["sentiment"] == TaskProgress(rows=4, failed=1)
    writer.flush()
    assert read_progress(str(tmp_path))["sentiment"] == TaskProgress(rows=10, failed=1)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_one_bar_per_task_and_quiet_gets_nothing(tmp_path):
    ProgressWriter(str(tmp_path), "sentiment").add(40, 2)
    ProgressWriter(str(tmp_path), "entities").add(25, 0)
    terminal = _Terminal()
    display = show_progress(str(tmp_path), ["sentiment", "entities"], 40, stream=terminal)
    assert isinstance(display, ProgressMonitor)
    with display:
        pass
    shown = terminal.getvalue()
    assert re.search(r"sentiment: 100%.*40/40 .*failed=2", shown)
    assert re.search(r"entities: +62%.*25/40", shown)

    for quiet, folder in ((True, str(tmp_path)), (False, None)):
        silent = io.StringIO()
        with show_progress(folder, ["sentiment"], 40, quiet=quiet, stream=silent):
            pass
        assert silent.getvalue() == ""


def test_rows_to_enrich_reads_parquet_footers_only(tmp_path):
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet")
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(table, tmp_path / "c.parquet")
    pacsv.write_csv(table.select(["id", "text"]), tmp_path / "b.csv")
    parquet = [str(tmp_path / "a.parquet"), str(tmp_path / "c.parquet")]

    assert _rows_to_enrich(parquet, {}) == 2 * table.num_rows
    assert _rows_to_enrich(parquet, {1: 5}) == table.num_rows + 5
    # A CSV file has no count short of reading it: progress then counts rows done.
    assert _rows_to_enrich([parquet[0], str(tmp_path / "b.csv")], {}) is None


def _write_spec(path: Path, tiny_models, *, embedding: bool = True) -> Path:
    tasks = [
        {
            "name": "sentiment",
            "task": "sentiment-analysis",
            "model": str(tiny_models["text-classification"]),
        },
        {
            "name": "embedding",
            "task": "feature-extraction",
            "model": str(tiny_models["feature-extraction"]),
        },
    ]
    spec = {"rows_per_chunk": 16, "tasks": tasks if embedding else tasks[:1]}
    path.write_text(json.dumps(spec))
    return path


def _csv_input(tmp_path: Path) -> tuple[Path, int, int]:
    """The sample reviews with two blank texts: (path, rows, blank rows)."""
    table = pq.read_table(SAMPLE_DATA / "reviews.parquet").select(["id", "text"])
    texts = table.column("text").to_pylist()
    texts[2] = texts[7] = ""
    table = table.set_column(1, "text", pa.array(texts))
    source = tmp_path / "in.csv"
    pacsv.write_csv(table, source)
    return source, table.num_rows, 2


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, tiny_models, capsys):
    source, rows, blank = _csv_input(tmp_path)
    output = tmp_path / "out"
    argv = ["--input", str(source), "--output", str(output), "--spec"]
    run([*argv, str(_write_spec(tmp_path / "job.yaml", tiny_models))], progress_interval_s=0.05)

    lines = capsys.readouterr().err.splitlines()
    periodic = [line for line in lines if "rows/s" in line and "done in" not in line]
    assert periodic and all(line.startswith("beam-enrich: progress: ") for line in periodic)
    final = [line for line in lines if "done in" in line]
    assert len(final) == 2 and lines[-2:] == final
    for line, task in zip(final, ("sentiment", "embedding"), strict=True):
        # CSV: the launcher never reads rows to count them; progress counts rows done.
        assert f"{task}: {rows} rows, {blank} failed, " in line
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["rows"]["failed"] == {"sentiment": blank, "embedding": blank}
    assert not (tmp_path / ".out.beam-enrich" / "progress").exists()


def test_quiet_run_prints_nothing(tmp_path, tiny_models, capfd):
    source, _, _ = _csv_input(tmp_path)
    spec = _write_spec(tmp_path / "job.yaml", tiny_models, embedding=False)
    output = tmp_path / "out"
    argv = ["--input", str(source), "--output", str(output), "--spec", str(spec), "--quiet"]

    assert main(argv) == 0

    assert capfd.readouterr() == ("", "")
    assert (output / "manifest.json").exists()
