"""Repeated inputs computed once: the same results as without, failures still per row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import EchoRunner
from transforms.dedup import ResultCache, input_key
from transforms.inference import LoadedModel, TaskBinding, apply_task, run_rows
from transforms.models import resolve_model
from transforms.tasks.base import check_text
from transforms.tasks.feature_extraction import FeatureExtraction
from transforms.tasks.question_answering import QuestionAnswering, QuestionAnsweringParams
from transforms.tasks.seq2seq import Summarization, SummarizationParams
from transforms.tasks.text_classification import TextClassification
from transforms.tasks.text_generation import TextGeneration, TextGenerationParams
from transforms.tasks.token_classification import TokenClassification

BUDGET = 400


class CountingRunner(EchoRunner):
    """An `EchoRunner` that remembers every row it ran."""

    def __init__(self):
        self.ran: list[str] = []

    def infer(self, items):
        outputs = super().infer(items)
        self.ran.extend(items)
        return outputs


def test_input_keys_are_equal_for_equal_inputs_only():
    assert input_key("a b") == input_key("a b")
    assert input_key("a b") != input_key("a  b")
    assert input_key(("q", "ctx")) == input_key(("q", "ctx"))
    assert input_key(("q", "ctx")) != input_key("('q', 'ctx')")
    assert input_key(("q", "ctx")) != input_key(["q", "ctx"])
    assert input_key(1) != input_key(True) != input_key(1.0)
    assert input_key("\ud800") == input_key("\ud800")  # a lone surrogate still keys
    # Values whose repr may not be the whole value are never keyed.
    assert input_key(np.arange(5000)) is None
    assert input_key(("q", object())) is None


def test_cache_drops_least_recently_used_past_either_bound():
    cache = ResultCache(max_entries=2, max_bytes=10**6)
    cache.put(b"a", ("A",))
    cache.put(b"b", ("B",))
    assert cache.get(b"a") == ("A",)  # now b is the least recently used
    cache.put(b"c", ("C",))
    assert (cache.get(b"a"), cache.get(b"b"), cache.get(b"c")) == (("A",), None, ("C",))

    small = ResultCache(max_entries=100, max_bytes=3_000)
    vector = np.zeros(128, dtype=np.float32)  # 512 bytes
    for key in range(10):
        small.put(bytes([key]), (vector,))
    assert 0 < len(small) < 10
    assert small.get(bytes([9])) is not None and small.get(bytes([0])) is None
    small.put(b"huge", (np.zeros(10_000, dtype=np.float32),))  # larger than the cache
    assert small.get(b"huge") is None


def test_repeats_run_once_and_failures_count_per_row():
    texts = ["alpha", "beta", "alpha", "BOOM", None, "BOOM", "alpha", "", "beta"]
    runner = CountingRunner()
    run = run_rows(runner, [check_text(t) for t in texts], 10_000, dedup=True)

    assert sorted(runner.ran) == ["alpha", "beta"]
    assert run.results == [
        ("ALPHA",),
        ("BETA",),
        ("ALPHA",),
        None,
        None,
        None,
        ("ALPHA",),
        None,
        ("BETA",),
    ]
    assert run.errors[3] == run.errors[5] == "RuntimeError: model exploded"
    assert sum(error is not None for error in run.errors) == 4
    assert run.cached == 3  # two repeats of alpha, one of beta; failed repeats are not

    plain = run_rows(CountingRunner(), [check_text(t) for t in texts], 10_000)
    assert (plain.results, plain.errors, plain.cached) == (run.results, run.errors, 0)


def test_cache_serves_later_chunks_and_never_keeps_errors():
    loaded = LoadedModel(CountingRunner(), "cpu", "fp32")
    first = loaded.run_measured(["x", "y", "BOOM"], 10_000, dedup=True)
    second = loaded.run_measured(["y", "z", "x", "BOOM"], 10_000, dedup=True)

    assert loaded.runner.ran == ["x", "y", "z"]
    assert first.cached == 0 and second.cached == 2
    assert second.results == [("Y",), ("Z",), ("X",), None]
    assert second.errors[3] == "RuntimeError: model exploded"  # ran again, failed again
    # Without dedup (a sampling task) every row runs, cache or not.
    third = loaded.run_measured(["x", "x"], 10_000)
    assert third.cached == 0 and loaded.runner.ran[-2:] == ["x", "x"]


def _same(a, b) -> bool:
    """Equal, with floats within a batched forward pass's rounding."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (float, np.ndarray, np.floating)):
        return np.allclose(a, b, atol=1e-5)
    return a == b


def _texts(sample_texts) -> list:
    # Half the rows repeat earlier ones, scattered, so repeats land in other micro-batches.
    base = [text for text in sample_texts if len(text) < 400][:8]
    return [*base, base[3], base[0], base[3], base[7], base[1], base[0], base[5], base[3]]


@pytest.mark.parametrize(
    "family, adapter",
    [
        ("text-classification", TextClassification("s")),
        ("token-classification", TokenClassification("ner")),
        ("feature-extraction", FeatureExtraction("e")),
        ("text-generation", TextGeneration("g", TextGenerationParams(max_new_tokens=6))),
        (
            "text-generation",
            TextGeneration("g", TextGenerationParams(max_new_tokens=6, do_sample=True, seed=7)),
        ),
        ("summarization", Summarization("sum", SummarizationParams(max_length=8, num_beams=1))),
    ],
    ids=["sentiment", "ner", "embedding", "greedy", "seeded-sampling", "summarization"],
)
def test_dedup_gives_the_results_of_running_every_row(tiny_models, sample_texts, family, adapter):
    assert adapter.deterministic
    runner = adapter.load(resolve_model(str(tiny_models[family])), "cpu", "fp32")
    inputs = adapter.row_inputs({adapter.input_column: [*_texts(sample_texts), None]})
    plain = run_rows(runner, inputs, BUDGET)
    deduplicated = run_rows(runner, inputs, BUDGET, dedup=True, cache=ResultCache())

    assert deduplicated.cached == 8
    assert sum(rows for rows, _ in deduplicated.batches) == 8  # distinct rows only
    assert deduplicated.errors == plain.errors
    assert deduplicated.truncated == plain.truncated
    assert _same(deduplicated.results, plain.results)


def test_question_answering_dedups_on_question_and_context(tiny_models, sample_texts):
    adapter = QuestionAnswering("qa", QuestionAnsweringParams(question_column="q"))
    runner = adapter.load(resolve_model(str(tiny_models["question-answering"])), "cpu", "fp32")
    contexts = _texts(sample_texts)
    # The same context with another question is another input.
    questions = ["What happened?"] * 12 + ["Who said it?"] * 4
    inputs = adapter.row_inputs({"text": contexts, "q": questions})
    plain = run_rows(runner, inputs, BUDGET)
    deduplicated = run_rows(runner, inputs, BUDGET, dedup=True)

    distinct = len(set(zip(questions, contexts, strict=True)))
    assert deduplicated.cached == len(contexts) - distinct > 0
    assert deduplicated.errors == plain.errors
    assert _same(deduplicated.results, plain.results)


def test_sampling_without_a_seed_runs_every_row(tiny_models, sample_texts):
    adapter = TextGeneration("g", TextGenerationParams(max_new_tokens=4, do_sample=True))
    summarize = Summarization("s", SummarizationParams(do_sample=True))
    assert not adapter.deterministic and not summarize.deterministic
    binding = TaskBinding(adapter, resolve_model(str(tiny_models["text-generation"])), device="cpu")
    loaded = LoadedModel(adapter.load(binding.model, "cpu", "fp32"), "cpu", "fp32")
    texts = ["Once upon a time"] * 6
    _, stats = apply_task(binding, loaded, pa.table({"text": texts}))
    assert stats.cached == 0 and stats.rows == 6 and len(loaded.cache) == 0


def test_task_stats_count_cached_rows(tiny_models):
    adapter = TextClassification("s")
    binding = TaskBinding(
        adapter, resolve_model(str(tiny_models["text-classification"])), device="cpu"
    )
    loaded = LoadedModel(adapter.load(binding.model, "cpu", "fp32"), "cpu", "fp32")
    table = pa.table({"text": ["Good.", "Bad.", "Good.", None, None, "Good."]})
    out, stats = apply_task(binding, loaded, table)
    again, second = apply_task(binding, loaded, table)

    assert (stats.rows, stats.failed, stats.cached) == (6, 2, 2)
    assert (second.rows, second.failed, second.cached) == (6, 2, 4)
    assert again.column("s_label").to_pylist() == out.column("s_label").to_pylist()
    assert (stats.counts + second.counts).cached == 6


def test_manifest_counts_rows_served_from_the_cache(tmp_path, tiny_models):
    import json

    import pyarrow.parquet as pq

    from pipelines.cli import main
    from tests.conftest import sentiment_ner_spec

    texts = ["Great kettle.", "Broke in a week.", "Great kettle.", None, "Great kettle.", ""]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(6)), "text": texts}), source)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(sentiment_ner_spec(tiny_models, rows_per_chunk=3)))
    output = tmp_path / "out"
    argv = ["--input", str(source), "--output", str(output), "--spec", str(spec)]
    assert main(argv) == 0

    manifest = json.loads((output / "manifest.json").read_text())
    for task in manifest["tasks"]:
        # Chunk 1 holds a repeat; chunk 2 repeats a text of chunk 1: one row group is one
        # work item, read by one worker, whose cache serves it.
        assert (task["rows"], task["failed"], task["cached"]) == (6, 2, 2), task["name"]
    rows = pa.concat_tables(pq.read_table(p) for p in output.glob("part-*.parquet"))
    rows = rows.sort_by("id").to_pylist()
    assert rows[0]["sentiment_score"] == rows[2]["sentiment_score"] == rows[4]["sentiment_score"]
    assert rows[0]["entities"] == rows[4]["entities"]
