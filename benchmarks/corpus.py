"""Real English prose that ships with Python: the language reference's topic texts.

`pydoc_data.topics` holds the reference documentation `help()` shows. Its paragraphs
(code samples dropped) are natural prose with a long-tailed length spread: median
about 28 words, a few over 300. No synthetic or repeated strings.
"""

from __future__ import annotations

import re


def paragraphs(limit: int | None = None) -> list[str]:
    """Distinct prose paragraphs, in a fixed order; module docstrings top up the count."""
    import pydoc_data.topics

    texts = [topic for _, topic in sorted(pydoc_data.topics.topics.items())]
    texts += _docstrings()
    found: dict[str, None] = {}
    for text in texts:
        for block in re.split(r"\n\s*\n", text):
            lines = block.split("\n")
            if any(line.startswith(("   ", ">>>", "\t")) for line in lines):
                continue  # code, tables, examples
            paragraph = " ".join(line.strip() for line in lines).strip()
            if len(paragraph.split()) >= 5 and not paragraph.startswith(("*", "-", "=")):
                found[paragraph] = None
    result = list(found)
    return result[:limit] if limit else result


def sentence_pairs(count: int) -> list[str]:
    """`count` distinct rows, each two sentences of the corpus, for runs larger than it.

    Row j joins sentence j mod N with the one `1 + j // N` places after it (N sentences),
    so every row is two sentences long whatever `count` is: the 10k-row and the 100k-row
    inputs have the same length spread, and no string repeats.

    Raises:
        ValueError: the corpus has too few sentences for `count` distinct rows.
    """
    sentences = list(
        {
            sentence: None
            for paragraph in paragraphs()
            for sentence in re.split(r"(?<=[.!?])\s+", paragraph)
            if len(sentence.split()) >= 4
        }
    )
    total = len(sentences)
    if count > total * (total - 1):
        raise ValueError(f"{count} rows asked for; the corpus makes at most {total * (total - 1)}")
    rows = {}
    for j in range(count):
        first = j % total
        rows[f"{sentences[first]} {sentences[(first + 1 + j // total) % total]}"] = None
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} of {count} rows are distinct")
    return list(rows)


def _docstrings() -> list[str]:
    import argparse
    import collections
    import csv
    import datetime
    import email
    import json
    import logging
    import pathlib
    import subprocess
    import textwrap
    import threading
    import unittest

    modules = (
        argparse,
        collections,
        csv,
        datetime,
        email,
        json,
        logging,
        pathlib,
        subprocess,
        textwrap,
        threading,
        unittest,
    )
    docs = []
    for module in modules:
        for value in [module, *vars(module).values()]:
            doc = getattr(value, "__doc__", None)
            if isinstance(doc, str) and getattr(value, "__module__", module.__name__):
                docs.append(doc)
    return docs
