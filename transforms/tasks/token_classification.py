"""ner / token-classification: entity spans with character offsets into the input."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from transforms.models import ResolvedModel, load_pipeline, place_model
from transforms.tasks.base import (
    Encoded,
    Params,
    TaskAdapter,
    encode_texts,
    front_pipeline,
    model_max_length,
    pad_ids,
    to_model,
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
        stride: with `on_long_input: chunk`, tokens shared by consecutive windows, so an
            entity cut by one window's edge is whole in the next.
    """

    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "simple"
    ignore_labels: tuple[str, ...] = ("O",)
    stride: int = Field(64, ge=0)


class TokenClassification(TaskAdapter):
    """Adapter for `ner` and `token-classification`."""

    tasks = ("ner", "token-classification")
    params_type = TokenClassificationParams
    default_model = "dslim/bert-base-NER"
    supports_chunking = True

    def __init__(self, name: str, params: TokenClassificationParams | None = None, **kwargs):
        super().__init__(name, params, **kwargs)
        if self.on_long_input == "chunk" and self.params.aggregation_strategy == "none":
            raise ValueError(
                "on_long_input 'chunk' merges entities across windows, which needs an "
                "aggregation_strategy other than 'none'"
            )

    def fields(self) -> list[pa.Field]:
        return [pa.field(self.name, pa.list_(ENTITY_TYPE))]

    def load(self, model: ResolvedModel, device: str, dtype: str) -> _Runner:
        # Kept for its entity aggregation, so entities match a direct pipeline call.
        pipe = load_pipeline("token-classification", model, dtype)
        if not pipe.tokenizer.is_fast:
            raise ValueError(
                f"task {self.name!r}: character offsets need a fast tokenizer "
                "(tokenizer.json); this model only has a slow one"
            )
        pipe.model = place_model(pipe.model, device, dtype)
        return _Runner(pipe, device, self.params, chunk=self.on_long_input == "chunk")

    def load_front(self, model: ResolvedModel) -> _Runner | None:
        if model.gguf_file is not None:
            return None
        from transformers import AutoModelForTokenClassification

        pipe = front_pipeline("token-classification", model, AutoModelForTokenClassification)
        if not pipe.tokenizer.is_fast:
            return None  # load() names the problem
        return _Runner(pipe, "meta", self.params, chunk=self.on_long_input == "chunk")


# Per-token tokenizer outputs the pipeline's entity aggregation needs.
_PER_TOKEN = ("offset_mapping", "special_tokens_mask")


@dataclasses.dataclass(frozen=True)
class _Row:
    text: str
    windows: list[Encoded]  # one, or several overlapping ones with on_long_input: chunk
    truncated: bool


class _Runner:
    def __init__(self, pipe, device: str, params: TokenClassificationParams, chunk: bool):
        from transformers.pipelines.token_classification import AggregationStrategy

        self.pipe = pipe
        self.device = device
        self.max_length = model_max_length(pipe.tokenizer, pipe.model.config)
        self.strategy = AggregationStrategy[params.aggregation_strategy.upper()]
        self.ignore_labels = list(params.ignore_labels)
        self.stride = params.stride if chunk else None
        if self.stride is not None and self.stride >= self.max_length - 2:
            raise ValueError(f"stride {self.stride} must be below the window ({self.max_length})")

    def prepare(self, texts: Sequence[str]) -> list[_Row]:
        kwargs = {"return_offsets_mapping": True, "return_special_tokens_mask": True}
        if self.stride is None:
            return [
                _Row(item.text, [item], item.truncated)
                for item in encode_texts(self.pipe.tokenizer, texts, self.max_length, **kwargs)
            ]
        # Windows as the transformers pipeline makes them with `stride`: overlapping
        # by `stride` tokens, covering the whole text.
        batch = self.pipe.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            stride=self.stride,
            return_overflowing_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            **kwargs,
        )
        windows: list[list[Encoded]] = [[] for _ in texts]
        for i, row in enumerate(batch["overflow_to_sample_mapping"]):
            windows[row].append(
                Encoded(
                    text=texts[row],
                    input_ids=batch["input_ids"][i],
                    extra={key: batch[key][i] for key in _PER_TOKEN},
                )
            )
        return [_Row(text, parts, False) for text, parts in zip(texts, windows, strict=True)]

    def cost(self, item: _Row) -> int:
        return len(item.windows) * max(len(w.input_ids) for w in item.windows)

    def infer(self, items: list[_Row]) -> list[tuple]:
        return self.decode(items, self.forward(self.collate(items)))

    def collate(self, items: list[_Row]) -> dict[str, np.ndarray]:
        windows = [window.input_ids for item in items for window in item.windows]
        return pad_ids(self.pipe.tokenizer, windows)

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            logits = self.pipe.model(**to_model(batch, self.device)).logits
        return {"logits": logits.float().cpu().numpy()}

    def decode(self, items: list[_Row], outputs: dict[str, np.ndarray]) -> list[tuple]:
        import torch

        logits = torch.from_numpy(outputs["logits"])
        right = self.pipe.tokenizer.padding_side != "left"
        width = logits.shape[1]
        results = []
        position = 0
        for item in items:
            windows = []
            for window in item.windows:
                length = len(window.input_ids)
                span = slice(0, length) if right else slice(width - length, width)
                windows.append(
                    {
                        "logits": logits[position : position + 1, span],
                        "input_ids": torch.tensor([window.input_ids]),
                        "offset_mapping": torch.tensor([window.extra["offset_mapping"]]),
                        "special_tokens_mask": torch.tensor([window.extra["special_tokens_mask"]]),
                        "sentence": item.text,
                        "is_last": window is item.windows[-1],
                    }
                )
                position += 1
            # The pipeline's own aggregation, including its merge of entities that
            # overlapping windows both found.
            entities = self.pipe.postprocess(
                windows, aggregation_strategy=self.strategy, ignore_labels=self.ignore_labels
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
