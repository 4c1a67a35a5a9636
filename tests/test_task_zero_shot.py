"""zero-shot-classification, row by row, against the transformers pipeline."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import pipeline

from pipelines.cli import main
from pipelines.spec import SpecError, parse_spec
from tests.conftest import SAMPLE_DATA
from transforms.inference import run_task
from transforms.models import resolve_model
from transforms.tasks.base import InvalidInput, check_text
from transforms.tasks.zero_shot import ZeroShotClassification, ZeroShotClassificationParams

LABELS = ["sports", "politics", "business", "science and technology"]
SMALL_BUDGET = 500
TOLERANCE = 1e-4


def _runner(path, **params):
    adapter = ZeroShotClassification("topic", ZeroShotClassificationParams(**params))
    return adapter.load(resolve_model(str(path)), "cpu", "fp32")


@pytest.mark.parametrize(
    ("labels", "multi_label", "template"),
    [
        (LABELS, False, None),
        (LABELS, True, None),
        (["good news", "bad news", "neither"], False, "The text is about {}."),
        (["complaint"], False, None),  # one label: entailment against contradiction
    ],
)
def test_zero_shot_matches_pipeline(tiny_models, sample_texts, labels, multi_label, template):
    path = tiny_models["zero-shot-classification"]
    params = {"candidate_labels": labels, "multi_label": multi_label}
    if template is not None:
        params["hypothesis_template"] = template
    texts = sample_texts[:16]
    results, errors, truncated = run_task(_runner(path, **params), texts, SMALL_BUDGET)

    assert errors == [None] * len(texts)
    assert truncated == 0
    direct = pipeline("zero-shot-classification", model=str(path))
    call = {k: v for k, v in params.items() if k != "candidate_labels"}
    for text, (ranked, scores) in zip(texts, results, strict=True):
        expected = direct(text, candidate_labels=labels, **call)
        assert ranked == expected["labels"]
        assert scores == pytest.approx(expected["scores"], abs=TOLERANCE)
        assert scores == sorted(scores, reverse=True)
        if not multi_label and len(labels) > 1:
            assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    if len(labels) > 1:
        assert len({ranked[0] for ranked, _ in results}) > 1  # rows really differ
    if multi_label:  # independent per-label scores: they need not sum to one
        assert any(abs(sum(scores) - 1) > 0.05 for _, scores in results)


def test_rows_share_a_forward_pass(tiny_models, sample_texts):
    runner = _runner(tiny_models["zero-shot-classification"], candidate_labels=LABELS)
    batch_sizes = []
    hook = runner.pipe.model.register_forward_hook(
        lambda module, args, kwargs, output: batch_sizes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    try:
        results, _, _ = run_task(runner, sample_texts, 4096)
    finally:
        hook.remove()
    # Every pair ran, in far fewer forward passes than rows, several rows in each.
    assert sum(batch_sizes) == len(sample_texts) * len(LABELS)
    assert len(batch_sizes) < len(sample_texts) / 4
    assert max(batch_sizes) >= 4 * len(LABELS)
    assert all(size % len(LABELS) == 0 for size in batch_sizes)
    assert all(r is not None for r in results)


def test_long_premise_is_truncated_and_hypothesis_kept(tiny_models):
    path = tiny_models["zero-shot-classification"]
    long_text = " ".join(["The committee in Geneva discussed the annual report again."] * 120)
    runner = _runner(path, candidate_labels=LABELS)
    (item,) = runner.prepare([long_text])
    assert item.truncated
    tokenizer = runner.pipe.tokenizer
    for ids, label in zip(item.input_ids, LABELS, strict=True):
        assert len(ids) == 512
        assert tokenizer.decode(ids, skip_special_tokens=True).endswith(f"this example is {label}.")
    results, errors, truncated = run_task(runner, [long_text, "short text"], SMALL_BUDGET)
    assert errors == [None, None] and truncated == 1

    direct = pipeline("zero-shot-classification", model=str(path))
    expected = direct(long_text, candidate_labels=LABELS)
    assert results[0][0] == expected["labels"]
    np.testing.assert_allclose(results[0][1], expected["scores"], atol=TOLERANCE)


def test_bad_rows_fail_alone(tiny_models, sample_texts):
    runner = _runner(tiny_models["zero-shot-classification"], candidate_labels=LABELS)
    inputs = [check_text(v) for v in [sample_texts[0], None, "  ", sample_texts[1]]]
    results, errors, _ = run_task(runner, inputs, SMALL_BUDGET)
    assert errors[1] == "InvalidInput: text is null"
    assert errors[2] == "InvalidInput: text is empty"
    assert errors[0] is None and errors[3] is None
    assert results[1] is None and results[0] is not None
    assert isinstance(check_text(None), InvalidInput)


def test_model_without_entailment_label_is_refused(tiny_models):
    adapter = ZeroShotClassification("topic", ZeroShotClassificationParams(candidate_labels=["a"]))
    with pytest.raises(ValueError, match=r"no label starting with 'entail'.*NEGATIVE, POSITIVE"):
        adapter.load(resolve_model(str(tiny_models["text-classification"])), "cpu", "fp32")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, r"tasks\[0\]\.params\.candidate_labels: Field required"),
        ({"candidate_labels": []}, r"candidate_labels: .*at least 1 item"),
        ({"candidate_labels": ["a", "b", "a"]}, r"must be unique; repeated: a"),
        ({"candidate_labels": ["a", " "]}, r"must be non-empty strings"),
        ({"candidate_labels": ["a"], "hypothesis_template": "About it."}, r"must contain \{\}"),
        ({"candidate_labels": ["a"], "multi_label": "yes"}, r"params\.multi_label"),
        ({"candidate_labels": ["a"], "labels": ["b"]}, r"params\.labels: unknown key"),
    ],
)
def test_spec_validates_params(params, message):
    task = {"name": "topic", "task": "zero-shot-classification", "params": params}
    with pytest.raises(SpecError, match=message):
        parse_spec({"tasks": [task]})


def test_spec_without_params_is_rejected():
    with pytest.raises(SpecError, match=r"tasks\[0\]\.params.*: Field required"):
        parse_spec({"tasks": [{"name": "topic", "task": "zero-shot-classification"}]})
    with pytest.raises(ValueError, match=r"needs params\.candidate_labels"):
        ZeroShotClassification("topic")


def test_zero_shot_end_to_end(tmp_path, tiny_models):
    model = str(tiny_models["zero-shot-classification"])
    task = {
        "name": "topic",
        "task": "zero-shot-classification",
        "model": model,
        "max_batch_tokens": SMALL_BUDGET,
        "params": {"candidate_labels": LABELS, "multi_label": True},
    }
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"rows_per_chunk": 8, "tasks": [task]}))
    source = tmp_path / "reviews.parquet"
    pq.write_table(pq.read_table(SAMPLE_DATA / "reviews.parquet").slice(0, 20), source)
    output = tmp_path / "out"
    assert main(["--input", str(source), "--output", str(output), "--spec", str(spec)]) == 0

    parts = sorted(output.glob("part-*.parquet"))
    result = pa.concat_tables(pq.read_table(p) for p in parts).sort_by("id")
    original = pq.read_table(source)
    assert result.column_names == [
        *original.column_names,
        "topic_labels",
        "topic_scores",
        "enrich_errors",
    ]
    assert result.schema.field("topic_labels").type == pa.list_(pa.string())
    assert result.schema.field("topic_scores").type == pa.list_(pa.float32())
    direct = pipeline("zero-shot-classification", model=model)
    rows = zip(
        result.column("text").to_pylist(),
        result.column("topic_labels").to_pylist(),
        result.column("topic_scores").to_pylist(),
        strict=True,
    )
    for text, labels, scores in rows:
        expected = direct(text, candidate_labels=LABELS, multi_label=True)
        assert labels == expected["labels"]
        assert scores == pytest.approx(expected["scores"], abs=TOLERANCE)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["tasks"][0]["parameters"] == {
        "candidate_labels": LABELS,
        "multi_label": True,
        "hypothesis_template": "This example is {}.",
    }
