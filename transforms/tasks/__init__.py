"""Task adapters, one module per task family, and the registry that names them."""

from __future__ import annotations

from transforms.tasks.base import Params, Runner, TaskAdapter
from transforms.tasks.feature_extraction import FeatureExtraction
from transforms.tasks.text_classification import TextClassification
from transforms.tasks.token_classification import TokenClassification

__all__ = ["ADAPTERS", "Params", "Runner", "TaskAdapter", "adapter_for"]

#: Every task name a spec may use, mapped to the adapter class that runs it.
ADAPTERS: dict[str, type[TaskAdapter]] = {
    task: adapter
    for adapter in (TextClassification, TokenClassification, FeatureExtraction)
    for task in adapter.tasks
}


def adapter_for(task: str) -> type[TaskAdapter]:
    """The adapter class for a task name.

    Raises:
        ValueError: the task is not one of `ADAPTERS`.
    """
    try:
        return ADAPTERS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(ADAPTERS)}") from None
