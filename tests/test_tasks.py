"""Each task adapter, row by row, against a direct transformers call on the same model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import pipeline

from transforms.inference import run_task
from transforms.models import resolve_model
from transforms.tasks.feature_extraction import FeatureExtraction, FeatureExtractionParams
from transforms.tasks.text_classification import TextClassification, TextClassificationParams
from transforms.tasks.token_classification import (
    TokenClassification,
    TokenClassificationParams,
)

# A small budget forces many micro-batches of several padded rows each, so the
# comparison covers padding, sorting and the reordering back to input order.
SMALL_BUDGET = 600
TOLERANCE = 1e-4


def _runner(adapter, path, dtype="fp32"):
    return adapter.load(resolve_model(str(path)), "cpu", dtype)


def _long_text(words: int) -> str:
    return " ".join(["The committee in Geneva discussed the annual report again."] * (words // 9))


def test_sentiment_matches_pipeline(tiny_models, sample_texts):
    path = tiny_models["text-classification"]
    adapter = TextClassification("sentiment", TextClassificationParams())
    texts = [*sample_texts, _long_text(900)]
    results, errors, truncated = run_task(_runner(adapter, path), texts, SMALL_BUDGET)

    assert errors == [None] * len(texts)
    assert truncated == 1
    direct = pipeline("sentiment-analysis", model=str(path))
    for text, (label, score) in zip(texts, results, strict=True):
        expected = direct(text, truncation=True)[0]
        assert label == expected["label"]
        assert score == pytest.approx(expected["score"], abs=TOLERANCE)
    assert {label for label, _ in results} == {"NEGATIVE", "POSITIVE"}


@pytest.mark.parametrize("function", ["sigmoid", "none"])
def test_function_to_apply_matches_pipeline(tiny_models, sample_texts, function):
    path = tiny_models["text-classification"]
    adapter = TextClassification("s", TextClassificationParams(function_to_apply=function))
    results, _, _ = run_task(_runner(adapter, path), sample_texts[:12], SMALL_BUDGET)

    direct = pipeline("text-classification", model=str(path))
    for text, (label, score) in zip(sample_texts[:12], results, strict=True):
        expected = direct(text, function_to_apply=function)[0]
        assert label == expected["label"]
        assert score == pytest.approx(expected["score"], abs=TOLERANCE)


@pytest.mark.parametrize("strategy", ["simple", "first", "none"])
def test_entities_match_pipeline(tiny_models, sample_texts, strategy):
    path = tiny_models["token-classification"]
    adapter = TokenClassification("ents", TokenClassificationParams(aggregation_strategy=strategy))
    texts = sample_texts[:30]
    results, errors, _ = run_task(_runner(adapter, path), texts, SMALL_BUDGET)

    assert errors == [None] * len(texts)
    direct = pipeline("token-classification", model=str(path), aggregation_strategy=strategy)
    found = 0
    for text, (entities,) in zip(texts, results, strict=True):
        expected = direct(text)
        assert len(entities) == len(expected)
        for ours, theirs in zip(entities, expected, strict=True):
            assert ours["entity_group"] == theirs.get("entity_group", theirs.get("entity"))
            assert (ours["word"], ours["start"], ours["end"]) == (
                theirs["word"],
                theirs["start"],
                theirs["end"],
            )
            assert ours["score"] == pytest.approx(float(theirs["score"]), abs=TOLERANCE)
            # Offsets point into the row's own text.
            assert 0 <= ours["start"] < ours["end"] <= len(text)
        found += len(entities)
    assert found > 0


#: A model without a sentence-transformers config: each pooling over the token vectors
#: of one unpadded row (the transformers pipeline's output), as a plain reference.
_POOLED = {
    "mean": lambda tokens: tokens.mean(axis=0),
    "cls": lambda tokens: tokens[0],
    "max": lambda tokens: tokens.max(axis=0),
    "last": lambda tokens: tokens[-1],
}


@pytest.mark.parametrize("pooling", [None, *_POOLED])
def test_embeddings_match_pooled_pipeline(tiny_models, sample_texts, pooling):
    path = tiny_models["feature-extraction"]
    adapter = FeatureExtraction("emb", FeatureExtractionParams(pooling=pooling))
    texts = [*sample_texts, _long_text(900)]
    results, errors, truncated = run_task(_runner(adapter, path), texts, SMALL_BUDGET)

    assert errors == [None] * len(texts) and truncated == 1
    direct = pipeline("feature-extraction", model=str(path))
    pool = _POOLED[pooling or "mean"]
    for text, (vector,) in zip(texts, results, strict=True):
        tokens = np.asarray(direct(text, truncation=True)[0])  # one unpadded row
        np.testing.assert_allclose(vector, pool(tokens), atol=TOLERANCE)
    assert adapter.fields()[0].type.value_type.bit_width == 32
    described = adapter.resolved_parameters(resolve_model(str(path)))
    assert described == {
        "sentence_transformers_modules": None,
        "pooling": pooling or "mean",
        "normalize": False,
        "prompt": None,
        "max_seq_length": 512,
    }


def test_normalized_embeddings_have_unit_length(tiny_models, sample_texts):
    path = tiny_models["feature-extraction"]
    plain, _, _ = run_task(
        _runner(FeatureExtraction("e", FeatureExtractionParams()), path), sample_texts[:8], 4096
    )
    unit, _, _ = run_task(
        _runner(FeatureExtraction("e", FeatureExtractionParams(normalize=True)), path),
        sample_texts[:8],
        4096,
    )
    for (raw,), (normalized,) in zip(plain, unit, strict=True):
        assert np.linalg.norm(normalized) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(normalized, raw / np.linalg.norm(raw), atol=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_reduced_precision_loads_and_labels_every_row(tiny_models, sample_texts, dtype):
    path = tiny_models["text-classification"]
    runner = _runner(TextClassification("s", TextClassificationParams()), path, dtype)
    reduced, errors, _ = run_task(runner, sample_texts, 4096)

    assert errors == [None] * len(sample_texts)
    assert {label for label, _ in reduced} <= {"NEGATIVE", "POSITIVE"}
    if dtype == "int8":
        from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

        # Every Linear layer is quantized, with 8-bit (not torch's 7-bit) activations.
        modules = list(runner.pipe.model.modules())
        assert not any(type(m) is torch.nn.Linear for m in modules)
        quantized = [m for m in modules if isinstance(m, QuantizedLinear)]
        assert quantized and all(type(m).__name__ == "Int8Linear" for m in quantized)
    else:
        assert next(runner.pipe.model.parameters()).dtype == torch.bfloat16


def test_chunked_entities_cover_long_texts_like_the_pipeline_with_stride(tiny_models):
    path = tiny_models["token-classification"]
    params = TokenClassificationParams(aggregation_strategy="simple", stride=32)
    adapter = TokenClassification("ents", params, on_long_input="chunk")
    long_text = " ".join(
        f"Maria Keller met Tom Berg in Hamburg, meeting number {i}, at Nordwind Energy."
        for i in range(60)
    )
    texts = [long_text, "Short one about Paris.", long_text[:700]]
    results, errors, truncated = run_task(_runner(adapter, path), texts, 2048)

    assert errors == [None] * 3 and truncated == 0
    direct = pipeline("token-classification", model=str(path), aggregation_strategy="simple")
    for text, (entities,) in zip(texts, results, strict=True):
        expected = direct(text, stride=32)
        assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in entities] == [
            (e["entity_group"], e["word"], e["start"], e["end"]) for e in expected
        ]
        for ours, theirs in zip(entities, expected, strict=True):
            assert ours["score"] == pytest.approx(float(theirs["score"]), abs=TOLERANCE)
    # The long text's entities reach its end, far past one window of 512 tokens.
    assert max(e["end"] for e in results[0][0]) > len(long_text) - 40


def test_truncated_entities_stop_at_the_window(tiny_models):
    path = tiny_models["token-classification"]
    adapter = TokenClassification("ents", TokenClassificationParams())
    text = " ".join(["Anna Berg visited Oslo."] * 300)
    results, _, truncated = run_task(_runner(adapter, path), [text], 4096)
    assert truncated == 1
    assert max(e["end"] for e in results[0][0]) < len(text) // 2


def test_chunk_needs_an_aggregation():
    with pytest.raises(ValueError, match="aggregation_strategy"):
        TokenClassification(
            "e", TokenClassificationParams(aggregation_strategy="none"), on_long_input="chunk"
        )
    with pytest.raises(ValueError, match="not supported"):
        TextClassification("s", on_long_input="chunk")


def test_int8_linear_quantizes_activations_to_8_bits():
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from transforms.models import place_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64)).eval()
    x = torch.randn(32, 256)
    x[0, 0] = 30.0  # one outlier sets the activations' scale, as in transformer FFNs
    exact = model(x)
    ours = place_model(copy.deepcopy(model), "cpu", "int8")
    # torch's stock dynamic Linear: 7-bit activations.
    stock = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: per_channel_dynamic_qconfig})

    our_error = (ours(x) - exact).abs().mean()
    stock_error = (stock(x) - exact).abs().mean()
    assert type(ours[0]).__name__ == "Int8Linear"
    assert our_error < 0.7 * stock_error


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, caplog, native):
    from transforms.models import place_model

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level("WARNING", logger="transforms.models"):
        place_model(torch.nn.Linear(4, 4).to(torch.bfloat16), "cpu", "bf16")
    warned = [r.getMessage() for r in caplog.records if "bf16 instructions" in r.getMessage()]
    assert bool(warned) is not native
