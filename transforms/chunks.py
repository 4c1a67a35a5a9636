"""The element that flows through the pipeline: a table chunk and where it came from."""

from __future__ import annotations

import dataclasses

import pyarrow as pa

__all__ = ["ERRORS_COLUMN", "ERRORS_TYPE", "Chunk", "TaskCounts", "TaskStats"]

#: Per-row failures, added to every output: one entry per failed task.
ERRORS_COLUMN = "enrich_errors"
ERRORS_TYPE = pa.list_(pa.struct([pa.field("task", pa.string()), pa.field("error", pa.string())]))


@dataclasses.dataclass(frozen=True)
class TaskCounts:
    """What one task did to some rows; `+` sums them over chunks, parts and a run."""

    rows: int = 0
    failed: int = 0
    truncated: int = 0
    seconds: float = 0.0
    #: Rows whose result was copied from an equal input's instead of computed.
    cached: int = 0

    def __add__(self, other: TaskCounts) -> TaskCounts:
        if not isinstance(other, TaskCounts):
            return NotImplemented
        return TaskCounts(
            self.rows + other.rows,
            self.failed + other.failed,
            self.truncated + other.truncated,
            self.seconds + other.seconds,
            self.cached + other.cached,
        )


@dataclasses.dataclass(frozen=True)
class TaskStats:
    """What one task did to one chunk, and where it ran; summed per task for the manifest."""

    task: str
    rows: int
    failed: int
    truncated: int
    seconds: float
    device: str
    dtype: str
    cached: int = 0

    @property
    def counts(self) -> TaskCounts:
        """The counts alone, to add up."""
        return TaskCounts(self.rows, self.failed, self.truncated, self.seconds, self.cached)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """About `rows_per_chunk` consecutive rows of one input file.

    Attributes:
        file_index: position of the source file in the run's sorted input list.
        source: the input file's path or URI.
        index: orders the chunks of its file (the reader uses the first row).
        first_row: the file row number (0-based, header excluded) of the first row.
        table: the rows: input columns untouched, task columns appended as tasks run.
        rows_read: rows as read from the file, kept apart from `table` so the
            manifest's in/out counts are two independent numbers.
        stats: one entry per task that has run over this chunk.
        item: the stem of the work item the chunk belongs to (see `transforms.staging`);
            its chunks are written to that item's part.
        item_end: the item's last chunk: its part can be closed.
    """

    file_index: int
    source: str
    index: int
    first_row: int
    table: pa.Table
    rows_read: int
    stats: tuple[TaskStats, ...] = ()
    item: str = ""
    item_end: bool = True

    @property
    def position(self) -> tuple[int, int]:
        """Sort key that puts chunks back in input order."""
        return (self.file_index, self.index)
