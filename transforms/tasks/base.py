"""The small interface every task family implements, and the encoding they share.

A task adapter (a `TaskAdapter` subclass) is cheap, picklable configuration; `load()`
returns a runner that holds the model on one worker. The runner splits the hot path
the way transformers' `Pipeline` does: `prepare` (tokenize a whole chunk once),
`cost` (its length, for sorting and packing), `infer` (one padded forward pass over a
micro-batch and the post-processing). None of this knows about Beam.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from transforms.models import ResolvedModel

__all__ = [
    "Encoded",
    "InvalidInput",
    "Params",
    "Runner",
    "SplitRunner",
    "TaskAdapter",
    "check_text",
    "encode_texts",
    "front_pipeline",
    "pad_batch",
    "pad_ids",
    "to_model",
]


class Params(BaseModel):
    """Base of every task's typed parameters: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Runner(Protocol):
    """A loaded model for one task, held once per worker process."""

    def prepare(self, inputs: Sequence[Any]) -> list[Any]:
        """Tokenizes a chunk's valid row inputs, once; one item per input, or an
        `InvalidInput` in place of an item for a row that cannot run."""

    def cost(self, item: Any) -> int:
        """The item's length in tokens, for sorting and token-budget packing."""

    def infer(self, items: list[Any]) -> list[tuple]:
        """One tuple of field values (in `fields()` order) per item, in order."""


class SplitRunner(Runner, Protocol):
    """A runner whose `infer` is `decode(items, forward(collate(items)))`.

    Only `forward` needs the model, and it takes and returns NumPy arrays (plain data
    that pickles as bytes), so a model server can run it for callers that tokenize,
    collate and decode themselves (`TaskAdapter.load_front`): the server then spends
    its time on forward passes only.
    """

    def collate(self, items: list[Any]) -> dict[str, np.ndarray]:
        """A micro-batch's model inputs: padded arrays, on the host."""

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs for `collate`'s arrays, cut to what `decode` reads."""

    def decode(self, items: list[Any], outputs: dict[str, np.ndarray]) -> list[tuple]:
        """One tuple of field values per item, from `forward`'s outputs."""


class InvalidInput(ValueError):
    """A row whose input cannot run: null, empty, not a string, a missing mask, …"""


def check_text(value: Any) -> str | InvalidInput:
    """The value if it is a non-blank string, else the reason it cannot be used."""
    if isinstance(value, InvalidInput):  # a cell that could not be read (invalid UTF-8)
        return value
    if value is None:
        return InvalidInput("text is null")
    if not isinstance(value, str):
        return InvalidInput(f"text must be a string, got {type(value).__name__}")
    if not value.strip():
        return InvalidInput("text is empty")
    return value


class TaskAdapter:
    """One task family: its parameters, its output columns, and how to load it.

    Subclasses set the class attributes and implement `fields` and `load`. A task that
    reads more than its one text column (a question column, a prompt template) also
    overrides `read_columns` and `row_inputs`.

    Args:
        name: the task's name from the spec; prefixes its columns.
        params: the family's typed parameters.
        input_column: the column holding the task's main text.
        on_long_input: `truncate` (cut to the model's limit) or `chunk` (cover the whole
            text with overlapping windows; tasks with `supports_chunking` only); None:
            the family's `default_on_long_input`.
    """

    tasks: ClassVar[tuple[str, ...]] = ()
    params_type: ClassVar[type[Params]] = Params
    default_model: ClassVar[str] = ""
    supports_chunking: ClassVar[bool] = False
    #: What a spec without `on_long_input` gets: the family's usual behaviour (4.x's
    #: question-answering pipeline always read the whole context).
    default_on_long_input: ClassVar[str] = "truncate"
    #: The default micro-batch budget is this many times the device's default.
    batch_tokens_factor: ClassVar[int] = 1

    def __init__(
        self,
        name: str,
        params: Params | None = None,
        *,
        input_column: str = "text",
        on_long_input: str | None = None,
    ):
        on_long_input = on_long_input or self.default_on_long_input
        if on_long_input not in ("truncate", "chunk"):
            raise ValueError(f"on_long_input {on_long_input!r}: expected truncate or chunk")
        if on_long_input == "chunk" and not self.supports_chunking:
            raise ValueError(
                f"task {name!r}: on_long_input 'chunk' is not supported by {self.tasks[0]}; "
                "use 'truncate'"
            )
        self.name = name
        self.params = params if params is not None else self.params_type()
        self.input_column = input_column
        self.on_long_input = on_long_input

    @property
    def deterministic(self) -> bool:
        """Whether a row's output is a pure function of its input (`row_inputs`).

        Then equal inputs are computed once (`transforms.dedup`). True unless the task
        samples without a seed; a plugin whose output varies per call says False.
        """
        return True

    def fields(self) -> list[pa.Field]:
        """The typed columns this task adds, prefixed with the task's name."""
        raise NotImplementedError

    def load(self, model: ResolvedModel, device: str, dtype: str) -> Runner:
        """Loads the model on this worker."""
        raise NotImplementedError

    def load_front(self, model: ResolvedModel) -> SplitRunner | None:
        """The runner without the model's weights (tokenizer, config, label maps), for a
        process whose forward passes run in a model server; None: the family cannot
        split, and the server runs `infer` whole."""
        return None

    def resolved_parameters(self, model: ResolvedModel) -> dict[str, Any]:
        """What the model's own files decide beyond `params` (e.g. an embedding model's
        pooling), for the manifest; read on the launcher without loading any weights.

        Raises:
            ValueError: the parameters contradict the model's files.
        """
        return {}

    def read_columns(self) -> list[str]:
        """Every input column the task reads; checked against the input before the run."""
        return [self.input_column]

    def text_columns(self) -> list[str]:
        """The columns of `read_columns()` that must hold text; their types are checked
        before the run, since a column of numbers would fail every row."""
        return self.read_columns()

    def row_inputs(self, columns: dict[str, list]) -> list[Any]:
        """One input per row for `Runner.prepare`, or an `InvalidInput` for a row that
        cannot run. `columns` holds each of `read_columns()` as Python values."""
        return [check_text(value) for value in columns[self.input_column]]


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


def front_pipeline(task: str, model: ResolvedModel, auto_class) -> Any:
    """A transformers pipeline whose model has no weights (on the meta device).

    Its tokenizer, config and post-processing are the real ones: what a process that
    tokenizes and decodes, while a model server runs the forward passes, needs.
    `auto_class` is the `AutoModelFor...` class the task's pipeline loads.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, pipeline

    pinned: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.revision is not None:
        pinned["revision"] = model.revision
    config = AutoConfig.from_pretrained(model.model, **pinned)
    tokenizer = AutoTokenizer.from_pretrained(model.model, **pinned)
    with torch.device("meta"):
        network = auto_class.from_config(config, trust_remote_code=model.trust_remote_code)
    # On its own device the pipeline never tries to copy the (absent) weights.
    return pipeline(task, model=network, tokenizer=tokenizer, device=torch.device("meta"))


def pad_ids(
    tokenizer,
    rows: Sequence[Sequence[int]],
    *,
    types: Sequence[Sequence[int]] | None = None,
    right: bool | None = None,
) -> dict[str, np.ndarray]:
    """Pads token id lists to the longest, on the host: input_ids, attention_mask and,
    with `types`, token_type_ids. `right` defaults to the tokenizer's padding side."""
    width = max(len(ids) for ids in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    token_types = np.zeros((len(rows), width), dtype=np.int64) if types is not None else None
    if right is None:
        right = tokenizer.padding_side != "left"
    for row, row_ids in enumerate(rows):
        length = len(row_ids)
        span = slice(0, length) if right else slice(width - length, width)
        ids[row, span] = row_ids
        mask[row, span] = 1
        if token_types is not None and types[row] is not None:
            token_types[row, span] = types[row]
    batch = {"input_ids": ids, "attention_mask": mask}
    if token_types is not None:
        batch["token_type_ids"] = token_types
    return batch


def to_model(batch: dict[str, np.ndarray], device: str) -> dict:
    """Host arrays as tensors on `device`; on CUDA through pinned memory with
    non-blocking copies, so the copy of a batch overlaps the work queued before it."""
    import torch

    tensors = {key: torch.from_numpy(value) for key, value in batch.items()}
    if not device.startswith("cuda"):
        return {key: value.to(device) for key, value in tensors.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in tensors.items()}


def pad_batch(tokenizer, items: Sequence[Encoded], device: str) -> dict:
    """Pads a micro-batch to its longest row and moves it to `device`."""
    return to_model(pad_ids(tokenizer, [item.input_ids for item in items]), device)
