"""zero-shot-classification: candidate labels ranked by an NLI model, per row.

Each row becomes one premise/hypothesis pair per candidate label, as in the
transformers pipeline; a row is one item whose pairs all run in the same forward
pass, and several rows share it, so a micro-batch holds `rows x labels` pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from pydantic import Field, StrictBool, field_validator

from transforms.models import ResolvedModel, load_pipeline, place_model
from transforms.tasks.base import (
    Encoded,
    Params,
    TaskAdapter,
    front_pipeline,
    model_max_length,
    pad_ids,
    to_model,
)

__all__ = ["ZeroShotClassification", "ZeroShotClassificationParams"]

DEFAULT_TEMPLATE = "This example is {}."


class ZeroShotClassificationParams(Params):
    """Parameters of zero-shot classification.

    Attributes:
        candidate_labels: the labels to rank (required): a non-empty list of unique,
            non-empty strings.
        multi_label: false: scores are a softmax of the entailment logits over the
            labels and sum to 1; true: each label is scored on its own (entailment
            against contradiction), as the transformers pipeline does.
        hypothesis_template: the hypothesis each label is put into; must contain `{}`.
    """

    candidate_labels: tuple[str, ...] = Field(min_length=1)
    multi_label: StrictBool = False
    hypothesis_template: str = DEFAULT_TEMPLATE

    @field_validator("candidate_labels")
    @classmethod
    def _labels_are_unique(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if any(not label.strip() for label in labels):
            raise ValueError("candidate labels must be non-empty strings")
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"candidate labels must be unique; repeated: {', '.join(repeated)}")
        return labels

    @field_validator("hypothesis_template")
    @classmethod
    def _template_has_slot(cls, template: str) -> str:
        if "{}" not in template:
            raise ValueError(
                f"hypothesis_template {template!r} must contain {{}} where the label goes, "
                f"e.g. {DEFAULT_TEMPLATE!r}"
            )
        return template


class ZeroShotClassification(TaskAdapter):
    """Adapter for `zero-shot-classification`."""

    tasks = ("zero-shot-classification",)
    params_type = ZeroShotClassificationParams
    default_model = "facebook/bart-large-mnli"

    def __init__(self, name: str, params: ZeroShotClassificationParams | None = None, **kwargs):
        if params is None:
            raise ValueError(
                f"task {name!r}: zero-shot-classification needs params.candidate_labels"
            )
        super().__init__(name, params, **kwargs)

    def fields(self) -> list[pa.Field]:
        return [
            pa.field(f"{self.name}_labels", pa.list_(pa.string())),
            pa.field(f"{self.name}_scores", pa.list_(pa.float32())),
        ]

    def load(self, model: ResolvedModel, device: str, dtype: str) -> _Runner:
        # Kept for its entailment-label lookup and its scoring (postprocess), so labels
        # and scores match a direct pipeline call; tokenizing and batching are ours.
        pipe = load_pipeline("zero-shot-classification", model, dtype)
        if pipe.entailment_id == -1:
            labels = ", ".join(pipe.model.config.label2id)
            raise ValueError(
                f"task {self.name!r}: the model's label2id has no label starting with "
                f"'entail' ({labels}); zero-shot classification needs an NLI model"
            )
        pipe.model = place_model(pipe.model, device, dtype)
        return _Runner(pipe, device, self.params)

    def load_front(self, model: ResolvedModel) -> _Runner | None:
        if model.gguf_file is not None:
            return None
        from transformers import AutoModelForSequenceClassification

        pipe = front_pipeline("zero-shot-classification", model, AutoModelForSequenceClassification)
        return _Runner(pipe, "meta", self.params)


class _Runner:
    def __init__(self, pipe, device: str, params: ZeroShotClassificationParams):
        self.pipe = pipe
        self.device = device
        self.params = params
        self.labels = list(params.candidate_labels)
        self.hypotheses = [params.hypothesis_template.format(label) for label in self.labels]
        self.max_length = model_max_length(pipe.tokenizer, pipe.model.config)
        self.use_token_types = "token_type_ids" in pipe.tokenizer.model_input_names

    def prepare(self, texts: Sequence[str]) -> list[Encoded]:
        pairs = [(text, hypothesis) for text in texts for hypothesis in self.hypotheses]
        # One tokenizer call for the whole chunk; only the premise is cut, as in the
        # pipeline, so every label's hypothesis stays whole.
        batch = self.pipe.tokenizer(
            [premise for premise, _ in pairs],
            [hypothesis for _, hypothesis in pairs],
            truncation="only_first",
            max_length=self.max_length,
            return_attention_mask=False,
            return_token_type_ids=self.use_token_types,
        )
        n = len(self.labels)
        items = []
        for row, text in enumerate(texts):
            ids = batch["input_ids"][row * n : (row + 1) * n]
            extra = (
                {"token_type_ids": batch["token_type_ids"][row * n : (row + 1) * n]}
                if self.use_token_types
                else {}
            )
            items.append(
                Encoded(
                    text=text,
                    input_ids=ids,  # one id list per label
                    extra=extra,
                    truncated=any(len(pair) >= self.max_length for pair in ids),
                )
            )
        return items

    def cost(self, item: Encoded) -> int:
        # The row's pairs are padded with the batch's longest pair, so the row costs
        # labels x its longest pair.
        return len(item.input_ids) * max(len(pair) for pair in item.input_ids)

    def infer(self, items: list[Encoded]) -> list[tuple]:
        return self.decode(items, self.forward(self.collate(items)))

    def collate(self, items: list[Encoded]) -> dict[str, np.ndarray]:
        pairs = [pair for item in items for pair in item.input_ids]
        if not self.use_token_types:
            return pad_ids(self.pipe.tokenizer, pairs)
        # Premise and hypothesis segments: BERT-style NLI models read them.
        types = [t for item in items for t in item.extra["token_type_ids"]]
        return pad_ids(self.pipe.tokenizer, pairs, types=types)

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            logits = self.pipe.model(**to_model(batch, self.device)).logits
        return {"logits": logits.float().cpu().numpy()}

    def decode(self, items: list[Encoded], outputs: dict[str, np.ndarray]) -> list[tuple]:
        import torch

        n = len(self.labels)
        logits = torch.from_numpy(outputs["logits"])
        results = []
        for row, item in enumerate(items):
            pairs = [
                {
                    "candidate_label": label,
                    "sequence": item.text,
                    "logits": logits[row * n + i : row * n + i + 1],
                }
                for i, label in enumerate(self.labels)
            ]
            ranked = self.pipe.postprocess(pairs, multi_label=self.params.multi_label)
            results.append((ranked["labels"], ranked["scores"]))
        return results
