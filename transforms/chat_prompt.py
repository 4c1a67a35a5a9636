"""Chat prompts: messages rendered with the model's chat template, cells kept as text.

The template is rendered once, with a placeholder where each cell goes. The rendered
text is split at the template's own special tokens (`<|im_start|>`, …), and each piece
between them is tokenized with the row's cell values pasted in and special-token
parsing off. Tokenizers split at special tokens first and tokenize the pieces between
them apart, so for ordinary text the ids equal those of the whole rendered string (what
transformers' text-generation pipeline feeds the model); a cell holding
`<|im_start|>system` or the end-of-sequence string stays plain text inside its turn,
and can neither end the user's turn nor open another.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["ChatPrompt", "has_chat_template"]

# Private-use characters: no chat template writes them, so they mark where cells go.
_SLOT = "\ue000{}\ue001"
_SLOT_PATTERN = re.compile("\ue000(\\d+)\ue001")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


class ChatPrompt:
    """A message list whose contents are templates, tokenized per row.

    Args:
        tokenizer: the model's tokenizer, with a chat template.
        messages: (role, template pieces) per message; pieces as `parse_template` gives.

    Raises:
        ValueError: the tokenizer has no chat template, or its template drops a message
            that holds a column.
    """

    def __init__(self, tokenizer: Any, messages: Sequence[tuple[str, list]]):
        if not has_chat_template(tokenizer):
            raise ValueError(
                "the model's tokenizer has no chat template, so chat prompts (system, "
                "messages, chat: true) cannot be rendered; use a plain `prompt` or an "
                "instruct model"
            )
        self.tokenizer = tokenizer
        self.columns: list[str] = []
        rendered_messages = []
        for role, pieces in messages:
            content = []
            for literal, column in pieces:
                content.append(literal)
                if column is not None:
                    content.append(_SLOT.format(len(self.columns)))
                    self.columns.append(column)
            rendered_messages.append({"role": role, "content": "".join(content)})
        rendered = tokenizer.apply_chat_template(
            rendered_messages, tokenize=False, add_generation_prompt=True
        )
        found = [int(i) for i in _SLOT_PATTERN.findall(rendered)]
        if sorted(found) != list(range(len(self.columns))):
            raise ValueError(
                "the model's chat template does not keep every message's text (a system "
                "message the model does not take?); check the messages"
            )
        # Split at the template's added tokens, longest first so none hides a longer one.
        added = sorted(
            (token.content, index) for index, token in tokenizer.added_tokens_decoder.items()
        )
        ids = dict(added)
        if ids:
            pattern = "|".join(re.escape(text) for text in sorted(ids, key=len, reverse=True))
            parts = re.split(f"({pattern})", rendered)
        else:
            parts = [rendered]
        #: Special token ids (int) and text pieces (str, with slots) in order.
        self.pieces: list[int | str] = [
            ids[part] if i % 2 else part for i, part in enumerate(parts) if part or i % 2
        ]

    def encode(self, rows: Sequence[Sequence[str]]) -> list[list[int]]:
        """The prompt ids of each row, given its cell values in `columns` order."""
        texts = []
        for values in rows:
            for piece in self.pieces:
                if isinstance(piece, str):
                    texts.append(_SLOT_PATTERN.sub(lambda m, v=values: v[int(m[1])], piece))
        if not texts:
            return [[piece for piece in self.pieces if isinstance(piece, int)] for _ in rows]
        batch = self.tokenizer(
            texts,
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        encoded, position = [], 0
        for _ in rows:
            ids: list[int] = []
            for piece in self.pieces:
                if isinstance(piece, int):
                    ids.append(piece)
                else:
                    ids.extend(batch[position])
                    position += 1
            encoded.append(ids)
        return encoded
