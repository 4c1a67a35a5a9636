"""Constrained decoding: every generated token keeps the output inside a JSON Schema.

llguidance (the grammar engine behind vLLM's and SGLang's `guidance` backends) compiles
the schema once per model; each row gets its own matcher, which says after every token
which tokens may come next. `JsonSchemaConstraint` is a transformers logits processor:
it masks the others out of each row's scores, so greedy search and sampling both pick
an allowed token, batched or row by row alike.

Chosen over xgrammar (same grammar class, also in vLLM/SGLang) for its footprint: one
3 MB wheel without dependencies, where xgrammar 0.2.9 pulls triton (286 MB) and
apache-tvm-ffi into a CPU install. Its own `apply_token_bitmask_inplace` is skipped:
it runs through `torch.compile`, which needs a C++ toolchain on the worker.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["GrammarError", "JsonSchemaConstraint", "compile_json_schema"]

#: No free whitespace between JSON tokens: a small model otherwise spends its token
#: budget on newlines and indentation before it ever writes a value.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema the grammar engine cannot compile."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarError(
            "json_schema needs the llguidance package; install the llm extra "
            "(pip install -e '.[llm]')"
        ) from None
    return llguidance


def compile_json_schema(schema: dict) -> str:
    """The llguidance grammar for `schema` (validated, no tokenizer needed).

    Raises:
        GrammarError: the engine does not support a keyword the schema uses.
    """
    llguidance = _llguidance()
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults=_JSON_OPTIONS
        )
    except ValueError as err:
        raise GrammarError(f"the grammar engine cannot use this schema: {err}") from None
    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if error:
        raise GrammarError(f"the grammar engine cannot use this schema: {messages[0]}")
    return grammar


class JsonSchemaConstraint:
    """A logits processor holding each row of a `generate` call to one grammar.

    Args:
        tokenizer: the model's (fast) tokenizer; wrapped once, which takes about 1 s.
        grammar: from `compile_json_schema`.
        eos_ids: the ids that end a row; a row that ended is left alone.
        vocab_size: the width of the model's scores (may exceed the tokenizer's).
    """

    def __init__(self, tokenizer: Any, grammar: str, eos_ids: set[int], vocab_size: int):
        _llguidance()
        from llguidance.hf import from_tokenizer

        self.tokenizer = from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.grammar = grammar
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size

    def for_batch(self, rows: int) -> _BatchMatchers:
        """A fresh processor for one `generate` call over `rows` rows."""
        return _BatchMatchers(self, rows)


class _BatchMatchers:
    """One matcher per row; called by `generate` once per step."""

    def __init__(self, constraint: JsonSchemaConstraint, rows: int):
        import llguidance

        self.constraint = constraint
        self.matchers = [
            llguidance.LLMatcher(constraint.tokenizer, constraint.grammar, log_level=0)
            for _ in range(rows)
        ]
        self.ended = [False] * rows
        self.prompt_width: int | None = None

    def __call__(self, input_ids, scores):
        import torch

        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        else:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if self.ended[row]:
                    continue
                if token in self.constraint.eos_ids:
                    self.ended[row] = True
                self.matchers[row].consume_token(token)
        words = (self.constraint.vocab_size + 31) // 32
        bitmask = torch.full((len(self.matchers), words), -1, dtype=torch.int32)
        for row, matcher in enumerate(self.matchers):
            if not self.ended[row] and not matcher.is_error():
                matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), words * 4)
        bits = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(len(self.matchers), -1)
        allowed = allowed[:, : scores.shape[1]].to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))
