"""feature-extraction: one pooled embedding vector per row."""

from __future__ import annotations

from collections.abc import Sequence

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

__all__ = ["FeatureExtraction", "FeatureExtractionParams"]


class FeatureExtractionParams(Params):
    """Parameters of feature extraction.

    Attributes:
        normalize: scale each vector to unit length (for cosine similarity by dot product).
    """

    normalize: bool = False


class FeatureExtraction(TaskAdapter):
    """Adapter for `feature-extraction`: the last hidden state, mean-pooled over the mask."""

    tasks = ("feature-extraction",)
    params_type = FeatureExtractionParams
    default_model = "sentence-transformers/all-MiniLM-L6-v2"

    def fields(self) -> list[pa.Field]:
        return [pa.field(self.name, pa.list_(pa.float32()))]

    def load(self, model: ResolvedModel, device: str, dtype: str) -> _Runner:
        from transformers import AutoModel, AutoTokenizer

        kwargs = load_kwargs(model, dtype)
        tokenizer = AutoTokenizer.from_pretrained(
            model.model, revision=kwargs.get("revision"), trust_remote_code=model.trust_remote_code
        )
        network = place_model(AutoModel.from_pretrained(model.model, **kwargs), device, dtype)
        return _Runner(tokenizer, network, device, self.params)


class _Runner:
    def __init__(self, tokenizer, model, device: str, params: FeatureExtractionParams):
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.normalize = params.normalize
        self.max_length = model_max_length(tokenizer, model.config)

    def prepare(self, texts: Sequence[str]) -> list[Encoded]:
        return encode_texts(self.tokenizer, texts, self.max_length)

    def cost(self, item: Encoded) -> int:
        return len(item.input_ids)

    def infer(self, items: list[Encoded]) -> list[tuple]:
        import torch

        inputs = pad_batch(self.tokenizer, items, self.device)
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return [(vector,) for vector in pooled.cpu().numpy()]
