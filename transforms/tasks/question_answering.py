"""question-answering: extractive answers, a span of the context per row.

transformers 5 removed the question-answering pipeline; this module reproduces what the
4.x `QuestionAnsweringPipeline` returned for the same model and input (a fast tokenizer),
so users who migrate from it get the same answers, scores and offsets:

- question and context are tokenized as a pair (question first for right-padding
  tokenizers), the context cut into windows of `max_seq_len` tokens overlapping by
  `doc_stride`; every window is read by default (`on_long_input: chunk`), the first
  only with `on_long_input: truncate`;
- per window, start and end logits get a softmax over the context tokens and CLS only;
  a span's score is p(start) x p(end), for start <= end < start + `max_answer_len`;
- the best `top_k * 2 + 10` spans of every window (`top_k` without word alignment) are
  mapped to characters (whole words with `align_to_words`), and spans whose text is
  the same (ignoring case) are merged, their scores summed, first position kept;
- with `handle_impossible_answer`, the null answer ("", 0, 0) scores the smallest
  p(CLS start) x p(CLS end) over the windows.

Unlike 4.x, which ran one window per forward pass, the windows of many rows share padded
forward passes here.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from transforms.models import ResolvedModel, load_kwargs, place_model
from transforms.tasks.base import (
    InvalidInput,
    Params,
    TaskAdapter,
    check_text,
    model_max_length,
    pad_ids,
    to_model,
)

__all__ = ["ANSWER_TYPE", "QuestionAnswering", "QuestionAnsweringParams"]

ANSWER_TYPE = pa.struct(
    [
        pa.field("answer", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("start", pa.int32()),
        pa.field("end", pa.int32()),
    ]
)


class QuestionAnsweringParams(Params):
    """Parameters of extractive question answering; names and defaults as in 4.x.

    Exactly one of `question_column` and `question` is set.

    Attributes:
        question_column: the column holding each row's question.
        question: one question asked of every row's context.
        top_k: how many answers to keep, best first; above 1 adds the `N_answers` column.
        max_answer_len: the longest answer, in tokens.
        doc_stride: tokens shared by neighbouring windows of a long context; by default
            min(max_seq_len // 2, 128), as in 4.x (128 at the default max_seq_len).
        max_seq_len: tokens per window (question, context and special tokens); capped
            by the model's own limit.
        handle_impossible_answer: let the empty answer win when the model's CLS scores
            above every span (SQuAD 2.0 style models).
        align_to_words: widen answers to whole words.
    """

    question_column: str | None = Field(None, min_length=1)
    question: str | None = None
    top_k: int = Field(1, ge=1)
    max_answer_len: int = Field(15, ge=1)
    doc_stride: int | None = Field(None, ge=0)
    max_seq_len: int = Field(384, ge=4)
    handle_impossible_answer: bool = False
    align_to_words: bool = True

    @model_validator(mode="after")
    def _one_question_source(self) -> QuestionAnsweringParams:
        if (self.question_column is None) == (self.question is None):
            raise ValueError(
                "set exactly one of `question_column` (a column holding each row's "
                "question) and `question` (one question for every row)"
            )
        if self.question is not None and not self.question.strip():
            raise ValueError("`question` is empty; give a question or use `question_column`")
        if self.stride >= self.max_seq_len:
            raise ValueError(
                f"`doc_stride` ({self.stride}) must be smaller than `max_seq_len` "
                f"({self.max_seq_len})"
            )
        return self

    @property
    def stride(self) -> int:
        """The window overlap in use: `doc_stride`, or its 4.x default."""
        return self.doc_stride if self.doc_stride is not None else min(self.max_seq_len // 2, 128)


class QuestionAnswering(TaskAdapter):
    """Adapter for `question-answering`: the context is the task's input column."""

    tasks = ("question-answering",)
    params_type = QuestionAnsweringParams
    default_model = "distilbert/distilbert-base-cased-distilled-squad"
    supports_chunking = True
    # 4.x read every window of the context: an answer past the first one is still found.
    default_on_long_input = "chunk"

    params: QuestionAnsweringParams

    def fields(self) -> list[pa.Field]:
        fields = [
            pa.field(f"{self.name}_answer", pa.string()),
            pa.field(f"{self.name}_score", pa.float32()),
            pa.field(f"{self.name}_start", pa.int32()),
            pa.field(f"{self.name}_end", pa.int32()),
        ]
        if self.params.top_k > 1:
            fields.append(pa.field(f"{self.name}_answers", pa.list_(ANSWER_TYPE)))
        return fields

    def read_columns(self) -> list[str]:
        column = self.params.question_column
        if column is None or column == self.input_column:
            return [self.input_column]
        return [self.input_column, column]

    def row_inputs(self, columns: dict[str, list]) -> list[Any]:
        contexts = columns[self.input_column]
        column = self.params.question_column
        questions = (
            columns[column] if column is not None else [self.params.question] * len(contexts)
        )
        return [
            _pair(question, context) for question, context in zip(questions, contexts, strict=True)
        ]

    def load(self, model: ResolvedModel, device: str, dtype: str) -> _Runner:
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        kwargs = load_kwargs(model, dtype)
        tokenizer = AutoTokenizer.from_pretrained(
            model.model, revision=kwargs.get("revision"), trust_remote_code=model.trust_remote_code
        )
        if not tokenizer.is_fast:
            raise ValueError(
                f"task {self.name!r}: character offsets need a fast tokenizer "
                "(tokenizer.json); this model only has a slow one"
            )
        network = AutoModelForQuestionAnswering.from_pretrained(model.model, **kwargs)
        network = place_model(network, device, dtype)
        return _Runner(tokenizer, network, device, self.params, chunk=self.on_long_input == "chunk")

    def load_front(self, model: ResolvedModel) -> _Runner | None:
        if model.gguf_file is not None:
            return None
        import torch
        from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer

        pinned = {"revision": model.revision} if model.revision is not None else {}
        trust = model.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(model.model, trust_remote_code=trust, **pinned)
        if not tokenizer.is_fast:
            return None  # load() names the problem
        config = AutoConfig.from_pretrained(model.model, trust_remote_code=trust, **pinned)
        with torch.device("meta"):  # the config and forward signature, no weights
            network = AutoModelForQuestionAnswering.from_config(config, trust_remote_code=trust)
        return _Runner(tokenizer, network, "meta", self.params, chunk=self.on_long_input == "chunk")


def _pair(question: Any, context: Any) -> tuple[str, str] | InvalidInput:
    for role, value in (("question", question), ("context", context)):
        checked = check_text(value)
        if isinstance(checked, InvalidInput):
            return InvalidInput(str(checked).replace("text", role, 1))
    return question, context


@dataclasses.dataclass(frozen=True)
class _Window:
    """One window of a row: model inputs, and how its tokens map back to the context."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    # Tokens the softmax runs over: the context's and CLS (4.x's p_mask == 0).
    scored: np.ndarray
    encoding: Any  # tokenizers.Encoding: offsets and words of this window


@dataclasses.dataclass(frozen=True)
class _Row:
    context: str
    windows: tuple[_Window, ...]
    truncated: bool = False


class _Runner:
    def __init__(self, tokenizer, model, device: str, params: QuestionAnsweringParams, chunk: bool):
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.params = params
        self.chunk = chunk
        self.max_seq_len = min(params.max_seq_len, model_max_length(tokenizer, model.config))
        self.stride = params.stride
        self.question_first = tokenizer.padding_side == "right"
        self.context_index = 1 if self.question_first else 0
        self.with_token_types = "token_type_ids" in tokenizer.model_input_names
        self.special_tokens = tokenizer.num_special_tokens_to_add(pair=True)
        self.pre_top_k = params.top_k * 2 + 10 if params.align_to_words else params.top_k
        forward = inspect.signature(model.forward).parameters
        self.forward_kwargs = {"use_cache": False} if "use_cache" in forward else {}

    # -- prepare: tokenize once -------------------------------------------------------

    def prepare(self, pairs: Sequence[tuple[str, str]]) -> list[_Row | InvalidInput]:
        questions = list({q: None for q, _ in pairs})  # a constant question: one call
        tokens = self.tokenizer(questions, add_special_tokens=False)["input_ids"]
        lengths = {q: len(ids) for q, ids in zip(questions, tokens, strict=True)}
        rows: list[_Row | InvalidInput | None] = [
            self._check_fit(q, c, lengths[q]) for q, c in pairs
        ]
        runnable = [i for i, row in enumerate(rows) if row is None]
        if runnable:
            for i, row in zip(runnable, self._encode([pairs[i] for i in runnable]), strict=True):
                rows[i] = row
        return rows

    def _check_fit(self, question: str, context: str, length: int) -> InvalidInput | None:
        """Why a pair cannot be cut into windows, where it cannot: the tokenizer would
        fail (or panic, for a stride that leaves the context no room)."""
        room = self.max_seq_len - self.special_tokens - length
        if room > self.stride:
            return None
        # Only a pair that must be cut needs room for the stride.
        encoded = self._tokenize([question], [context], truncate=False)
        if len(encoded["input_ids"][0]) <= self.max_seq_len:
            return None
        return InvalidInput(
            f"the question takes {length} tokens, leaving {max(room, 0)} of max_seq_len "
            f"{self.max_seq_len} for the context, which must exceed doc_stride {self.stride}: "
            "shorten the question, lower doc_stride or raise max_seq_len"
        )

    def _tokenize(self, questions: list[str], contexts: list[str], truncate: bool = True):
        first, second = (questions, contexts) if self.question_first else (contexts, questions)
        options = (
            {
                "truncation": "only_second" if self.question_first else "only_first",
                "max_length": self.max_seq_len,
                "stride": self.stride,
                "return_overflowing_tokens": True,
            }
            if truncate
            else {"truncation": False}
        )
        return self.tokenizer(
            first,
            second,
            return_token_type_ids=self.with_token_types,
            return_attention_mask=False,
            **options,
        )

    def _encode(self, pairs: list[tuple[str, str]]) -> list[_Row | InvalidInput]:
        questions = [q for q, _ in pairs]
        contexts = [c for _, c in pairs]
        batch = self._tokenize(questions, contexts)
        windows: list[list[_Window]] = [[] for _ in pairs]
        cls_id = self.tokenizer.cls_token_id
        for k, row in enumerate(batch["overflow_to_sample_mapping"]):
            encoding = batch.encodings[k]
            ids = batch["input_ids"][k]
            scored = np.array(
                [sid == self.context_index for sid in encoding.sequence_ids], dtype=bool
            )
            if cls_id is not None:
                scored |= np.asarray(ids) == cls_id  # some models answer "none" with CLS
            types = batch["token_type_ids"][k] if self.with_token_types else None
            windows[row].append(_Window(ids, types, scored, encoding))
        rows: list[_Row | InvalidInput] = []
        for context, found in zip(contexts, windows, strict=True):
            if not any(self.context_index in w.encoding.sequence_ids for w in found):
                rows.append(InvalidInput("context has no tokens (only control characters?)"))
                continue
            kept = found if self.chunk else found[:1]
            rows.append(_Row(context, tuple(kept), truncated=len(kept) < len(found)))
        return rows

    def cost(self, row: _Row) -> int:
        return len(row.windows) * max(len(w.input_ids) for w in row.windows)

    # -- infer: one padded forward pass over every window of a micro-batch ------------

    def infer(self, rows: list[_Row]) -> list[tuple]:
        return self.decode(rows, self.forward(self.collate(rows)))

    def collate(self, rows: list[_Row]) -> dict[str, np.ndarray]:
        windows = [w for row in rows for w in row.windows]
        types = [w.token_type_ids for w in windows] if self.with_token_types else None
        # Right padding whatever the tokenizer's side: each window keeps the positions
        # it had unpadded, as 4.x ran it.
        return pad_ids(self.tokenizer, [w.input_ids for w in windows], types=types, right=True)

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            output = self.model(**to_model(batch, self.device), **self.forward_kwargs)
        return {
            "start": output.start_logits.float().cpu().numpy(),
            "end": output.end_logits.float().cpu().numpy(),
        }

    def decode(self, rows: list[_Row], outputs: dict[str, np.ndarray]) -> list[tuple]:
        starts, ends = outputs["start"], outputs["end"]
        results = []
        at = 0
        for row in rows:
            lengths = [len(w.input_ids) for w in row.windows]
            answers = self._answers(
                row,
                [starts[at + i, :n] for i, n in enumerate(lengths)],
                [ends[at + i, :n] for i, n in enumerate(lengths)],
            )
            at += len(lengths)
            results.append(self._fields(answers))
        return results

    def _answers(self, row: _Row, starts: list[np.ndarray], ends: list[np.ndarray]) -> list[dict]:
        params = self.params
        answers: list[dict] = []
        by_text: dict[str, dict] = {}
        null_score = 1_000_000.0  # 4.x's "large and positive" start
        for window, start_logits, end_logits in zip(row.windows, starts, ends, strict=True):
            start = _softmax(start_logits, window.scored)
            end = _softmax(end_logits, window.scored)
            if params.handle_impossible_answer:
                null_score = min(null_score, float(start[0] * end[0]))
            start[0] = end[0] = 0.0  # CLS is the null answer, never a span
            for s, e, score in _best_spans(start, end, params.max_answer_len, self.pre_top_k):
                first, last = self._char_span(window.encoding, s, e)
                text = row.context[first:last]
                # 4.x merges spans of equal text (ignoring case): scores add up, the
                # first position found stays.
                known = by_text.get(text.lower())
                if known is not None:
                    known["score"] += score
                else:
                    answer = {"answer": text, "score": score, "start": first, "end": last}
                    by_text[text.lower()] = answer
                    answers.append(answer)
        if params.handle_impossible_answer:
            answers.append({"answer": "", "score": null_score, "start": 0, "end": 0})
        return sorted(answers, key=lambda a: a["score"], reverse=True)[: params.top_k]

    def _char_span(self, encoding, s: int, e: int) -> tuple[int, int]:
        if self.params.align_to_words:
            try:
                first_word = encoding.token_to_word(s)
                last_word = encoding.token_to_word(e)
                first = encoding.word_to_chars(first_word, sequence_index=self.context_index)[0]
                last = encoding.word_to_chars(last_word, sequence_index=self.context_index)[1]
                return first, last
            except Exception:  # as 4.x: a tokenizer without words keeps to offsets
                pass
        return encoding.offsets[s][0], encoding.offsets[e][1]

    def _fields(self, answers: list[dict]) -> tuple:
        best = (
            answers[0] if answers else {"answer": None, "score": None, "start": None, "end": None}
        )
        fields = (best["answer"], best["score"], best["start"], best["end"])
        if self.params.top_k > 1:
            fields = (*fields, answers)
        return fields


def _softmax(logits: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """4.x's masked softmax, in float32: tokens outside `scored` get probability 0."""
    masked = np.where(scored, logits, np.float32(-10000.0)).astype(np.float32)
    exp = np.exp(masked - masked.max())
    return exp / exp.sum()


def _best_spans(
    start: np.ndarray, end: np.ndarray, max_answer_len: int, count: int
) -> list[tuple[int, int, float]]:
    """The `count` best (start, end, score) with start <= end < start + max_answer_len.

    Spans of score 0 (a masked token at either end) are never answers; 4.x could list
    some of them when a window had fewer than `count` real spans.
    """
    scores = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    flat = scores.ravel()
    positive = np.flatnonzero(flat > 0)
    order = positive[np.argsort(-flat[positive], kind="stable")][:count]
    width = scores.shape[1]
    return [(int(i // width), int(i % width), float(flat[i])) for i in order]
