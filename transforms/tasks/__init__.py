"""Task adapters, one module per task family, and the registry that names them."""

from __future__ import annotations

from transforms.tasks.base import Params, Runner, TaskAdapter
from transforms.tasks.feature_extraction import FeatureExtraction
from transforms.tasks.fill_mask import FillMask
from transforms.tasks.question_answering import QuestionAnswering
from transforms.tasks.seq2seq import Summarization, Translation
from transforms.tasks.text_classification import TextClassification
from transforms.tasks.text_generation import TextGeneration
from transforms.tasks.token_classification import TokenClassification
from transforms.tasks.zero_shot import ZeroShotClassification

__all__ = ["ADAPTERS", "Params", "Runner", "TaskAdapter", "adapter_for"]

#: Every task name a spec may use, mapped to the adapter class that runs it.
ADAPTERS: dict[str, type[TaskAdapter]] = {
    task: adapter
    for adapter in (
        TextClassification,
        TokenClassification,
        FeatureExtraction,
        ZeroShotClassification,
        FillMask,
        TextGeneration,
        QuestionAnswering,
        Summarization,
        Translation,
    )
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
