"""question-answering against a brute-force span search written here, row by row.

transformers 5 has no question-answering pipeline to compare with, so the reference is
the 4.x pipeline's rules spelled out plainly: each window run alone (unbatched), a
softmax over the context tokens and CLS, every (start, end) pair scored, the best
`top_k * 2 + 10` per window (`top_k` without word alignment) mapped to characters, equal
texts merged (ignoring case) with their scores summed, the null answer added last.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from pipelines.cli import main
from pipelines.spec import parse_spec
from transforms.inference import run_task
from transforms.models import resolve_model
from transforms.tasks.question_answering import (
    ANSWER_TYPE,
    QuestionAnswering,
    QuestionAnsweringParams,
)

SMALL_BUDGET = 500
TOLERANCE = 1e-4
QUESTIONS = ("What did they discuss?", "Who wrote it?", "Where is the office?", "why")


def _cases(sample_texts) -> tuple[list[str], list[str]]:
    """Questions and contexts: the sample rows, two long contexts, and short ones where
    the null answer can win."""
    long_context = " ".join(sample_texts[:20])
    words = " ".join(sample_texts).split()
    shorts = [" ".join(words[i : i + 1 + i % 3]) for i in range(0, 210, 7)]
    contexts = [*sample_texts[:40], long_context, long_context[:2500], *shorts]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(contexts))]
    return questions, contexts


class _BruteForce:
    """The reference: one window at a time, every span pair searched."""

    def __init__(self, path):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForQuestionAnswering.from_pretrained(path).eval()
        self.windows_seen: list[int] = []

    def __call__(self, question: str, context: str, params, chunk: bool = True) -> list[dict]:
        tok = self.tokenizer
        encoded = tok(
            question,
            context,
            truncation="only_second",
            max_length=params.max_seq_len,
            stride=params.stride,
            return_overflowing_tokens=True,
        )
        windows = range(len(encoded["input_ids"])) if chunk else range(1)
        self.windows_seen.append(len(windows))
        pre_top_k = params.top_k * 2 + 10 if params.align_to_words else params.top_k
        answers: list[dict] = []
        null = None
        for w in windows:
            enc = encoded.encodings[w]
            with torch.no_grad():
                out = self.model(
                    input_ids=torch.tensor([enc.ids]),
                    token_type_ids=torch.tensor([enc.type_ids]),
                )
            context_tokens = [i for i, sid in enumerate(enc.sequence_ids) if sid == 1]
            allowed = torch.zeros(len(enc.ids), dtype=torch.bool)
            allowed[context_tokens] = True
            allowed[0] = True  # CLS: the null answer
            p_start = _softmax(out.start_logits[0], allowed).tolist()
            p_end = _softmax(out.end_logits[0], allowed).tolist()
            window_null = p_start[0] * p_end[0]
            null = window_null if null is None else min(null, window_null)
            spans = [
                (p_start[s] * p_end[e], s, e)
                for s in context_tokens
                for e in context_tokens
                if s <= e < s + params.max_answer_len
            ]
            spans.sort(key=lambda span: -span[0])
            for score, s, e in spans[:pre_top_k]:
                start, end = self._chars(enc, s, e, params.align_to_words)
                text = context[start:end]
                same = [a for a in answers if a["answer"].lower() == text.lower()]
                if same:
                    same[0]["score"] += score
                else:
                    answers.append({"answer": text, "score": score, "start": start, "end": end})
        if params.handle_impossible_answer:
            answers.append({"answer": "", "score": null, "start": 0, "end": 0})
        return sorted(answers, key=lambda a: -a["score"])[: params.top_k]

    @staticmethod
    def _chars(enc, s: int, e: int, align: bool) -> tuple[int, int]:
        if align:
            return (
                enc.word_to_chars(enc.token_to_word(s), sequence_index=1)[0],
                enc.word_to_chars(enc.token_to_word(e), sequence_index=1)[1],
            )
        return enc.offsets[s][0], enc.offsets[e][1]


def _softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double().masked_fill(~allowed, float("-inf")), dim=-1)


def _run(path, params, questions, contexts, on_long_input="chunk"):
    adapter = QuestionAnswering("qa", params, input_column="context", on_long_input=on_long_input)
    runner = adapter.load(resolve_model(str(path)), "cpu", "fp32")
    columns = {"context": contexts}
    if params.question_column:
        columns[params.question_column] = questions
    return run_task(runner, adapter.row_inputs(columns), SMALL_BUDGET)


def _assert_same(ours: dict, expected: dict, context: str) -> None:
    assert (ours["answer"], ours["start"], ours["end"]) == (
        expected["answer"],
        expected["start"],
        expected["end"],
    )
    assert ours["score"] == pytest.approx(expected["score"], abs=TOLERANCE)
    assert context[ours["start"] : ours["end"]] == ours["answer"]


def _best(result: tuple) -> dict:
    return dict(zip(["answer", "score", "start", "end"], result[:4], strict=True))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_seq_len": 96, "doc_stride": 32},
        {"top_k": 3, "handle_impossible_answer": True, "max_seq_len": 96, "doc_stride": 32},
        {"top_k": 2, "align_to_words": False, "max_answer_len": 4, "max_seq_len": 128},
    ],
    ids=["defaults", "windows", "top3-impossible", "offsets"],
)
def test_answers_match_brute_force(tiny_models, sample_texts, options):
    path = tiny_models["question-answering"]
    params = QuestionAnsweringParams(question_column="question", **options)
    questions, contexts = _cases(sample_texts)
    results, errors, truncated = _run(path, params, questions, contexts)

    assert errors == [None] * len(contexts)
    assert truncated == 0  # chunked: every window is read
    reference = _BruteForce(path)
    nulls = 0
    for question, context, result in zip(questions, contexts, results, strict=True):
        expected = reference(question, context, params)
        _assert_same(_best(result), expected[0], context)
        if params.top_k > 1:
            assert len(result[4]) == len(expected)
            for ours, theirs in zip(result[4], expected, strict=True):
                _assert_same(ours, theirs, context)
            assert result[4][0] == _best(result)
        nulls += result[0] == ""
    # The long contexts span several windows, and null answers do win sometimes.
    assert max(reference.windows_seen) >= (3 if "max_seq_len" in options else 2)
    if params.handle_impossible_answer:
        assert 0 < nulls < len(contexts)
        assert all(_best(r)["start"] == _best(r)["end"] == 0 for r in results if r[0] == "")


def test_truncate_reads_the_first_window_only(tiny_models, sample_texts):
    path = tiny_models["question-answering"]
    params = QuestionAnsweringParams(question="What happened?", max_seq_len=96, doc_stride=32)
    contexts = sample_texts[:30]
    results, errors, truncated = _run(path, params, [], contexts, on_long_input="truncate")

    assert errors == [None] * len(contexts)
    reference = _BruteForce(path)
    for context, result in zip(contexts, results, strict=True):
        expected = reference("What happened?", context, params, chunk=False)
        _assert_same(_best(result), expected[0], context)
    windows = [
        len(reference.tokenizer("What happened?", c, **_window_options(params))["input_ids"])
        for c in contexts
    ]
    assert truncated == sum(n > 1 for n in windows) > 0


def _window_options(params) -> dict:
    return {
        "truncation": "only_second",
        "max_length": params.max_seq_len,
        "stride": params.doc_stride,
        "return_overflowing_tokens": True,
    }


def test_bad_rows_fail_alone(tiny_models, sample_texts):
    path = tiny_models["question-answering"]
    params = QuestionAnsweringParams(question_column="question", max_seq_len=64, doc_stride=32)
    long_question = "what " * 40
    questions = ["Who?", None, "  ", "Who?", long_question, long_question, "Who?"]
    long_context = " ".join(sample_texts[:5])
    contexts = [sample_texts[0], sample_texts[1], sample_texts[2], None, long_context, "ok", ""]
    results, errors, _ = _run(path, params, questions, contexts)

    assert errors[1] == "InvalidInput: question is null"
    assert errors[2] == "InvalidInput: question is empty"
    assert errors[3] == "InvalidInput: context is null"
    assert errors[4].startswith("InvalidInput: the question takes 40 tokens, leaving 21 of")
    assert "lower doc_stride" in errors[4]
    assert errors[6] == "InvalidInput: context is empty"
    # A long question with a context short enough to need no window still runs.
    for row in (0, 5):
        assert errors[row] is None and results[row][0]
    assert [r is None for r in results] == [e is not None for e in errors]


def test_fields_follow_top_k():
    one = QuestionAnswering("qa", QuestionAnsweringParams(question="Why?"))
    assert [(f.name, f.type) for f in one.fields()] == [
        ("qa_answer", pa.string()),
        ("qa_score", pa.float32()),
        ("qa_start", pa.int32()),
        ("qa_end", pa.int32()),
    ]
    three = QuestionAnswering("qa", QuestionAnsweringParams(question="Why?", top_k=3))
    assert three.fields()[-1] == pa.field("qa_answers", pa.list_(ANSWER_TYPE))
    assert [f.name for f in ANSWER_TYPE] == ["answer", "score", "start", "end"]
    column = QuestionAnswering(
        "qa", QuestionAnsweringParams(question_column="q"), input_column="body"
    )
    assert column.read_columns() == ["body", "q"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "exactly one of `question_column`"),
        ({"question": "Why?", "question_column": "q"}, "exactly one of `question_column`"),
        ({"question": "  "}, "`question` is empty"),
        ({"question": "Why?", "doc_stride": 200, "max_seq_len": 200}, "must be smaller"),
        ({"question": "Why?", "top_k": 0}, "greater than or equal to 1"),
    ],
)
def test_params_are_validated(params, message):
    with pytest.raises(ValidationError, match=message):
        QuestionAnsweringParams(**params)


def test_doc_stride_defaults_as_in_4x():
    assert QuestionAnsweringParams(question="Why?").stride == 128
    assert QuestionAnsweringParams(question="Why?", max_seq_len=100).stride == 50


@pytest.mark.parametrize("source", ["column", "constant"])
def test_question_answering_end_to_end(tmp_path, tiny_models, sample_texts, source):
    path = tiny_models["question-answering"]
    questions, contexts = _cases(sample_texts)
    questions, contexts = questions[:16] + questions[40:42], contexts[:16] + contexts[40:42]
    if source == "constant":
        questions = ["What is it about?"] * len(contexts)
        params = {"question": "What is it about?", "top_k": 2}
    else:
        params = {"question_column": "question", "top_k": 2}
    table = {"id": list(range(len(contexts))), "body": contexts, "question": questions}
    input_path = tmp_path / "in.parquet"
    pq.write_table(pa.table(table), input_path)
    task = {
        "name": "qa",
        "task": "question-answering",
        "model": str(path),
        "input": "body",
        "on_long_input": "chunk",
        "max_batch_tokens": 2000,
        "params": {**params, "max_seq_len": 128, "doc_stride": 48},
    }
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"rows_per_chunk": 8, "tasks": [task]}))
    output = tmp_path / "out"
    assert main(["--input", str(input_path), "--output", str(output), "--spec", str(spec)]) == 0

    parts = sorted(output.glob("part-*.parquet"))
    result = pa.concat_tables(pq.read_table(p) for p in parts).sort_by("id")
    assert result.column_names == [
        "id",
        "body",
        "question",
        "qa_answer",
        "qa_score",
        "qa_start",
        "qa_end",
        "qa_answers",
        "enrich_errors",
    ]
    assert result.schema.field("qa_score").type == pa.float32()
    assert result.schema.field("qa_start").type == pa.int32()
    assert result.schema.field("qa_answers").type == pa.list_(ANSWER_TYPE)
    assert result.column("enrich_errors").to_pylist() == [[]] * len(contexts)

    expected_params = QuestionAnsweringParams(
        question_column="question", top_k=2, max_seq_len=128, doc_stride=48
    )
    reference = _BruteForce(path)
    rows = result.to_pylist()
    for question, context, row in zip(questions, contexts, rows, strict=True):
        expected = reference(question, context, expected_params)
        best = {key: row[f"qa_{key}"] for key in ("answer", "score", "start", "end")}
        _assert_same(best, expected[0], context)
        for ours, theirs in zip(row["qa_answers"], expected, strict=True):
            _assert_same(ours, theirs, context)
    assert max(reference.windows_seen) > 1


def test_whole_context_is_read_by_default(tiny_models, sample_texts):
    """As 4.x did: an answer past the model's first window is found without any option,
    and only `on_long_input: truncate` misses it."""
    path = tiny_models["question-answering"]
    params = QuestionAnsweringParams(question_column="question", max_seq_len=96, doc_stride=32)
    contexts = [" ".join(sample_texts[i : i + 6]) for i in range(0, 36, 6)]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(contexts))]
    spec = parse_spec(
        {"tasks": [{"name": "qa", "task": "question-answering", "params": {"question": "Why?"}}]}
    )
    assert spec.tasks[0].on_long_input == "chunk"
    assert QuestionAnswering("qa", params).on_long_input == "chunk"

    adapter = QuestionAnswering("qa", params, input_column="context")  # the default
    runner = adapter.load(resolve_model(str(path)), "cpu", "fp32")
    columns = {"context": contexts, "question": questions}
    by_default, errors, truncated = run_task(runner, adapter.row_inputs(columns), SMALL_BUDGET)
    assert errors == [None] * len(contexts) and truncated == 0
    cut, _, cut_rows = _run(path, params, questions, contexts, on_long_input="truncate")
    assert cut_rows == len(contexts)

    reference = _BruteForce(path)
    first_window_ends = []
    for question, context, whole, first in zip(questions, contexts, by_default, cut, strict=True):
        _assert_same(_best(whole), reference(question, context, params)[0], context)
        _assert_same(_best(first), reference(question, context, params, chunk=False)[0], context)
        window = reference.tokenizer(question, context, **_window_options(params)).encodings[0]
        first_window_ends.append(
            max(
                end
                for (_, end), sid in zip(window.offsets, window.sequence_ids, strict=True)
                if sid == 1
            )
        )
    # Some answers lie past the first window: found by default, not when truncated.
    beyond = [
        i
        for i, (row, end) in enumerate(zip(by_default, first_window_ends, strict=True))
        if _best(row)["start"] >= end
    ]
    assert len(beyond) >= 2
    assert all(_best(by_default[i])["answer"] != _best(cut[i])["answer"] for i in beyond)
