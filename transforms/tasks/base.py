"""The small interface every task family implements, and the encoding they share.

A task adapter is cheap, picklable configuration; `load()` returns a runner that holds
the model on one worker. The runner splits the hot path the way transformers'
`Pipeline` does: `prepare` (tokenize a whole chunk once), `cost` (its length, for
sorting and packing), `infer` (one padded forward pass over a micro-batch and the
post-processing). None of this knows about Beam.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from transforms.models import ResolvedModel

__all__ = ["Encoded", "Params", "Runner", "TaskAdapter", "encode_texts", "pad_batch"]


class Params(BaseModel):
    """Base of every task's typed parameters: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Runner(Protocol):
    """A loaded model for one task, held once per worker process."""

    def prepare(self, texts: Sequence[str]) -> list[Any]:
        """Tokenizes the rows of a chunk, once; one item per text."""

    def cost(self, item: Any) -> int:
        """The item's length in tokens, for sorting and token-budget packing."""

    def infer(self, items: list[Any]) -> list[tuple]:
        """One tuple of field values (in `fields()` order) per item, in order."""


class TaskAdapter(Protocol):
    """One task family: its parameters, its output columns, and how to load it."""

    tasks: ClassVar[tuple[str, ...]]
    params_type: ClassVar[type[Params]]
    default_model: ClassVar[str]

    def __init__(self, name: str, params: Params) -> None: ...

    def fields(self) -> list[pa.Field]:
        """The typed columns this task adds, prefixed with the task's name."""

    def load(self, model: ResolvedModel, device: str, dtype: str) -> Runner:
        """Loads the model on this worker."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized row: its ids and whatever post-processing needs (offsets, …)."""

    text: str
    input_ids: list[int]
    extra: dict[str, list] = dataclasses.field(default_factory=dict)
    truncated: bool = False


def encode_texts(tokenizer, texts: Sequence[str], max_length: int, **kwargs) -> list[Encoded]:
    """Tokenizes all texts in one call (fast tokenizers batch this), truncating to fit.

    Extra per-token outputs asked for with kwargs (`return_offsets_mapping=True`, …) are
    kept in `Encoded.extra`.
    """
    batch = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
        return_overflowing_tokens=False,
        return_length=False,
        **kwargs,
    )
    extra_keys = [key for key in batch if key != "input_ids"]
    items = []
    for i, text in enumerate(texts):
        ids = batch["input_ids"][i]
        # A row fills max_length only when it was cut (or fits exactly, which is rare
        # enough that the count stays honest); re-tokenizing to tell the two apart
        # would cost a second pass over every long row.
        items.append(
            Encoded(
                text=text,
                input_ids=ids,
                extra={key: batch[key][i] for key in extra_keys},
                truncated=len(ids) >= max_length,
            )
        )
    return items


def model_max_length(tokenizer, config) -> int:
    """The longest input the model takes: the tokenizer's limit, capped by the positions."""
    limits = [
        value
        for value in (
            getattr(tokenizer, "model_max_length", None),
            getattr(config, "max_position_embeddings", None),
        )
        if isinstance(value, int) and 0 < value < 1_000_000
    ]
    return min(limits) if limits else 512


def pad_batch(tokenizer, items: Sequence[Encoded], device: str) -> dict:
    """Pads a micro-batch to its longest row and moves it to `device`."""
    import torch

    width = max(len(item.input_ids) for item in items)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    right = tokenizer.padding_side != "left"
    for row, item in enumerate(items):
        length = len(item.input_ids)
        span = slice(0, length) if right else slice(width - length, width)
        ids[row, span] = torch.tensor(item.input_ids, dtype=torch.long)
        mask[row, span] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
