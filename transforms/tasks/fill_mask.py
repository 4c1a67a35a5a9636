"""fill-mask: the model's top k fillers for the one masked token of each row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import numpy as np
import pyarrow as pa
from pydantic import Field, StrictInt

from transforms.models import ResolvedModel, load_pipeline, place_model
from transforms.tasks.base import (
    Encoded,
    InvalidInput,
    Params,
    TaskAdapter,
    encode_texts,
    front_pipeline,
    model_max_length,
    pad_ids,
    to_model,
)

__all__ = ["FILL_TYPE", "MASK_PLACEHOLDER", "FillMask", "FillMaskParams"]

#: Written in a text in place of the model's own mask token ("[MASK]", "<mask>", …), so
#: one input column works with any fill-mask model.
MASK_PLACEHOLDER = "{mask}"

FILL_TYPE = pa.struct(
    [
        pa.field("token_str", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("sequence", pa.string()),
    ]
)


class FillMaskParams(Params):
    """Parameters of fill-mask.

    Attributes:
        top_k: how many fillers to keep per row, most likely first.
    """

    top_k: Annotated[StrictInt, Field(ge=1)] = 5


class FillMask(TaskAdapter):
    """Adapter for `fill-mask`.

    A row's text holds exactly one mask: the model's own mask token or `{mask}`.
    """

    tasks = ("fill-mask",)
    params_type = FillMaskParams
    default_model = "distilbert/distilroberta-base"

    def fields(self) -> list[pa.Field]:
        return [pa.field(self.name, pa.list_(FILL_TYPE))]

    def load(self, model: ResolvedModel, device: str, dtype: str) -> _Runner:
        # Kept for its post-processing (top k, token_str and sequence decoding), so
        # results match a direct pipeline call; tokenizing and batching are ours.
        pipe = load_pipeline("fill-mask", model, dtype)
        if pipe.tokenizer.mask_token_id is None:
            raise ValueError(f"task {self.name!r}: the model's tokenizer has no mask token")
        pipe.model = place_model(pipe.model, device, dtype)
        return _Runner(pipe, device, self.params)

    def load_front(self, model: ResolvedModel) -> _Runner | None:
        if model.gguf_file is not None:
            return None
        from transformers import AutoModelForMaskedLM

        pipe = front_pipeline("fill-mask", model, AutoModelForMaskedLM)
        if pipe.tokenizer.mask_token_id is None:
            return None  # load() names the problem
        return _Runner(pipe, "meta", self.params)


class _Runner:
    def __init__(self, pipe, device: str, params: FillMaskParams):
        self.pipe = pipe
        self.device = device
        self.top_k = params.top_k
        self.mask = pipe.tokenizer.mask_token
        self.mask_id = pipe.tokenizer.mask_token_id
        self.max_length = model_max_length(pipe.tokenizer, pipe.model.config)

    def prepare(self, texts: Sequence[str]) -> list[Encoded | InvalidInput]:
        masked = [text.replace(MASK_PLACEHOLDER, self.mask) for text in texts]
        problems = [self._mask_problem(text) for text in masked]
        valid = [i for i, problem in enumerate(problems) if problem is None]
        encoded = encode_texts(self.pipe.tokenizer, [masked[i] for i in valid], self.max_length)
        items: list[Encoded | InvalidInput] = list(problems)
        for i, item in zip(valid, encoded, strict=True):
            found = item.input_ids.count(self.mask_id)
            if found == 1:
                items[i] = item
            elif item.truncated and found == 0:
                items[i] = InvalidInput(
                    f"the {self.mask} falls after the model's {self.max_length}-token limit; "
                    "shorten the text before it"
                )
            else:  # the text holds the token's string, but it did not tokenize as one mask
                items[i] = InvalidInput(
                    f"expected exactly one {self.mask} (or {MASK_PLACEHOLDER}) in the text, "
                    f"found {found} after tokenizing"
                )
        return items

    def _mask_problem(self, text: str) -> InvalidInput | None:
        found = text.count(self.mask)
        if found == 1:
            return None
        return InvalidInput(
            f"expected exactly one {self.mask} (or {MASK_PLACEHOLDER}) in the text, found {found}"
        )

    def cost(self, item: Encoded) -> int:
        return len(item.input_ids)

    def infer(self, items: list[Encoded]) -> list[tuple]:
        return self.decode(items, self.forward(self.collate(items)))

    def collate(self, items: list[Encoded]) -> dict[str, np.ndarray]:
        return pad_ids(self.pipe.tokenizer, [item.input_ids for item in items])

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        inputs = to_model(batch, self.device)
        with torch.inference_mode():
            logits = self.pipe.model(**inputs).logits
            # Only the mask position's logits leave the device: rows x vocabulary, not
            # rows x tokens x vocabulary. prepare() left exactly one mask per row.
            at_mask = logits[inputs["input_ids"] == self.mask_id].float().cpu()
        return {"at_mask": at_mask.numpy()}

    def decode(self, items: list[Encoded], outputs: dict[str, np.ndarray]) -> list[tuple]:
        import torch

        at_mask = torch.from_numpy(outputs["at_mask"])
        results = []
        for row, item in enumerate(items):
            length = len(item.input_ids)
            one = {
                "input_ids": torch.tensor([item.input_ids]),
                # The pipeline's postprocess reads logits[0, mask position]; a stride-0
                # view puts the mask's logits at every position without copying them.
                "logits": at_mask[row].expand(1, length, -1),
            }
            fills = self.pipe.postprocess(one, top_k=self.top_k)
            results.append(([_fill(fill) for fill in fills],))
        return results


def _fill(fill: dict) -> dict:
    return {
        "token_str": fill["token_str"],
        "score": float(fill["score"]),
        "sequence": fill["sequence"],
    }
