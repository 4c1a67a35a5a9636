"""sentiment-analysis / text-classification: the best label (or the top k) and scores per row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, StrictInt

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

__all__ = ["TextClassification", "TextClassificationParams"]


class TextClassificationParams(Params):
    """Parameters of text classification.

    Attributes:
        function_to_apply: how logits become scores; `default` follows the model's
            config, as the transformers pipeline does (sigmoid for one label or a
            multi-label model, softmax otherwise).
        top_k: how many labels to keep per row, best first; null keeps every label.
            With 1 the columns are `N_label` / `N_score`; otherwise `N_labels` /
            `N_scores` lists (for multi-label models such as toxicity classifiers).
    """

    function_to_apply: Literal["default", "softmax", "sigmoid", "none"] = "default"
    top_k: Annotated[StrictInt, Field(ge=1)] | None = 1


class TextClassification(TaskAdapter):
    """Adapter for `sentiment-analysis` and `text-classification`."""

    tasks = ("sentiment-analysis", "text-classification")
    params_type = TextClassificationParams
    default_model = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"

    def fields(self) -> list[pa.Field]:
        if self.params.top_k == 1:
            return [
                pa.field(f"{self.name}_label", pa.string()),
                pa.field(f"{self.name}_score", pa.float32()),
            ]
        return [
            pa.field(f"{self.name}_labels", pa.list_(pa.string())),
            pa.field(f"{self.name}_scores", pa.list_(pa.float32())),
        ]

    def load(self, model: ResolvedModel, device: str, dtype: str) -> _Runner:
        # The pipeline object is kept for its post-processing (label names, the
        # function-to-apply rules), so scores match a direct pipeline call exactly;
        # tokenizing and the forward pass are ours, batched and length-sorted.
        pipe = load_pipeline("text-classification", model, dtype)
        pipe.model = place_model(pipe.model, device, dtype)
        return _Runner(pipe, device, self.params)

    def load_front(self, model: ResolvedModel) -> _Runner | None:
        if model.gguf_file is not None:
            return None
        from transformers import AutoModelForSequenceClassification

        pipe = front_pipeline("text-classification", model, AutoModelForSequenceClassification)
        return _Runner(pipe, "meta", self.params)


class _Runner:
    def __init__(self, pipe, device: str, params: TextClassificationParams):
        self.pipe = pipe
        self.device = device
        self.max_length = model_max_length(pipe.tokenizer, pipe.model.config)
        from transformers.pipelines.text_classification import ClassificationFunction

        function = params.function_to_apply
        self.postprocess_params = (
            {}
            if function == "default"
            else {"function_to_apply": ClassificationFunction[function.upper()]}
        )
        self.top_k = params.top_k

    def prepare(self, texts: Sequence[str]) -> list[Encoded]:
        return encode_texts(self.pipe.tokenizer, texts, self.max_length)

    def cost(self, item: Encoded) -> int:
        return len(item.input_ids)

    def infer(self, items: list[Encoded]) -> list[tuple]:
        return self.decode(items, self.forward(self.collate(items)))

    def collate(self, items: list[Encoded]) -> dict[str, np.ndarray]:
        return pad_ids(self.pipe.tokenizer, [item.input_ids for item in items])

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            logits = self.pipe.model(**to_model(batch, self.device)).logits
        return {"logits": logits.float().cpu().numpy()}

    def decode(self, items: list[Encoded], outputs: dict[str, np.ndarray]) -> list[tuple]:
        import torch

        logits = torch.from_numpy(outputs["logits"])
        results = []
        for row in range(len(items)):
            one = {"logits": logits[row : row + 1]}
            if self.top_k == 1:
                best = self.pipe.postprocess(one, top_k=1, **self.postprocess_params)
                results.append((best["label"], best["score"]))
            else:
                # `_legacy=False` is what the pipeline passes when a caller gives top_k:
                # every label scored, sorted best first, cut to top_k (None keeps all).
                ranked = self.pipe.postprocess(
                    one, top_k=self.top_k, _legacy=False, **self.postprocess_params
                )
                results.append(([r["label"] for r in ranked], [r["score"] for r in ranked]))
        return results
