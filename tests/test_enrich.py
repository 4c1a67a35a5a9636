"""The enrichment DoFn's pieces, called directly and inside a Beam pipeline."""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils import shared

from transforms.batching import max_batch_tokens_for, plan_batches
from transforms.chunks import ERRORS_COLUMN, ERRORS_TYPE, Chunk
from transforms.enrich import EnrichTables, _EnrichDoFn
from transforms.inference import BatchLimit, TaskBinding, add_task_columns, run_task
from transforms.models import resolve_model
from transforms.tasks.base import check_text
from transforms.tasks.text_classification import TextClassification, TextClassificationParams


class UpperRunner:
    """A runner whose output is easy to predict; it raises on rows holding "BOOM"."""

    def __init__(self):
        self.batches = []

    def prepare(self, texts):
        if any("BADPREP" in t for t in texts):
            raise ValueError("cannot tokenize BADPREP")
        return list(texts)

    def cost(self, item):
        return len(item)

    def infer(self, items):
        self.batches.append(list(items))
        if any("BOOM" in item for item in items):
            raise RuntimeError("model exploded")
        return [(item.upper(),) for item in items]


def test_run_task_isolates_failing_rows_and_keeps_order():
    texts = ["alpha", None, "BOOM here", "", "   ", "beta", "gamma", "BADPREP", "delta" * 5]
    runner = UpperRunner()
    results, errors, truncated = run_task(runner, [check_text(t) for t in texts], 10_000)

    assert results == [
        ("ALPHA",),
        None,
        None,
        None,
        None,
        ("BETA",),
        ("GAMMA",),
        None,
        ("DELTA" * 5,),
    ]
    assert errors[1] == "InvalidInput: text is null"
    assert errors[2] == "RuntimeError: model exploded"
    assert errors[3] == errors[4] == "InvalidInput: text is empty"
    assert errors[7] == "ValueError: cannot tokenize BADPREP"
    assert [e is None for e in errors] == [r is not None for r in results]
    assert truncated == 0
    # The first, whole-chunk batch failed and was split until the bad row stood alone.
    assert len(runner.batches[0]) == 5
    assert ["BOOM here"] in runner.batches


def test_run_task_reports_non_string_values():
    _, errors, _ = run_task(UpperRunner(), [check_text(v) for v in (3, b"bytes", "ok")], 100)
    assert errors[:2] == [
        "InvalidInput: text must be a string, got int",
        "InvalidInput: text must be a string, got bytes",
    ]
    assert errors[2] is None


def test_plan_batches_respects_the_budget_and_covers_every_row():
    costs = [5, 50, 7, 50, 120, 3, 9, 300, 8]
    batches = plan_batches(costs, max_batch_tokens=100)
    assert sorted(i for batch in batches for i in batch) == list(range(len(costs)))
    for batch in batches:
        longest = max(costs[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 100
    assert batches[0] == [7]  # longest first: a batch too big for memory fails early
    assert plan_batches(costs, 10_000, max_batch_rows=4)[0] == [7, 4, 1, 3]
    assert plan_batches([], 100) == []


def test_default_budget_is_per_device_and_scaled_per_task_family():
    from transforms.tasks.text_generation import TextGeneration

    assert max_batch_tokens_for(None, "cpu") == 2048
    assert max_batch_tokens_for(None, "cuda:1") == 8192
    assert max_batch_tokens_for(None, "cpu", TextGeneration.batch_tokens_factor) == 4096
    assert TextClassification.batch_tokens_factor == 1
    assert max_batch_tokens_for(300, "cpu", TextGeneration.batch_tokens_factor) == 300


def test_add_task_columns_appends_and_keeps_errors_last():
    table = pa.table({"id": [1, 2, 3], "text": ["a", None, "c"]})
    fields = [pa.field("t_label", pa.string()), pa.field("t_score", pa.float32())]
    once = add_task_columns(
        table,
        "t",
        fields,
        [("X", 0.5), None, ("Y", 0.25)],
        [None, "InvalidInput: text is null", None],
    )
    assert once.column_names == ["id", "text", "t_label", "t_score", ERRORS_COLUMN]
    assert once.schema.field(ERRORS_COLUMN).type == ERRORS_TYPE
    assert once.column("t_score").type == pa.float32()
    assert once.column("t_label").to_pylist() == ["X", None, "Y"]

    twice = add_task_columns(
        once, "u", [pa.field("u", pa.string())], [None, None, ("Z",)], ["E: one", "E: two", None]
    )
    assert twice.column_names[-2:] == ["u", ERRORS_COLUMN]
    assert twice.column(ERRORS_COLUMN).to_pylist() == [
        [{"task": "u", "error": "E: one"}],
        [{"task": "t", "error": "InvalidInput: text is null"}, {"task": "u", "error": "E: two"}],
        [],
    ]
    assert twice.select(["id", "text"]).equals(table)


def _binding(tiny_models, name="sentiment", column="text"):
    return TaskBinding(
        adapter=TextClassification(name, TextClassificationParams(), input_column=column),
        model=resolve_model(str(tiny_models["text-classification"])),
        device="cpu",
        max_batch_tokens=256,
    )


def test_model_loads_once_per_process(tiny_models):
    handle = shared.Shared()
    first, second = (
        _EnrichDoFn(_binding(tiny_models), handle),
        _EnrichDoFn(_binding(tiny_models), handle),
    )
    first.setup()
    second.setup()
    assert first._loaded is second._loaded
    other = _EnrichDoFn(_binding(tiny_models, name="other"), handle)
    other.setup()
    assert other._loaded is not first._loaded


def summarize(chunk):
    """(row id, label present?, errors) per row, for assert_that."""
    table = chunk.table
    return [
        (row["id"], row["sentiment_label"] is not None, [e["error"] for e in row[ERRORS_COLUMN]])
        for row in table.to_pylist()
    ]


def test_enrich_tables_in_a_pipeline(tiny_models):
    table = pa.table(
        {"id": [1, 2, 3, 4], "text": ["A lovely kettle.", None, "", "Broke in a week."]}
    )
    chunks = [Chunk(0, "mem", 0, 0, table.slice(0, 2), 2), Chunk(0, "mem", 1, 2, table.slice(2), 2)]
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        rows = (
            pipeline
            | beam.Create(chunks)
            | "Enrich[sentiment]" >> EnrichTables(_binding(tiny_models))
            | beam.FlatMap(summarize)
        )
        assert_that(
            rows,
            equal_to(
                [
                    (1, True, []),
                    (2, False, ["InvalidInput: text is null"]),
                    (3, False, ["InvalidInput: text is empty"]),
                    (4, True, []),
                ]
            ),
            label="CheckRows",
        )


def test_enrich_records_stats_per_chunk(tiny_models):
    dofn = _EnrichDoFn(_binding(tiny_models), shared.Shared())
    dofn.setup()
    chunk = Chunk(0, "mem", 0, 0, pa.table({"text": ["Good.", None, "Bad."]}), 3)
    (out,) = list(dofn.process(chunk))
    (stats,) = out.stats
    assert (stats.task, stats.rows, stats.failed, stats.device, stats.dtype) == (
        "sentiment",
        3,
        1,
        "cpu",
        "fp32",
    )
    assert out.rows_read == 3 and out.table.num_rows == 3


def test_unknown_gpu_is_a_clear_error(tiny_models):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    binding = TaskBinding(**{**_binding(tiny_models).__dict__, "device": "cuda"})
    dofn = _EnrichDoFn(binding, shared.Shared())
    with pytest.raises(ValueError, match="no GPU"):
        dofn.setup()


class MemoryHungryRunner(UpperRunner):
    """Runs out of memory on micro-batches of more than three rows."""

    def infer(self, items):
        if len(items) > 3:
            self.batches.append(list(items))
            raise MemoryError("no room for this batch")
        return super().infer(items)


def test_out_of_memory_halves_batches_and_remembers_the_size():
    runner = MemoryHungryRunner()
    limit = BatchLimit()
    texts = [f"row {i}" for i in range(10)]
    results, errors, _ = run_task(runner, texts, 10_000, limit)
    assert errors == [None] * 10
    assert results == [(t.upper(),) for t in texts]
    assert limit.max_rows == 2  # 10 -> 5 failed, 5 -> 2 and 3 fit; 2 is the size that worked

    runner.batches.clear()
    run_task(runner, texts, 10_000, limit)
    assert runner.batches and max(len(b) for b in runner.batches) <= 2
