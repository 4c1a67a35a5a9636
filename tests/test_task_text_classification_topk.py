"""text-classification with `top_k`: several labels per row, against the pipeline."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import pipeline

from pipelines.cli import main
from pipelines.spec import SpecError, parse_spec
from pipelines.test_models import SENTIMENT_LABELS, TOXICITY_LABELS
from tests.conftest import SAMPLE_DATA
from transforms.inference import run_task
from transforms.models import resolve_model
from transforms.tasks.text_classification import TextClassification, TextClassificationParams

SMALL_BUDGET = 400
TOLERANCE = 1e-4


def _results(path, texts, **params):
    adapter = TextClassification("tox", TextClassificationParams(**params))
    runner = adapter.load(resolve_model(str(path)), "cpu", "fp32")
    results, errors, _ = run_task(runner, texts, SMALL_BUDGET)
    assert errors == [None] * len(texts)
    return results


@pytest.mark.parametrize(
    ("top_k", "function"),
    [(3, "default"), (None, "default"), (2, "softmax"), (None, "none"), (4, "sigmoid")],
)
def test_top_k_matches_pipeline(tiny_models, sample_texts, top_k, function):
    path = tiny_models["multi-label-classification"]
    texts = sample_texts[:24]
    results = _results(path, texts, top_k=top_k, function_to_apply=function)

    direct = pipeline("text-classification", model=str(path))
    extra = {} if function == "default" else {"function_to_apply": function}
    kept = len(TOXICITY_LABELS) if top_k is None else top_k
    for text, (labels, scores) in zip(texts, results, strict=True):
        expected = direct(text, top_k=top_k, **extra)
        assert len(labels) == len(scores) == kept
        assert labels == [e["label"] for e in expected]
        assert scores == pytest.approx([e["score"] for e in expected], abs=TOLERANCE)
        assert scores == sorted(scores, reverse=True)
    if function in ("default", "sigmoid"):  # a multi-label model: independent sigmoids
        assert all(0 < s < 1 for _, scores in results for s in scores)
    # Rows disagree on the ranking, so the order is not just the label order.
    assert len({tuple(labels) for labels, _ in results}) > 1


def test_top_k_one_keeps_the_single_label_columns(tiny_models, sample_texts):
    path = tiny_models["multi-label-classification"]
    one = TextClassification("tox", TextClassificationParams(top_k=1))
    many = TextClassification("tox", TextClassificationParams(top_k=None))
    assert [(f.name, f.type) for f in one.fields()] == [
        ("tox_label", pa.string()),
        ("tox_score", pa.float32()),
    ]
    assert [(f.name, f.type) for f in many.fields()] == [
        ("tox_labels", pa.list_(pa.string())),
        ("tox_scores", pa.list_(pa.float32())),
    ]
    best = _results(path, sample_texts[:12], top_k=1)
    ranked = _results(path, sample_texts[:12], top_k=None)
    for (label, score), (labels, scores) in zip(best, ranked, strict=True):
        assert (label, score) == (labels[0], scores[0])


def test_top_k_on_a_softmax_model_sums_to_one(tiny_models, sample_texts):
    results = _results(tiny_models["text-classification"], sample_texts[:12], top_k=None)
    for labels, scores in results:
        assert sorted(labels) == sorted(SENTIMENT_LABELS)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("top_k", [0, -1, True, 1.5])
def test_spec_rejects_bad_top_k(top_k):
    task = {"name": "t", "task": "text-classification", "params": {"top_k": top_k}}
    with pytest.raises(SpecError, match=r"tasks\[0\]\.params\.top_k"):
        parse_spec({"tasks": [task]})


def test_top_k_end_to_end(tmp_path, tiny_models):
    spec = tmp_path / "job.yaml"
    task = {
        "name": "tox",
        "task": "text-classification",
        "model": str(tiny_models["multi-label-classification"]),
        "max_batch_tokens": SMALL_BUDGET,
        "params": {"top_k": 3},
    }
    spec.write_text(json.dumps({"rows_per_chunk": 32, "tasks": [task]}))
    source = SAMPLE_DATA / "reviews.parquet"
    output = tmp_path / "out"
    assert main(["--input", str(source), "--output", str(output), "--spec", str(spec)]) == 0

    parts = sorted(output.glob("part-*.parquet"))
    result = pa.concat_tables(pq.read_table(p) for p in parts).sort_by("id")
    assert result.schema.field("tox_labels").type == pa.list_(pa.string())
    assert result.schema.field("tox_scores").type == pa.list_(pa.float32())
    assert "tox_label" not in result.column_names

    texts = result.column("text").to_pylist()
    direct = pipeline("text-classification", model=task["model"])
    for text, labels, scores in zip(
        texts,
        result.column("tox_labels").to_pylist(),
        result.column("tox_scores").to_pylist(),
        strict=True,
    ):
        expected = direct(text, top_k=3)
        assert labels == [e["label"] for e in expected]
        assert scores == pytest.approx([e["score"] for e in expected], abs=TOLERANCE)
    assert result.column("enrich_errors").to_pylist() == [[]] * result.num_rows
