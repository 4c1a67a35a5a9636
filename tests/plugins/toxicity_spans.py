"""An example plugin task: entity spans above a score threshold, and their count.

A spec uses it as `task: tests.plugins.toxicity_spans:ToxicitySpans`, or through an
entry point in the `beam_enrich.tasks` group. It reuses the built-in token-classification
family and only changes its post-processing and its columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from pydantic import Field

from transforms.models import ResolvedModel
from transforms.tasks import Runner
from transforms.tasks.token_classification import TokenClassification, TokenClassificationParams

__all__ = ["ToxicitySpans", "ToxicitySpansParams"]


class ToxicitySpansParams(TokenClassificationParams):
    """Token-classification parameters and the score a span needs to be kept.

    Attributes:
        min_score: spans scoring below this are dropped.
    """

    min_score: float = Field(0.5, ge=0.0, le=1.0)


class ToxicitySpans(TokenClassification):
    """Spans scoring at least `min_score` (`N`), and how many there are (`N_count`)."""

    tasks = ("toxicity-spans",)
    params_type = ToxicitySpansParams
    default_model = ""  # no well-known checkpoint: a spec must name its model

    def fields(self) -> list[pa.Field]:
        return [*super().fields(), pa.field(f"{self.name}_count", pa.int32())]

    def load(self, model: ResolvedModel, device: str, dtype: str) -> Runner:
        return _ConfidentSpans(super().load(model, device, dtype), self.params.min_score)


class _ConfidentSpans:
    """The token-classification runner with the weak spans filtered out of its output."""

    def __init__(self, runner: Runner, min_score: float):
        self.runner = runner
        self.min_score = min_score

    def prepare(self, inputs: Sequence[Any]) -> list[Any]:
        return self.runner.prepare(inputs)

    def cost(self, item: Any) -> int:
        return self.runner.cost(item)

    def infer(self, items: list[Any]) -> list[tuple]:
        results = []
        for (spans,) in self.runner.infer(items):
            kept = [span for span in spans if span["score"] >= self.min_score]
            results.append((kept, len(kept)))
        return results
