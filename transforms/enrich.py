"""EnrichTables: run one task over every chunk, with one model per worker process."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.utils import shared

from transforms.batching import plan_batches
from transforms.chunks import ERRORS_COLUMN, ERRORS_TYPE, Chunk, TaskStats
from transforms.models import ResolvedModel, resolve_device, resolve_dtype
from transforms.tasks.base import InvalidInput, Runner, TaskAdapter

__all__ = ["BatchLimit", "EnrichTables", "TaskBinding", "add_task_columns", "run_task"]

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskBinding:
    """Everything a worker needs to run one task: picklable, no model inside.

    Attributes:
        adapter: the task family's adapter: the task's name, parameters and columns.
        model: the model pinned to a commit or content hash.
        device: `auto`, `cpu`, `cuda` or `cuda:N`, decided on the worker.
        dtype: `auto`, `fp32`, `fp16`, `bf16` or `int8`.
        max_batch_tokens: the padded size (rows x longest row) of one micro-batch.
    """

    adapter: TaskAdapter
    model: ResolvedModel
    device: str = "auto"
    dtype: str = "auto"
    max_batch_tokens: int = 8192

    @property
    def name(self) -> str:
        return self.adapter.name


@dataclasses.dataclass
class _LoadedRunner:
    # Shared.acquire needs a weak-referenceable object; this holder is one.
    runner: Runner
    device: str
    dtype: str


@dataclasses.dataclass
class BatchLimit:
    """The most rows per micro-batch that fit in memory, learned from out-of-memory errors."""

    max_rows: int | None = None

    def shrink(self, rows: int) -> None:
        half = max(1, rows // 2)
        self.max_rows = half if self.max_rows is None else min(self.max_rows, half)


def _is_out_of_memory(err: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA and other devices) or the host's MemoryError.
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"


def run_task(
    runner: Runner, inputs: Sequence, max_batch_tokens: int, limit: BatchLimit | None = None
) -> tuple[list[tuple | None], list[str | None], int]:
    """Runs a task over one chunk's row inputs.

    Args:
        runner: the loaded task.
        inputs: per row, the task's input from `TaskAdapter.row_inputs`; an
            `InvalidInput` stands for a row that cannot run.
        max_batch_tokens: the padded size of one micro-batch.
        limit: rows per micro-batch known to fit in memory; out-of-memory errors
            lower it, so later chunks start from the size that worked.

    Rows with invalid input and rows whose inference raises get an error instead of a
    result; a micro-batch that raises is split in halves until the failing rows are
    found, so the rows beside them still get their results.

    Returns:
        (results, errors, truncated): per row, a tuple of field values or None, and an
        error string (`Type: message`) or None; and how many rows were truncated.
    """
    results: list[tuple | None] = [None] * len(inputs)
    errors: list[str | None] = [
        _describe(x) if isinstance(x, InvalidInput) else None for x in inputs
    ]
    valid = [i for i, error in enumerate(errors) if error is None]
    items = _prepare(runner, [inputs[i] for i in valid], valid, errors)
    prepared = []
    for row, item in zip(valid, items, strict=True):
        if isinstance(item, InvalidInput):  # prepare may reject a row it cannot run
            errors[row] = _describe(item)
        elif item is not None:
            prepared.append((row, item))
    limit = limit if limit is not None else BatchLimit()
    costs = [runner.cost(item) for _, item in prepared]
    for batch in plan_batches(costs, max_batch_tokens, limit.max_rows):
        _infer_isolating(runner, [prepared[b] for b in batch], results, errors, limit)
    truncated = sum(1 for _, item in prepared if getattr(item, "truncated", False))
    return results, errors, truncated


def _prepare(runner: Runner, inputs: list, rows: list[int], errors: list) -> list:
    try:
        return runner.prepare(inputs)
    except Exception:
        # One bad row must not fail the chunk: find it by preparing rows one by one.
        items = []
        for row, value in zip(rows, inputs, strict=True):
            try:
                items.extend(runner.prepare([value]))
            except Exception as err:
                errors[row] = _describe(err)
                items.append(None)
        return items


def _infer_isolating(
    runner: Runner, batch: list, results: list, errors: list, limit: BatchLimit
) -> None:
    try:
        outputs = runner.infer([item for _, item in batch])
    except Exception as err:
        if len(batch) == 1:
            errors[batch[0][0]] = _describe(err)
            return
        if _is_out_of_memory(err):
            limit.shrink(len(batch))
            _LOG.warning(
                "out of memory on %d rows; micro-batches now hold at most %d",
                len(batch),
                limit.max_rows,
            )
        middle = len(batch) // 2
        _infer_isolating(runner, batch[:middle], results, errors, limit)
        _infer_isolating(runner, batch[middle:], results, errors, limit)
        return
    for (row, _), output in zip(batch, outputs, strict=True):
        results[row] = output


def _describe(err: BaseException) -> str:
    message = " ".join(str(err).split()) or repr(err)
    return f"{type(err).__name__}: {message[:2000]}"


def add_task_columns(
    table: pa.Table,
    task_name: str,
    fields: Sequence[pa.Field],
    results: Sequence[tuple | None],
    errors: Sequence[str | None],
) -> pa.Table:
    """Appends a task's columns and its failures; `enrich_errors` stays the last column."""
    previous = (
        table.column(ERRORS_COLUMN).to_pylist()
        if ERRORS_COLUMN in table.column_names
        else [[] for _ in range(table.num_rows)]
    )
    if ERRORS_COLUMN in table.column_names:
        table = table.drop_columns([ERRORS_COLUMN])
    for position, field in enumerate(fields):
        values = [None if r is None else r[position] for r in results]
        table = table.append_column(field, pa.array(values, type=field.type))
    merged = [
        entries if error is None else [*entries, {"task": task_name, "error": error}]
        for entries, error in zip(previous, errors, strict=True)
    ]
    return table.append_column(pa.field(ERRORS_COLUMN, ERRORS_TYPE), pa.array(merged, ERRORS_TYPE))


class _EnrichDoFn(beam.DoFn):
    def __init__(self, task: TaskBinding, shared_handle: shared.Shared):
        self._task = task
        self._shared = shared_handle
        prefix = task.name
        self._rows = beam.metrics.Metrics.counter("beam_enrich", f"{prefix}_rows")
        self._failed = beam.metrics.Metrics.counter("beam_enrich", f"{prefix}_failed_rows")
        self._batch_ms = beam.metrics.Metrics.distribution("beam_enrich", f"{prefix}_chunk_ms")

    def _load(self) -> _LoadedRunner:
        task = self._task
        device = resolve_device(task.device)
        dtype = resolve_dtype(task.dtype, device)
        from transformers.utils import logging as hf_logging

        # Worker logs are for problems; a per-load weights progress bar is noise there.
        hf_logging.disable_progress_bar()
        started = time.perf_counter()
        runner = task.adapter.load(task.model, device, dtype)
        _LOG.info(
            "task %s: loaded %s (%s) on %s/%s in %.1fs",
            task.name,
            task.model.model,
            task.model.resolved,
            device,
            dtype,
            time.perf_counter() - started,
        )
        return _LoadedRunner(runner, device, dtype)

    def setup(self):
        # One model per process, shared by the process's threads; the tag keys it to
        # this exact task, model and placement.
        tag = repr((self._task.name, self._task.model, self._task.device, self._task.dtype))
        self._loaded = self._shared.acquire(self._load, tag=tag)
        self._limit = BatchLimit()

    def process(self, chunk: Chunk) -> Iterator[Chunk]:
        task = self._task
        adapter = task.adapter
        columns = {name: chunk.table.column(name).to_pylist() for name in adapter.read_columns()}
        started = time.perf_counter()
        inputs = adapter.row_inputs(columns)
        results, errors, truncated = run_task(
            self._loaded.runner, inputs, task.max_batch_tokens, self._limit
        )
        seconds = time.perf_counter() - started
        table = add_task_columns(chunk.table, task.name, task.adapter.fields(), results, errors)
        failed = sum(error is not None for error in errors)
        self._rows.inc(len(inputs))
        self._failed.inc(failed)
        self._batch_ms.update(int(seconds * 1000))
        stats = TaskStats(
            task=task.name,
            rows=len(inputs),
            failed=failed,
            truncated=truncated,
            seconds=seconds,
            device=self._loaded.device,
            dtype=self._loaded.dtype,
        )
        yield dataclasses.replace(chunk, table=table, stats=(*chunk.stats, stats))


class EnrichTables(beam.PTransform):
    """Adds one task's typed columns to every chunk.

    Args:
        task: the task, its pinned model and its placement.
    """

    def __init__(self, task: TaskBinding):
        super().__init__()
        self._task = task

    def expand(self, chunks):
        return chunks | "Infer" >> beam.ParDo(_EnrichDoFn(self._task, shared.Shared()))
