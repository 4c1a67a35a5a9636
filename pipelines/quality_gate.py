"""The ETL quality gate: a run whose tasks fail too many rows exits 3, its output published.

A scheduled job (cron, Airflow) sees per-row failures only in the manifest; the gate turns
"too many of them" into a failed run. Limits come from the spec (`max_failed_rows`,
`max_failed_fraction`, for the run and per task) and the command line, and the run still
publishes its complete output and manifest, so the bad rows can be looked at.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pipelines.spec import JobSpec

__all__ = ["LIMITS", "QualityGateError", "check_gate", "evaluate_gate", "gate_limits"]

#: The limits, as named in the spec, on the command line and in the manifest.
LIMITS = ("max_failed_rows", "max_failed_fraction")


class TaskCount(Protocol):
    """What the gate reads of a task: the manifest's `TaskRecord` has it."""

    name: str
    rows: int
    failed: int


class QualityGateError(Exception):
    """A run published its complete output, but a task failed more rows than allowed.

    Attributes:
        gate: the manifest's `quality_gate` record.
    """

    def __init__(self, gate: dict, output: str):
        self.gate = gate
        by_task: dict[str, list[dict]] = {}
        for entry in gate["exceeded"]:
            by_task.setdefault(entry["task"], []).append(entry)
        crossed = "; ".join(_describe(entries) for entries in by_task.values())
        super().__init__(
            f"quality gate failed: {crossed}; the output is complete in {output} and its "
            "manifest records the gate (quality_gate)"
        )


def gate_limits(
    spec: JobSpec,
    *,
    max_failed_rows: int | None = None,
    max_failed_fraction: float | None = None,
) -> dict:
    """Each task's limits: its own, else the run's; command-line values replace the spec's
    run-level ones.

    Args:
        spec: the validated job spec.
        max_failed_rows: `--max-failed-rows`, or None.
        max_failed_fraction: `--max-failed-fraction`, or None.

    Returns:
        {"command_line": {limit: value}, "tasks": {task name: {limit: value or None}}}, as
        the manifest records it.
    """
    command_line = {"max_failed_rows": max_failed_rows, "max_failed_fraction": max_failed_fraction}
    run_level = {
        limit: command_line[limit] if command_line[limit] is not None else getattr(spec, limit)
        for limit in LIMITS
    }
    tasks = {}
    for task in spec.tasks:
        own = {limit: getattr(task, limit) for limit in LIMITS}
        tasks[task.name] = {
            limit: own[limit] if own[limit] is not None else run_level[limit] for limit in LIMITS
        }
    return {"command_line": command_line, "tasks": tasks}


def evaluate_gate(limits: dict, tasks: Sequence[TaskCount]) -> dict:
    """The gate's record for the manifest, from `gate_limits` and the per-task counts.

    Args:
        limits: what `gate_limits` returned.
        tasks: the manifest's tasks (`name`, `rows` and `failed` are read).

    Returns:
        {"limits", "command_line", "passed", "exceeded"}: `exceeded` lists each limit a
        task crossed, with the task's rows and failed rows.
    """
    exceeded = []
    for task in tasks:
        allowed = limits.get("tasks", {}).get(task.name, {})
        rows, failed = task.rows, task.failed
        fraction = failed / rows if rows else 0.0
        crossed = {
            "max_failed_rows": failed,
            "max_failed_fraction": fraction,
        }
        for limit in LIMITS:
            if allowed.get(limit) is not None and crossed[limit] > allowed[limit]:
                exceeded.append(
                    {
                        "task": task.name,
                        "rows": rows,
                        "failed": failed,
                        "failed_fraction": round(fraction, 6),
                        "limit": limit,
                        "allowed": allowed[limit],
                    }
                )
    return {
        "limits": limits.get("tasks", {}),
        "command_line": limits.get("command_line", {}),
        "passed": not exceeded,
        "exceeded": exceeded,
    }


def check_gate(recorded: dict, tasks: Sequence[TaskCount], output: str) -> None:
    """Evaluates the gate on a published run's manifest, from its per-task counts.

    Args:
        recorded: the manifest's `quality_gate` record.
        tasks: the manifest's tasks.
        output: the output folder, for the message.

    Raises:
        QualityGateError: a task failed more rows than its limits allow.
    """
    gate = evaluate_gate(
        {"tasks": recorded.get("limits", {}), "command_line": recorded.get("command_line", {})},
        tasks,
    )
    if not gate["passed"]:
        raise QualityGateError(gate, output)


def _describe(entries: list[dict]) -> str:
    """One task's crossed limits: "task 's' failed 2 of 4 rows (50.0%), above …"."""
    first = entries[0]
    limits = " and ".join(f"{entry['limit']} {entry['allowed']}" for entry in entries)
    return (
        f"task {first['task']!r} failed {first['failed']} of {first['rows']} rows "
        f"({first['failed_fraction']:.1%}), above {limits}"
    )
