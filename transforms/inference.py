"""The hot path of one task, without Beam: load a model, run a chunk's rows, add columns.

`transforms.enrich` wraps this in a Beam DoFn; benchmarks and machines without
apache_beam run it directly. Nothing here may import apache_beam.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

import pyarrow as pa

from transforms.batching import max_batch_tokens_for, plan_batches
from transforms.chunks import ERRORS_COLUMN, ERRORS_TYPE, TaskStats
from transforms.dedup import ResultCache, input_key
from transforms.gguf_reads import shared_gguf_readers
from transforms.models import (
    ResolvedModel,
    cached_snapshot,
    compiling,
    resolve_device,
    resolve_dtype,
    retry_transient,
)
from transforms.tasks.base import InvalidInput, Runner, SplitRunner, TaskAdapter

__all__ = [
    "BatchLimit",
    "LoadedModel",
    "RowResults",
    "TaskBinding",
    "add_task_columns",
    "apply_task",
    "load_task",
    "run_rows",
    "run_task",
]

_LOG = logging.getLogger(__name__)

#: `on_batch(rows, padded_tokens)`: called once per planned micro-batch of `run_task`.
BatchCallback = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class TaskBinding:
    """Everything a worker needs to run one task: picklable, no model inside.

    Attributes:
        adapter: the task family's adapter: the task's name, parameters and columns.
        model: the model pinned to a commit or content hash.
        device: `auto`, `cpu`, `cuda` or `cuda:N`, decided on the worker.
        dtype: `auto`, `fp32`, `fp16`, `bf16` or `int8`.
        max_batch_tokens: the padded size (rows x longest row) of one micro-batch;
            None: `DEFAULT_MAX_BATCH_TOKENS` for the device the worker uses, times the
            adapter's `batch_tokens_factor` (2 for text-generation).
        inference_timeout_s: a micro-batch still running after this many seconds
            fails its rows with `TimeoutError`; None waits forever.
        share_model: `process`: one model per SDK process (Beam's `Shared`);
            `machine`: one per machine, served to every SDK process through Beam's
            `MultiProcessShared` (one copy per GPU); `auto`: machine on GPU workers.
        cpu_threads: torch intra-op threads on CPU workers (each process's share of the
            cores); None leaves torch's default.
        progress_dir: a local folder where workers publish rows done, for the driver's
            live progress (see `transforms.progress`); None (remote runners) publishes
            Beam metrics only.
        compile: compile the model with `torch.compile` on the worker (see
            `transforms.models.compiling`): slower to start, faster per row.
    """

    adapter: TaskAdapter
    model: ResolvedModel
    device: str = "auto"
    dtype: str = "auto"
    max_batch_tokens: int | None = None
    inference_timeout_s: float | None = None
    share_model: str = "auto"
    cpu_threads: int | None = None
    progress_dir: str | None = None
    compile: bool = False

    @property
    def name(self) -> str:
        return self.adapter.name


class LoadedModel:
    """A loaded task (see `load_task`), its batch-size memory and its cache of results.

    Shared by threads or, behind a proxy, by processes, so its interface is methods
    that take and return plain data (one call per chunk).
    """

    def __init__(self, runner: Runner, device: str, dtype: str, *, overlap: bool = False):
        self.runner = runner
        self.device = device
        self.dtype = dtype
        self.overlap = overlap
        self.limit = BatchLimit()
        self.cache = ResultCache()

    def forward(self, batch: dict) -> dict:
        """One micro-batch's forward pass (`SplitRunner.forward`), for callers that
        collate and decode in their own processes."""
        try:
            return self.runner.forward(batch)
        except Exception as err:
            if _is_out_of_memory(err):
                # The caller halves its batches and retries; the memory to free is here.
                _release_cuda_cache()
            raise

    def forward_many(self, batches: list[dict]) -> list:
        """`forward` of each micro-batch of a chunk, in one call: per batch its outputs,
        or the exception it raised."""
        answers: list = []
        for batch in batches:
            try:
                answers.append(self.forward(batch))
            except Exception as err:
                answers.append(err)
        return answers

    def placement(self) -> tuple[str, str]:
        return self.device, self.dtype

    def run(self, inputs: list, max_batch_tokens: int, timeout_s: float | None = None):
        return run_task(self.runner, inputs, max_batch_tokens, self.limit, timeout_s=timeout_s)

    def run_measured(
        self,
        inputs: list,
        max_batch_tokens: int,
        timeout_s: float | None = None,
        *,
        dedup: bool = False,
    ) -> RowResults:
        """`run_rows` with this model's batch limit and, with `dedup`, its cache.

        The micro-batch sizes come back as data (`RowResults.batches`), not through a
        callback, because behind a `MultiProcessShared` proxy this runs in another
        process.
        """
        return run_rows(
            self.runner,
            inputs,
            max_batch_tokens,
            self.limit,
            timeout_s=timeout_s,
            cache=self.cache if dedup else None,
            dedup=dedup,
            overlap=self.overlap,
        )


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


def _release_cuda_cache() -> None:
    # After a CUDA out-of-memory error the allocator still holds the failed batch's
    # blocks; hand them back before the smaller retries. No-op without torch or CUDA.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


#: Threads of timed micro-batches (`_infer_with_timeout`) still running, and their lock.
_TIMED_THREADS: set[threading.Thread] = set()
_TIMED_THREADS_LOCK = threading.Lock()
#: At interpreter exit, the longest wait for timed-out micro-batches still running.
_EXIT_WAIT_S = 60.0


def _infer_with_timeout(runner: Runner, items: list, timeout_s: float | None) -> list:
    """`runner.infer(items)`, given up on after `timeout_s` seconds.

    Hand-written: a `concurrent.futures` pool cannot abandon a hung worker (its next
    batch would queue behind it, and shutdown waits for it), so each timed batch gets
    its own daemon thread. Python cannot kill a thread: a hung batch's thread runs on,
    and may keep a core busy, until its call returns; the run goes on without it, and
    the process waits for it at exit (`_wait_for_timed_out_batches`).
    """
    if timeout_s is None:
        return runner.infer(items)
    done = threading.Event()
    outcome: list = []

    def target() -> None:
        try:
            outcome.append((True, runner.infer(items)))
        except BaseException as err:  # handed to the waiting thread, raised there
            outcome.append((False, err))
        finally:
            done.set()
            with _TIMED_THREADS_LOCK:
                _TIMED_THREADS.discard(threading.current_thread())

    thread = threading.Thread(target=target, name="beam-enrich-infer", daemon=True)
    with _TIMED_THREADS_LOCK:
        _TIMED_THREADS.add(thread)
    thread.start()
    if not done.wait(timeout_s):
        raise TimeoutError(
            f"inference on a micro-batch of {len(items)} row(s) took longer than "
            f"inference_timeout_s={timeout_s:g}s"
        )
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


@atexit.register
def _wait_for_timed_out_batches(timeout_s: float = _EXIT_WAIT_S) -> None:
    """At exit, waits up to `timeout_s` for micro-batches given up on that still run.

    A daemon thread that comes back from torch once the interpreter is finalizing is
    ended by `pthread_exit`, and unwinding torch's C++ frames that way aborts the
    process (`terminate called without an active exception`, exit 134) after a run
    that succeeded. Exit handlers run before finalization, so waiting here lets such a
    call return cleanly. A call that never returns is left to end with the process.
    """
    with _TIMED_THREADS_LOCK:
        running = list(_TIMED_THREADS)
    if not running:
        return
    _LOG.info("waiting for %d timed-out micro-batch(es) to end before exiting", len(running))
    deadline = time.monotonic() + timeout_s
    for thread in running:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = sum(thread.is_alive() for thread in running)
    if left:
        _LOG.warning(
            "%d timed-out micro-batch(es) still running after %gs; exiting without them",
            left,
            timeout_s,
        )


@dataclasses.dataclass
class RowResults:
    """What running a task over one chunk's rows gave, row by row.

    Attributes:
        results: per row, a tuple of field values, or None where the row failed.
        errors: per row, an error string (`Type: message`) or None.
        truncated: per row, whether its input was cut to fit the model.
        cached: rows whose result was copied instead of computed: repeats of an
            earlier row of the chunk, or inputs found in the cache of earlier chunks.
        batches: (rows, padded tokens) of each micro-batch that ran.
    """

    results: list[tuple | None]
    errors: list[str | None]
    truncated: list[bool]
    cached: int = 0
    batches: list[tuple[int, int]] = dataclasses.field(default_factory=list)


def run_task(
    runner: Runner,
    inputs: Sequence,
    max_batch_tokens: int,
    limit: BatchLimit | None = None,
    *,
    timeout_s: float | None = None,
    on_batch: BatchCallback | None = None,
    dedup: bool = False,
) -> tuple[list[tuple | None], list[str | None], int]:
    """Runs a task over one chunk's row inputs: `run_rows`, with a count of truncated rows.

    Returns:
        (results, errors, truncated): per row, a tuple of field values or None, and an
        error string (`Type: message`) or None; and how many rows were truncated.
    """
    run = run_rows(
        runner,
        inputs,
        max_batch_tokens,
        limit,
        timeout_s=timeout_s,
        on_batch=on_batch,
        dedup=dedup,
    )
    return run.results, run.errors, sum(run.truncated)


def run_rows(
    runner: Runner,
    inputs: Sequence,
    max_batch_tokens: int,
    limit: BatchLimit | None = None,
    *,
    timeout_s: float | None = None,
    on_batch: BatchCallback | None = None,
    dedup: bool = False,
    cache: ResultCache | None = None,
    overlap: bool = False,
) -> RowResults:
    """Runs a task over one chunk's row inputs.

    Args:
        runner: the loaded task.
        inputs: per row, the task's input from `TaskAdapter.row_inputs`; an
            `InvalidInput` stands for a row that cannot run.
        max_batch_tokens: the padded size of one micro-batch.
        limit: rows per micro-batch known to fit in memory; out-of-memory errors
            lower it, so later chunks start from the size that worked.
        timeout_s: a micro-batch still running after this many seconds fails each of
            its rows with `TimeoutError`, without being split.
        on_batch: called after each planned micro-batch with its rows and padded tokens
            (rows x the longest row's cost), whether its rows succeeded or not.
        dedup: the task's output is a pure function of its input
            (`TaskAdapter.deterministic`): equal inputs run once and the others get a
            copy of the result, or of the error.
        cache: with `dedup`, results of earlier chunks to reuse; this chunk's
            results are added to it. Errors are never cached: they may be transient.
        overlap: for a `SplitRunner` without `timeout_s`, run each micro-batch's
            forward pass on a thread while the next is collated and the last decoded.

    Rows with invalid input and rows whose inference raises get an error instead of a
    result; a micro-batch that raises is split in halves until the failing rows are
    found, so the rows beside them still get their results.
    """
    count = len(inputs)
    run = RowResults(
        results=[None] * count,
        errors=[_describe(x) if isinstance(x, InvalidInput) else None for x in inputs],
        truncated=[False] * count,
    )
    keys: list[bytes | None] = [None] * count
    first: dict[bytes, int] = {}  # input key -> the row that holds its result
    repeats: list[tuple[int, int]] = []  # (row, the row it repeats)
    todo: list[int] = []
    for row, value in enumerate(inputs):
        if run.errors[row] is not None:
            continue
        key = input_key(value) if dedup else None
        if key is None:
            todo.append(row)
        elif key in first:
            repeats.append((row, first[key]))
        else:
            first[key] = row
            hit = cache.get(key) if cache is not None else None
            if hit is None:
                keys[row] = key
                todo.append(row)
            else:
                run.results[row], run.truncated[row] = hit
                run.cached += 1
    _compute(runner, inputs, todo, run, max_batch_tokens, limit, timeout_s, on_batch, overlap)
    for row, source in repeats:
        run.results[row] = run.results[source]
        run.errors[row] = run.errors[source]
        run.truncated[row] = run.truncated[source]
        run.cached += run.errors[source] is None
    if cache is not None:
        for row in todo:
            if keys[row] is not None and run.errors[row] is None:
                cache.put(keys[row], (run.results[row], run.truncated[row]))
    return run


def _compute(
    runner: Runner,
    inputs: Sequence,
    rows: list[int],
    run: RowResults,
    max_batch_tokens: int,
    limit: BatchLimit | None,
    timeout_s: float | None,
    on_batch: BatchCallback | None,
    overlap: bool,
) -> None:
    """Prepares and infers `rows` of `inputs`, in micro-batches, into `run`."""
    errors = run.errors
    items = _prepare(runner, [inputs[i] for i in rows], rows, errors)
    prepared = []
    for row, item in zip(rows, items, strict=True):
        if isinstance(item, InvalidInput):  # prepare may reject a row it cannot run
            errors[row] = _describe(item)
        elif item is not None:
            prepared.append((row, item))
            run.truncated[row] = bool(getattr(item, "truncated", False))
    limit = limit if limit is not None else BatchLimit()
    costs = [runner.cost(item) for _, item in prepared]
    planned = plan_batches(costs, max_batch_tokens, limit.max_rows)
    batches = [[prepared[b] for b in batch] for batch in planned]
    if timeout_s is None and hasattr(runner, "forward_many") and len(batches) > 1:
        _infer_in_one_call(runner, batches, run.results, errors, limit)
    elif overlap and timeout_s is None and _splits(runner) and len(batches) > 1:
        _infer_overlapped(runner, batches, run.results, errors, limit)
    else:
        for batch in batches:
            _infer_isolating(runner, batch, run.results, errors, limit, timeout_s)
    for batch in planned:
        padded = len(batch) * max(max(costs[b] for b in batch), 1)
        run.batches.append((len(batch), padded))
        if on_batch is not None:
            on_batch(len(batch), padded)


def _splits(runner: Runner) -> bool:
    return all(hasattr(runner, name) for name in ("collate", "forward", "decode"))


def _infer_in_one_call(
    runner: SplitRunner, batches: list[list], results: list, errors: list, limit: BatchLimit
) -> None:
    """A chunk's micro-batches collated here, run by a model server in one call, decoded
    here: one round trip per chunk, not per micro-batch (a proxy call costs tens of
    milliseconds, more than a small model's forward pass). A batch whose forward pass
    or decoding raised runs again through `_infer_isolating`, a call per batch."""
    try:
        answers = runner.forward_many([runner.collate([item for _, item in b]) for b in batches])
    except Exception:
        answers = [None] * len(batches)
    for batch, answer in zip(batches, answers, strict=True):
        if answer is None or isinstance(answer, BaseException):
            _infer_isolating(runner, batch, results, errors, limit)
            continue
        try:
            outputs = runner.decode([item for _, item in batch], answer)
        except Exception:
            _infer_isolating(runner, batch, results, errors, limit)
            continue
        _assign(batch, outputs, results, errors)


def _infer_overlapped(
    runner: SplitRunner, batches: list[list], results: list, errors: list, limit: BatchLimit
) -> None:
    """Runs micro-batch k's forward pass on a thread while this one collates k + 1 and
    decodes k - 1, so a model server (or a GPU) gets its next batch without waiting
    for Python. A batch whose forward pass or decoding raises runs again through
    `_infer_isolating`, which finds the failing rows."""
    from concurrent.futures import ThreadPoolExecutor

    def finish(batch: list, future) -> None:
        try:
            if future is None:
                raise RuntimeError("collate failed")
            outputs = runner.decode([item for _, item in batch], future.result())
        except Exception:
            _infer_isolating(runner, batch, results, errors, limit)
            return
        _assign(batch, outputs, results, errors)

    with ThreadPoolExecutor(1, thread_name_prefix="beam-enrich-forward") as pool:
        pending = None
        for batch in batches:
            try:
                future = pool.submit(runner.forward, runner.collate([item for _, item in batch]))
            except Exception:
                future = None
            if pending is not None:
                finish(*pending)
            pending = (batch, future)
        finish(*pending)


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
    runner: Runner,
    batch: list,
    results: list,
    errors: list,
    limit: BatchLimit,
    timeout_s: float | None = None,
) -> None:
    try:
        outputs = _infer_with_timeout(runner, [item for _, item in batch], timeout_s)
    except Exception as err:
        if len(batch) == 1 or isinstance(err, TimeoutError):
            # A timed-out batch is not split: each half could hang as long again.
            for row, _ in batch:
                errors[row] = _describe(err)
            return
        if _is_out_of_memory(err):
            _release_cuda_cache()
            limit.shrink(len(batch))
            _LOG.warning(
                "out of memory on %d rows; micro-batches now hold at most %d",
                len(batch),
                limit.max_rows,
            )
        middle = len(batch) // 2
        _infer_isolating(runner, batch[:middle], results, errors, limit, timeout_s)
        _infer_isolating(runner, batch[middle:], results, errors, limit, timeout_s)
        return
    _assign(batch, outputs, results, errors)


def _assign(batch: list, outputs: list, results: list, errors: list) -> None:
    for (row, _), output in zip(batch, outputs, strict=True):
        # A runner may fail one row of a batch that ran (an output that fails its check)
        # without failing, and re-running, the rows beside it.
        if isinstance(output, InvalidInput):
            errors[row] = _describe(output)
        else:
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


def _gpu_for_this_process(device: str) -> str:
    """`cuda`/`auto` on a machine with several GPUs: spread SDK processes over them."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= 1:
        return device
    return f"cuda:{os.getpid() % count}"


def load_task(task: TaskBinding) -> LoadedModel:
    """Loads a task's model on this machine: device and dtype decided here, with retries.

    Raises:
        Exception: whatever loading the model raises after transient errors were retried.
    """
    device = resolve_device(_gpu_for_this_process(task.device))
    dtype = resolve_dtype(task.dtype, device)
    if device == "cpu" and task.cpu_threads:
        import torch

        torch.set_num_threads(task.cpu_threads)
    from transformers.utils import logging as hf_logging

    # Worker logs are for problems; a per-load weights progress bar is noise there.
    hf_logging.disable_progress_bar()
    started = time.perf_counter()

    def load(model: ResolvedModel) -> Runner:
        with compiling(task.compile), shared_gguf_readers():
            return task.adapter.load(model, device, dtype)

    runner = None
    cached = cached_snapshot(task.model)
    if cached is not None:
        try:
            runner = load(cached)
        except Exception as err:
            # A partial snapshot (some files fetched by hand): load by id, through the hub.
            _LOG.warning(
                "task %s: the cached snapshot %s does not load (%s); loading through the hub",
                task.name,
                cached.model,
                err,
            )
    if runner is None:
        # Hub downloads can fail transiently (connection errors, HTTP 429 / 5xx).
        runner = retry_transient(lambda: load(task.model), f"load {task.model.model}")
    _LOG.info(
        "task %s: loaded %s (%s) on %s/%s in %.1fs",
        task.name,
        task.model.model,
        task.model.resolved,
        device,
        dtype,
        time.perf_counter() - started,
    )
    # On a GPU the forward pass runs asynchronously: collating and decoding the batches
    # beside it keeps the device busy. On CPU they compete for the same cores, and the
    # overlap measured slower there (benchmarks/shared_model.py).
    return LoadedModel(runner, device, dtype, overlap=device.startswith("cuda"))


def apply_task(
    task: TaskBinding,
    loaded: LoadedModel,
    table: pa.Table,
    *,
    on_batch: BatchCallback | None = None,
) -> tuple[pa.Table, TaskStats]:
    """Runs a loaded task over one table: the table with the task's columns, and its stats.

    `on_batch(rows, padded_tokens)` is called per micro-batch, after the whole table ran.
    """
    adapter = task.adapter
    columns = {name: _cells(table.column(name)) for name in adapter.read_columns()}
    started = time.perf_counter()
    inputs = adapter.row_inputs(columns)
    device, dtype = loaded.placement()
    run = loaded.run_measured(
        inputs,
        max_batch_tokens_for(task.max_batch_tokens, device, adapter.batch_tokens_factor),
        task.inference_timeout_s,
        dedup=adapter.deterministic,
    )
    seconds = time.perf_counter() - started
    if on_batch is not None:
        for rows, tokens in run.batches:
            on_batch(rows, tokens)
    table = add_task_columns(table, task.name, adapter.fields(), run.results, run.errors)
    stats = TaskStats(
        task=task.name,
        rows=len(inputs),
        failed=sum(error is not None for error in run.errors),
        truncated=sum(run.truncated),
        seconds=seconds,
        device=device,
        dtype=dtype,
        cached=run.cached,
    )
    return table, stats


def _cells(column: pa.ChunkedArray) -> list:
    """The column's cells as Python values, for the task adapters.

    Parquet does not check that text is UTF-8 (a surrogate written the Java way, bytes
    ED A0 80, passes): such a cell becomes an `InvalidInput`, so its row fails alone
    and the cell itself is written back as it was read.
    """
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        cells = []
        for chunk in column.chunks:
            for offset in range(len(chunk)):
                try:
                    cells.append(chunk[offset].as_py())
                except UnicodeDecodeError as err:
                    reason = f"text is not valid UTF-8 ({err.reason} at byte {err.start})"
                    cells.append(InvalidInput(reason))
        return cells
