"""EnrichTables: run one task over every chunk, with one model per worker process.

The Beam side only (model sharing, metrics, progress); the hot path itself is in
`transforms.inference`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.utils import shared

from transforms import worker_models
from transforms.chunks import Chunk
from transforms.inference import (
    LoadedModel,
    TaskBinding,
    _gpu_for_this_process,
    apply_task,
    load_task,
)
from transforms.model_server import with_local_front
from transforms.progress import ProgressWriter

__all__ = ["METRICS_NAMESPACE", "EnrichTables"]

#: The Beam metrics namespace; each metric's name starts with its task's name.
METRICS_NAMESPACE = "beam_enrich"


def _share_per_machine(task: TaskBinding) -> bool:
    if task.share_model != "auto":
        return task.share_model == "machine"
    if task.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


class _EnrichDoFn(beam.DoFn):
    def __init__(self, task: TaskBinding, shared_handle: shared.Shared):
        self._task = task
        self._shared = shared_handle
        self._progress: ProgressWriter | None = None
        metrics, prefix = beam.metrics.Metrics, f"{task.name}_"
        self._rows = metrics.counter(METRICS_NAMESPACE, prefix + "rows")
        self._failed = metrics.counter(METRICS_NAMESPACE, prefix + "failed_rows")
        self._batch_rows = metrics.distribution(METRICS_NAMESPACE, prefix + "batch_rows")
        self._batch_tokens = metrics.distribution(METRICS_NAMESPACE, prefix + "batch_tokens")
        self._inference_ms = metrics.distribution(METRICS_NAMESPACE, prefix + "inference_ms")

    def _load(self) -> LoadedModel:
        return load_task(self._task)

    def setup(self):
        task = self._task
        # The tag keys the model to this exact task, model and placement.
        key = repr((task.name, task.model, _gpu_for_this_process(task.device), task.dtype))
        if _share_per_machine(task):
            from apache_beam.utils.multi_process_shared import MultiProcessShared

            # One copy per GPU for all SDK processes of the machine, as RunInference
            # does for large models; calls go through a proxy, one per chunk.
            tag = "beam-enrich-" + hashlib.sha256(key.encode()).hexdigest()[:24]
            self._loaded = MultiProcessShared(self._load, tag=tag, always_proxy=True).acquire()
        else:
            # One model per process, shared by its threads and kept across teardown and
            # setup: Beam's DaskRunner calls both around every partition. The Shared
            # handle's key, made once per built pipeline, keeps each job's models apart
            # (a model folder may change between two jobs of one process).
            job_key = f"{self._shared._key}:{key}"
            self._loaded, loaded = worker_models.acquire(job_key, self._load)
            # Counted in the first bundle: runners that set DoFns up outside any bundle
            # (FnApiRunner, portable workers) drop metrics updated in setup().
            self._unreported_loads = int(loaded)
        if task.progress_dir is not None:
            self._progress = ProgressWriter.for_task(task.progress_dir, task.name)

    def start_bundle(self):
        if getattr(self, "_unreported_loads", 0):
            name = f"{self._task.name}_model_loads"
            beam.metrics.Metrics.counter(METRICS_NAMESPACE, name).inc(self._unreported_loads)
            self._unreported_loads = 0

    def _record_batch(self, rows: int, padded_tokens: int) -> None:
        self._batch_rows.update(rows)
        self._batch_tokens.update(padded_tokens)

    def process(self, chunk: Chunk) -> Iterator[Chunk]:
        # A model served by another process (`share_model: machine`) gets forward passes
        # only: this process tokenizes and decodes.
        model = with_local_front(self._task, self._loaded)
        table, stats = apply_task(self._task, model, chunk.table, on_batch=self._record_batch)
        self._rows.inc(stats.rows)
        self._failed.inc(stats.failed)
        self._inference_ms.update(int(stats.seconds * 1000))
        if self._progress is not None:
            self._progress.add(stats.rows, stats.failed)
        yield dataclasses.replace(chunk, table=table, stats=(*chunk.stats, stats))

    def finish_bundle(self):
        # The throttled writes may have skipped the last chunks: publish the final counts.
        if self._progress is not None:
            self._progress.flush()


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
