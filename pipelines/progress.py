"""Live progress of a run, shown on the driver while the pipeline runs.

A background thread polls the folder local workers publish to (`transforms.progress`),
or, on cluster runners, the job's Beam metrics (`pipelines.runners.MetricsProgress`):
on a terminal, one tqdm bar per task (rows done of total, rows/s, ETA); elsewhere
(logs, CI, Airflow), one plain line per task every `interval_s` seconds and a final
line per task when the run succeeds.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

from tqdm import tqdm

from transforms.progress import TaskProgress, read_progress

__all__ = ["ProgressMonitor", "show_progress"]

_BAR_POLL_S = 0.5


def show_progress(
    progress_dir: str | None,
    tasks: Sequence[str],
    rows_total: int | None,
    *,
    quiet: bool = False,
    interval_s: float = 10.0,
    stream: TextIO | None = None,
    read: Callable[[], Mapping[str, TaskProgress]] | None = None,
) -> contextlib.AbstractContextManager:
    """The progress display for a run, as a context manager around running it.

    Args:
        progress_dir: the folder the workers publish to; None (remote runs) shows nothing.
        tasks: the task names, in spec order.
        rows_total: the rows each task will enrich; None when unknown (no ETA then).
        quiet: show nothing.
        interval_s: seconds between two plain lines when `stream` is not a terminal.
        stream: where to show it; default stderr.
        read: where the counts come from instead of `progress_dir` (a job's Beam
            metrics on runners whose workers cannot write to this machine's disk).
    """
    if quiet or (progress_dir is None and read is None):
        return contextlib.nullcontext()
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    bars = bool(isatty and isatty())
    return ProgressMonitor(
        progress_dir, tasks, rows_total, bars=bars, interval_s=interval_s, stream=stream, read=read
    )


class ProgressMonitor:
    """Polls a progress folder in a background thread and shows what it finds.

    Args:
        progress_dir: the folder the workers publish to (unused with `read`).
        tasks: the task names, in spec order.
        rows_total: the rows each task will enrich, or None.
        bars: tqdm bars (a terminal) instead of plain lines.
        interval_s: seconds between two plain lines.
        stream: where to write.
        read: returns the counts so far, per task; default: read `progress_dir`.
    """

    def __init__(
        self,
        progress_dir: str | None,
        tasks: Sequence[str],
        rows_total: int | None,
        *,
        bars: bool,
        interval_s: float,
        stream: TextIO,
        read: Callable[[], Mapping[str, TaskProgress]] | None = None,
    ):
        self._read = read if read is not None else functools.partial(read_progress, progress_dir)
        self._tasks = list(tasks)
        self._total = rows_total
        self._interval_s = interval_s
        self._stream = stream
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._use_bars = bars
        self._bars: dict[str, tqdm] = {}

    def __enter__(self) -> ProgressMonitor:
        self._started = time.monotonic()
        if self._use_bars:
            self._bars = {
                task: tqdm(
                    total=self._total,
                    desc=task,
                    unit="rows",
                    position=position,
                    file=self._stream,
                    dynamic_ncols=True,
                )
                for position, task in enumerate(self._tasks)
            }
        self._thread = threading.Thread(target=self._poll, name="beam-enrich-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is None:
            # Workers flush their counts when their bundles finish: this read is final.
            self._show(final=True)
        for bar in self._bars.values():
            bar.close()

    def _poll(self) -> None:
        wait_s = _BAR_POLL_S if self._bars else self._interval_s
        while not self._stop.wait(wait_s):
            self._show(final=False)

    def _show(self, *, final: bool) -> None:
        progress = self._read()
        for task in self._tasks:
            done = progress.get(task, TaskProgress())
            if self._bars:
                self._update_bar(self._bars[task], done)
            else:
                print(self._line(task, done, final=final), file=self._stream, flush=True)

    @staticmethod
    def _update_bar(bar: tqdm, done: TaskProgress) -> None:
        if done.failed:
            bar.set_postfix(failed=done.failed, refresh=False)
        bar.update(done.rows - bar.n)

    def _line(self, task: str, done: TaskProgress, *, final: bool) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = done.rows / elapsed
        count = f"{done.rows:,}" if self._total is None else f"{done.rows:,}/{self._total:,}"
        parts = [f"{count} rows"]
        if self._total and not final:
            parts[0] += f" ({100 * done.rows / self._total:.0f}%)"
        parts += [f"{done.failed:,} failed", f"{rate:,.1f} rows/s"]
        if final:
            parts.append(f"done in {tqdm.format_interval(elapsed)}")
        elif self._total is not None and rate > 0:
            eta = max(self._total - done.rows, 0) / rate
            parts.append(f"ETA {tqdm.format_interval(eta)}")
        return f"beam-enrich: progress: {task}: {', '.join(parts)}"
