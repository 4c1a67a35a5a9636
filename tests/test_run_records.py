"""The run's typed records: per-task counts add up, staged markers read back, records are frozen."""

from __future__ import annotations

import json

import pydantic
import pytest

from pipelines.manifest import Batching, TaskDescription
from transforms.chunks import TaskCounts, TaskStats
from transforms.staging import PartInfo


def test_task_counts_add_field_by_field():
    chunks = [
        TaskStats("s", rows=8, failed=1, truncated=0, seconds=0.5, device="cpu", dtype="fp32"),
        TaskStats("s", rows=3, failed=0, truncated=2, seconds=0.25, device="cpu", dtype="fp32"),
    ]
    total = sum((chunk.counts for chunk in chunks), TaskCounts())
    assert total == TaskCounts(rows=11, failed=1, truncated=2, seconds=0.75)
    assert TaskCounts() + total == total


def _part(stats: dict) -> PartInfo:
    return PartInfo(
        path="p.parquet",
        errors_path=None,
        first=(0, 0),
        rows=11,
        rows_read=11,
        failed={"s": 1},
        stats=stats,
        devices={"s": ["cpu/fp32"]},
    )


def test_a_part_marker_reads_back_its_counts():
    part = _part({"s": TaskCounts(11, 1, 2, 0.75)})
    marker = part.to_json()
    assert json.loads(marker)["stats"] == {
        "s": {"rows": 11, "failed": 1, "truncated": 2, "seconds": 0.75, "cached": 0}
    }
    assert PartInfo.from_json(marker) == part
    # A marker an earlier version staged holds the counts as a list, in this order.
    earlier = json.loads(marker)
    earlier["stats"] = {"s": [11, 1, 2, 0.75]}
    assert PartInfo.from_json(json.dumps(earlier)) == part


def test_a_task_description_is_frozen_and_refuses_unknown_keys():
    fields = dict(
        name="s",
        task="sentiment-analysis",
        model="m",
        model_source="local",
        requested_revision=None,
        resolved_revision="sha256:00",
        trust_remote_code=False,
        allow_pickle_weights=False,
        inference_timeout_s=None,
        input_columns=["text"],
        on_long_input="truncate",
        parameters={},
        device="auto",
        dtype="auto",
        batching=Batching(
            max_batch_tokens=None, max_batch_tokens_default={"cpu": 1}, rows_per_chunk=8
        ),
        columns=["s_label", "s_score"],
    )
    task = TaskDescription(**fields)
    assert task.columns == ["s_label", "s_score"]
    with pytest.raises(pydantic.ValidationError):
        task.name = "t"
    with pytest.raises(pydantic.ValidationError, match="colums"):
        TaskDescription(**fields, colums=[])
