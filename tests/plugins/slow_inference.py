"""A test plugin task: text classification whose micro-batches holding "SLOW" overrun.

Such a batch keeps calling torch until the interpreter starts shutting down, then runs a
little longer: the shape of a batch given up on by `inference_timeout_s` that is still
inside torch when the process exits. Used as `task:
tests.plugins.slow_inference:SlowInference`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from transforms.models import ResolvedModel
from transforms.tasks import Runner
from transforms.tasks.base import InvalidInput
from transforms.tasks.text_classification import TextClassification

__all__ = ["SlowInference"]

#: Matrix products run after the main thread ended: longer than the interpreter's
#: shutdown takes up to the point where a thread returning from torch is stopped.
_AFTER_EXIT_PRODUCTS = 400


class SlowInference(TextClassification):
    """Text classification; a micro-batch with a "SLOW" row runs on past the main thread."""

    tasks = ("slow-inference",)

    def load(self, model: ResolvedModel, device: str, dtype: str) -> Runner:
        return _SlowRunner(super().load(model, device, dtype))


class _SlowRunner:
    def __init__(self, runner: Runner):
        self.runner = runner

    def prepare(self, inputs: Sequence[Any]) -> list[Any]:
        prepared = self.runner.prepare(inputs)
        return [
            item if isinstance(item, InvalidInput) else (item, "SLOW" in text)
            for item, text in zip(prepared, inputs, strict=True)
        ]

    def cost(self, item: Any) -> int:
        return self.runner.cost(item[0])

    def infer(self, items: list[Any]) -> list[tuple]:
        if any(slow for _, slow in items):
            _overrun()
        return self.runner.infer([item for item, _ in items])


def _overrun() -> None:
    import torch

    matrix = torch.rand(256, 256)
    while threading.main_thread().is_alive():
        torch.mm(matrix, matrix)
    for _ in range(_AFTER_EXIT_PRODUCTS):
        torch.mm(matrix, matrix)
