"""ner / token-classification: entity spans with character offsets into the input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pyarrow as pa

from transforms.models import ResolvedModel, load_kwargs, place_model
from transforms.tasks.base import (
    Encoded,
    Params,
    TaskAdapter,
    encode_texts,
    model_max_length,
    pad_batch,
)

__all__ = ["ENTITY_TYPE", "TokenClassification", "TokenClassificationParams"]

ENTITY_TYPE = pa.struct(
    [
        pa.field("entity_group", pa.string()),
        pa.field("word", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("start", pa.int32()),
        pa.field("end", pa.int32()),
    ]
)


class TokenClassificationParams(Params):
    """Parameters of token classification.

    Attributes:
        aggregation_strategy: how sub-word predictions merge into entities, as in the
            transformers pipeline (`none` keeps one entry per token).
        ignore_labels: labels that are not entities.
    """

    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "simple"
    ignore_labels: tuple[str, ...] = ("O",)


class TokenClassification(TaskAdapter):
    """Adapter for `ner` and `token-classification`."""

    tasks = ("ner", "token-classification")
    params_type = TokenClassificationParams
    default_model = "dslim/bert-base-NER"

    def fields(self) -> list[pa.Field]:
        return [pa.field(self.name, pa.list_(ENTITY_TYPE))]

    def load(self, model: ResolvedModel, device: str, dtype: str) -> _Runner:
        from transformers import pipeline

        # Kept for its entity aggregation, so entities match a direct pipeline call.
        pipe = pipeline(
            "token-classification", model=model.model, device="cpu", **load_kwargs(model, dtype)
        )
        if not pipe.tokenizer.is_fast:
            raise ValueError(
                f"task {self.name!r}: character offsets need a fast tokenizer "
                "(tokenizer.json); this model only has a slow one"
            )
        pipe.model = place_model(pipe.model, device, dtype)
        return _Runner(pipe, device, self.params)


class _Runner:
    def __init__(self, pipe, device: str, params: TokenClassificationParams):
        from transformers.pipelines.token_classification import AggregationStrategy

        self.pipe = pipe
        self.device = device
        self.max_length = model_max_length(pipe.tokenizer, pipe.model.config)
        self.strategy = AggregationStrategy[params.aggregation_strategy.upper()]
        self.ignore_labels = list(params.ignore_labels)

    def prepare(self, texts: Sequence[str]) -> list[Encoded]:
        return encode_texts(
            self.pipe.tokenizer,
            texts,
            self.max_length,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )

    def cost(self, item: Encoded) -> int:
        return len(item.input_ids)

    def infer(self, items: list[Encoded]) -> list[tuple]:
        import torch

        with torch.inference_mode():
            logits = self.pipe.model(**pad_batch(self.pipe.tokenizer, items, self.device)).logits
        logits = logits.float().cpu()
        results = []
        for row, item in enumerate(items):
            length = len(item.input_ids)
            outputs = {
                "logits": logits[row : row + 1, :length],
                "input_ids": torch.tensor([item.input_ids]),
                "offset_mapping": torch.tensor([item.extra["offset_mapping"]]),
                "special_tokens_mask": torch.tensor([item.extra["special_tokens_mask"]]),
                "sentence": item.text,
                "is_last": True,
            }
            entities = self.pipe.postprocess(
                [outputs], aggregation_strategy=self.strategy, ignore_labels=self.ignore_labels
            )
            results.append(([_entity(e) for e in entities],))
        return results


def _entity(entity: dict) -> dict:
    # With aggregation `none` the pipeline names the label `entity`; one column type
    # for every strategy keeps the output schema fixed.
    return {
        "entity_group": entity.get("entity_group", entity.get("entity")),
        "word": entity["word"],
        "score": float(entity["score"]),
        "start": entity["start"],
        "end": entity["end"],
    }
