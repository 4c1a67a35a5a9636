"""Live progress of a local run: rows done per task, published by workers as tiny files.

Beam metrics can be read only after a run, and local runners run DoFns in other
threads or processes than the driver. So on local runs each worker process publishes,
per task, one JSON file `{"task", "rows", "failed"}` in a folder the driver names and
polls (`read_progress`). Each file is replaced atomically (temporary file + rename), so
a reader never sees half of one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator

__all__ = ["ProgressWriter", "TaskProgress", "read_progress"]

_LOG = logging.getLogger(__name__)
_SUFFIX = ".progress.json"


@dataclasses.dataclass(frozen=True)
class TaskProgress:
    """Rows one task has finished, over every worker process."""

    rows: int = 0
    failed: int = 0


class ProgressWriter:
    """Counts one task's finished rows in this process and publishes them to a folder.

    Every DoFn instance (thread) of a process shares one writer per folder and task:
    get it with `for_task`. Writes happen at most once per `min_interval_s`, plus on
    `flush`; a write that fails is logged once and never fails the run.

    Args:
        progress_dir: the folder the driver polls.
        task: the task's name.
        min_interval_s: the shortest time between two writes of `add`.
    """

    _shared: dict[tuple[int, str, str], ProgressWriter] = {}
    _shared_lock = threading.Lock()

    def __init__(self, progress_dir: str, task: str, *, min_interval_s: float = 1.0):
        self._dir = progress_dir
        self._task = task
        self._min_interval_s = min_interval_s
        # The pid tells processes apart; the random part, processes that reuse a pid.
        self._path = os.path.join(
            progress_dir, f"{task}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
        )
        self._lock = threading.Lock()
        self._rows = 0
        self._failed = 0
        self._written: tuple[int, int] | None = None
        # None, not 0.0: `time.monotonic()` counts from boot, so on a machine booted less
        # than `min_interval_s` ago a 0.0 start would hold back the first count.
        self._written_at: float | None = None
        self._broken = False

    @classmethod
    def for_task(cls, progress_dir: str, task: str) -> ProgressWriter:
        """This process's writer for `task` in `progress_dir`, made on first use."""
        # Keyed by pid too: a forked child must not go on counting in its parent's file.
        key = (os.getpid(), progress_dir, task)
        with cls._shared_lock:
            writer = cls._shared.get(key)
            if writer is None:
                writer = cls._shared[key] = cls(progress_dir, task)
            return writer

    def add(self, rows: int, failed: int) -> None:
        """Counts finished rows (`failed` of them with an error); publishes them if due."""
        with self._lock:
            self._rows += rows
            self._failed += failed
            due = self._written_at is None or (
                time.monotonic() - self._written_at >= self._min_interval_s
            )
            if due:
                self._write()

    def flush(self) -> None:
        """Publishes the counts now, if they changed since the last write."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        counts = (self._rows, self._failed)
        if self._broken or counts == self._written:
            return
        record = {"task": self._task, "rows": self._rows, "failed": self._failed}
        temporary = self._path + ".tmp"
        try:
            os.makedirs(self._dir, exist_ok=True)
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            os.replace(temporary, self._path)
        except OSError as err:
            # Progress is a convenience: the run goes on without it.
            self._broken = True
            _LOG.warning("cannot publish progress to %s (%s); progress stops", self._dir, err)
            return
        self._written = counts
        self._written_at = time.monotonic()


def read_progress(progress_dir: str) -> dict[str, TaskProgress]:
    """Task name -> rows finished, summed over every process's file in `progress_dir`.

    A missing folder or a file that cannot be read counts as no progress yet.
    """
    totals: dict[str, TaskProgress] = {}
    for record in _records(progress_dir):
        seen = totals.get(record["task"], TaskProgress())
        totals[record["task"]] = TaskProgress(
            rows=seen.rows + int(record["rows"]), failed=seen.failed + int(record["failed"])
        )
    return totals


def _records(progress_dir: str) -> Iterator[dict]:
    try:
        names = os.listdir(progress_dir)
    except OSError:
        return
    for name in names:
        if not name.endswith(_SUFFIX):
            continue
        try:
            with open(os.path.join(progress_dir, name), encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            continue  # removed meanwhile (the run ended), or not ours
        if isinstance(record, dict) and {"task", "rows", "failed"} <= record.keys():
            yield record
