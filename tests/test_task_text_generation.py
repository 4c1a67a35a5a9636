"""text-generation, row by row, against plain decoding loops written here."""

from __future__ import annotations

import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from pipelines.cli import main
from pipelines.spec import SpecError, parse_spec
from transforms.batching import plan_batches
from transforms.inference import run_task
from transforms.models import resolve_model
from transforms.tasks.base import InvalidInput
from transforms.tasks.text_generation import (
    TextGeneration,
    TextGenerationParams,
    read_blocklist,
)

# A small budget: several left-padded micro-batches of rows of different lengths.
SMALL_BUDGET = 400
NEW_TOKENS = 12


def _runner(path, name="gen", **params):
    adapter = TextGeneration(name, TextGenerationParams(**params))
    return adapter.load(resolve_model(str(path)), "cpu", "fp32")


@pytest.fixture(scope="module")
def texts(sample_texts):
    """Sample texts short enough to leave room for NEW_TOKENS in the 256-token context."""
    return [text for text in sample_texts if len(text) < 600]


@pytest.fixture(scope="module")
def reference(tiny_models):
    path = tiny_models["text-generation"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _decode_loop(model, ids, max_new, eos, choose):
    """One row, no padding, no cache: the whole sequence through the model each step."""
    sequence = list(ids)
    with torch.inference_mode():
        for _ in range(max_new):
            logits = model(torch.tensor([sequence])).logits[0, -1].float()
            token = int(choose(logits))
            if token == eos:
                break
            sequence.append(token)
    return sequence[len(ids) :]


_GREEDY: dict[tuple, list[int]] = {}


def _greedy(model, ids, max_new=NEW_TOKENS, eos=None):
    eos = model.generation_config.eos_token_id if eos is None else eos
    key = (id(model), tuple(ids), max_new, eos)  # several tests decode the same rows
    if key not in _GREEDY:
        _GREEDY[key] = _decode_loop(model, ids, max_new, eos, torch.argmax)
    return _GREEDY[key]


def _sampled(model, ids, seed, temperature, top_k, max_new=NEW_TOKENS):
    # Gumbel-max with one generator per row: argmax(logits / T + Gumbel) restricted to
    # the top k is an exact draw from the tempered top-k softmax.
    generator = torch.Generator().manual_seed(seed)

    def choose(logits):
        scores = logits / temperature
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
        uniform = torch.rand(scores.shape, generator=generator).clamp_min(
            torch.finfo(torch.float32).tiny
        )
        return torch.argmax(scores - torch.log(-torch.log(uniform)))

    return _decode_loop(model, ids, max_new, model.generation_config.eos_token_id, choose)


def _long_text() -> str:
    return "The committee in Geneva discussed the annual report again. " * 60


def test_greedy_matches_a_plain_loop_row_by_row(tiny_models, sample_texts, reference):
    model, tokenizer = reference
    runner = _runner(tiny_models["text-generation"], max_new_tokens=NEW_TOKENS)
    texts = [*sample_texts[:40], _long_text(), sample_texts[0]]
    results, errors, truncated = run_task(runner, texts, SMALL_BUDGET)

    limit = 256 - NEW_TOKENS
    too_long = [i for i, t in enumerate(texts) if len(tokenizer(t)["input_ids"]) > limit]
    assert truncated == 0  # prompts are never cut
    assert 40 in too_long and len(too_long) < 4
    for row in too_long:
        assert (
            errors[row].startswith("InvalidInput: prompt is ") and "context of 256" in errors[row]
        )
        assert results[row] is None
    items = [item for item in runner.prepare(texts) if not isinstance(item, InvalidInput)]
    batches = plan_batches([runner.cost(item) for item in items], SMALL_BUDGET)
    padded = [b for b in batches if len({len(items[i].input_ids) for i in b}) > 1]
    assert len(batches) > 3 and padded  # left padding really happens
    # Token ids, straight from generate over one padded batch of every length.
    generated = runner.generate(items)
    for item, ids in zip(items, generated, strict=True):
        assert ids == _greedy(model, item.input_ids)
    # Strings, through run_task's length-sorted micro-batches.
    for row, text in enumerate(texts):
        if row in too_long:
            continue
        assert errors[row] is None
        expected = _greedy(model, tokenizer(text)["input_ids"])
        assert results[row] == (tokenizer.decode(expected, skip_special_tokens=True),)
    assert results[0] == results[-1]
    assert len({result for result in results if result}) > 30  # rows really differ


def test_rows_that_reach_end_of_sequence_stop_inside_a_batch(tmp_path, tiny_models, reference):
    model, tokenizer = reference
    # Make a token the tiny model often writes its end of sequence, so rows of one
    # micro-batch finish at different steps.
    path = tmp_path / "gen"
    shutil.copytree(tiny_models["text-generation"], path)
    texts = [
        "Great headphones. Love them.",
        "The parser reads each line of the file.",
        "Return a new dictionary.",
        "Errors are logged to the console and the job stops.",
        "A date with a time zone.",
        "Write the rows to a CSV file.",
    ]
    counts: dict[int, int] = {}
    for text in texts:
        for token in _greedy(model, tokenizer(text)["input_ids"], 16)[1:]:
            counts[token] = counts.get(token, 0) + 1
    eos = max(counts, key=counts.get)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = eos
        (path / name).write_text(json.dumps(config))

    runner = _runner(path, max_new_tokens=16)
    generated = runner.generate(runner.prepare(texts))
    lengths = set()
    for text, ids in zip(texts, generated, strict=True):
        expected = _greedy(model, tokenizer(text)["input_ids"], 16, eos=eos)
        assert ids == expected
        lengths.add(len(ids))
    assert len(lengths) > 1 and min(lengths) < 16


def test_stop_strings_cut_the_output_and_end_the_row(tiny_models, texts, reference):
    model, tokenizer = reference
    stops = ["on", "\n", "ex"]
    runner = _runner(tiny_models["text-generation"], max_new_tokens=NEW_TOKENS, stop=stops)
    texts = texts[:24]
    results, errors, _ = run_task(runner, texts, SMALL_BUDGET)

    assert errors == [None] * len(texts)
    cut = 0
    for text, (output,) in zip(texts, results, strict=True):
        full = tokenizer.decode(_greedy(model, tokenizer(text)["input_ids"]))
        positions = [full.find(stop) for stop in stops if stop in full]
        expected = full[: min(positions)] if positions else full
        assert output == expected
        assert not any(stop in output for stop in stops)
        cut += bool(positions)
    assert 0 < cut < len(texts)
    # Rows whose stop string came early stopped generating there.
    generated = runner.generate(runner.prepare(texts))
    assert min(len(ids) for ids in generated) < NEW_TOKENS


def test_full_text_matches_the_transformers_pipeline(tiny_models, texts):
    path = tiny_models["text-generation"]
    runner = _runner(path, max_new_tokens=NEW_TOKENS, return_full_text=True)
    continuation = _runner(path, max_new_tokens=NEW_TOKENS)
    texts = texts[:10]
    results, errors, _ = run_task(runner, texts, SMALL_BUDGET)
    continued, _, _ = run_task(continuation, texts, SMALL_BUDGET)

    assert errors == [None] * len(texts)
    direct = pipeline("text-generation", model=str(path))
    for text, (full,), (new,) in zip(texts, results, continued, strict=True):
        assert full == text + new
        expected = direct(text, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert full == expected[0]["generated_text"]


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_models, texts, reference):
    model, tokenizer = reference
    path = tiny_models["text-generation"]
    params = {"max_new_tokens": NEW_TOKENS, "do_sample": True, "temperature": 0.8, "top_k": 40}
    texts = texts[:16]
    first, errors, _ = run_task(_runner(path, seed=7, **params), texts, SMALL_BUDGET)
    # Another run, reversed, with all rows in one micro-batch.
    again, _, _ = run_task(_runner(path, seed=7, **params), texts[::-1], 1_000_000)
    other, _, _ = run_task(_runner(path, seed=8, **params), texts, SMALL_BUDGET)
    greedy, _, _ = run_task(_runner(path, max_new_tokens=NEW_TOKENS), texts, SMALL_BUDGET)

    assert errors == [None] * len(texts)
    assert first == again[::-1]
    assert sum(a != b for a, b in zip(first, other, strict=True)) > len(texts) // 2
    assert sum(a != b for a, b in zip(first, greedy, strict=True)) > len(texts) // 2
    for text, (output,) in list(zip(texts, first, strict=True))[:6]:
        expected = _sampled(model, tokenizer(text)["input_ids"], 7, 0.8, 40)
        assert output == tokenizer.decode(expected, skip_special_tokens=True)


def test_unseeded_sampling_with_top_k_1_is_greedy(tiny_models, texts):
    path = tiny_models["text-generation"]
    texts = texts[:12]
    sampled, errors, _ = run_task(
        _runner(path, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1), texts, SMALL_BUDGET
    )
    greedy, _, _ = run_task(_runner(path, max_new_tokens=NEW_TOKENS), texts, SMALL_BUDGET)
    assert errors == [None] * len(texts)
    assert sampled == greedy


def test_repetition_penalty_matches_a_plain_loop(tiny_models, texts, reference):
    model, tokenizer = reference
    penalty = 1.5
    runner = _runner(
        tiny_models["text-generation"], max_new_tokens=NEW_TOKENS, repetition_penalty=penalty
    )
    texts = texts[:10]
    generated = runner.generate(runner.prepare(texts))

    changed = 0
    for text, ids in zip(texts, generated, strict=True):
        prompt = tokenizer(text)["input_ids"]
        sequence = list(prompt)

        def choose(logits, sequence=sequence):
            seen = torch.tensor(sorted(set(sequence)))
            values = logits[seen]
            logits[seen] = torch.where(values < 0, values * penalty, values / penalty)
            token = torch.argmax(logits)
            sequence.append(int(token))
            return token

        eos = model.generation_config.eos_token_id
        assert ids == _decode_loop(model, prompt, NEW_TOKENS, eos, choose)
        changed += ids != _greedy(model, prompt)
    assert changed > len(texts) // 2


def test_beam_search_batched_matches_one_row_at_a_time(tiny_models, texts, reference):
    model, tokenizer = reference
    runner = _runner(tiny_models["text-generation"], max_new_tokens=NEW_TOKENS, num_beams=3)
    texts = texts[:8]
    generated = runner.generate(runner.prepare(texts))
    for text, ids in zip(texts, generated, strict=True):
        prompt = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.inference_mode():
            alone = model.generate(prompt, max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False)
        assert ids == alone[0, prompt.shape[1] :].tolist()


def test_prompt_template_pastes_cells_literally(tiny_models, reference):
    model, tokenizer = reference
    template = "Review: {text}\nBy {author} ({stars} stars) {{sic}}\nSummary:"
    adapter = TextGeneration(
        "gen", TextGenerationParams(prompt=template, max_new_tokens=8), input_column="body"
    )
    assert adapter.read_columns() == ["body", "text", "author", "stars"]
    columns = {
        "body": ["ok", "ok", "ok", None, "  ", "ok"],
        "text": ["Fine {text} here", "{0.__class__}", "{author!r:>9}", "x", "x", "x"],
        "author": ["Ann", "{{Bob}}", "Cy", "D", "E", None],
        "stars": [5, 4.5, 3, 2, 1, 0],
    }
    inputs = adapter.row_inputs(columns)
    assert inputs[:3] == [
        "Review: Fine {text} here\nBy Ann (5 stars) {sic}\nSummary:",
        "Review: {0.__class__}\nBy {{Bob}} (4.5 stars) {sic}\nSummary:",
        "Review: {author!r:>9}\nBy Cy (3 stars) {sic}\nSummary:",
    ]
    assert [str(x) for x in inputs[3:]] == [
        "text is null",
        "text is empty",
        "prompt column 'author' is null",
    ]
    assert all(isinstance(x, InvalidInput) for x in inputs[3:])

    runner = adapter.load(resolve_model(str(tiny_models["text-generation"])), "cpu", "fp32")
    results, errors, _ = run_task(runner, inputs, SMALL_BUDGET)
    assert errors[:3] == [None] * 3 and all(errors[3:])
    for prompt, (output,) in zip(inputs[:3], results[:3], strict=True):
        expected = _greedy(model, tokenizer(prompt)["input_ids"], 8)
        assert output == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{text!r}", "conversion or format spec"),
        ("{text:>10}", "conversion or format spec"),
        ("{text:{width}}", "conversion or format spec"),
        ("{0.__class__}", "attribute or index"),
        ("{0}", "positional"),
        ("{}", "positional"),
        ("{text.upper}", "attribute or index"),
        ("{text[0]}", "attribute or index"),
        ("Review: {text", "literal braces"),
        ("a } b", "literal braces"),
        ("", "empty"),
    ],
)
def test_templates_that_could_do_more_than_paste_are_rejected(template, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        TextGenerationParams(prompt=template)


def test_a_placeholder_naming_a_missing_column_fails_before_reading(tmp_path, tiny_models, capsys):
    spec = {
        "tasks": [
            {
                "name": "gen",
                "task": "text-generation",
                "model": str(tiny_models["text-generation"]),
                "params": {"prompt": "{text} by {author}"},
            }
        ]
    }
    (tmp_path / "job.yaml").write_text(json.dumps(spec))
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a review"]}), source)
    output = tmp_path / "out"
    argv = ["--input", str(source), "--output", str(output), "--spec", str(tmp_path / "job.yaml")]
    assert main(argv) == 2
    assert "reads column 'author'" in capsys.readouterr().err
    assert not output.exists()


def test_a_bad_template_in_a_spec_names_its_key():
    spec = {"tasks": [{"name": "gen", "task": "text-generation", "params": {"prompt": "{t!r}"}}]}
    with pytest.raises(SpecError, match=r"tasks\[0\]\.params\.prompt: .*conversion or format"):
        parse_spec(spec)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": 0.7}, "only apply when sampling"),
        ({"top_k": 5}, "only apply when sampling"),
        ({"drop_flagged": True}, "needs a blocklist"),
        ({"do_sample": True, "seed": 1, "num_beams": 2}, "beam sampling"),
        ({"max_new_tokens": 0}, "greater than or equal to 1"),
        ({"stop": ["\n", ""]}, "must not be empty"),
    ],
)
def test_params_that_do_not_fit_are_rejected(params, message):
    with pytest.raises(ValidationError, match=message):
        TextGenerationParams(**params)


def test_blocklist_flags_and_drops_generated_text(tmp_path, tiny_models, texts):
    path = tiny_models["text-generation"]
    texts = texts[:20]
    plain, _, _ = run_task(_runner(path, max_new_tokens=NEW_TOKENS), texts, SMALL_BUDGET)
    # A random-weight model's words depend on the CPU's float rounding: block a word that
    # this run wrote in some rows and not in others.
    outputs = [text for (text,) in plain]
    word = next(
        word
        for word in sorted(
            {w.lower() for text in outputs for w in re.findall(r"[A-Za-z]{3,}", text)}
        )
        if 0 < sum(bool(re.search(rf"\b{word}\b", t, re.I)) for t in outputs) < len(outputs) / 2
    )
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text(f"# words and /regexes/\n\n  {word.upper()}  \n/leng.h/\nnever-written\n")
    assert read_blocklist(str(blocklist))[1] == "leng.h"

    flags = _runner(path, max_new_tokens=NEW_TOKENS, blocklist=str(blocklist))
    drops = _runner(path, max_new_tokens=NEW_TOKENS, blocklist=str(blocklist), drop_flagged=True)
    flagged, errors, _ = run_task(flags, texts, SMALL_BUDGET)
    dropped, _, _ = run_task(drops, texts, SMALL_BUDGET)

    assert errors == [None] * len(texts)
    hits = 0
    for (text,), (flag_text, flag), (drop_text, drop_flag) in zip(
        plain, flagged, dropped, strict=True
    ):
        expected = bool(re.search(rf"\b{word}\b|leng.h", text, re.IGNORECASE))
        assert (flag_text, flag, drop_flag) == (text, expected, expected)
        assert drop_text == (None if expected else text)
        hits += expected
    assert 0 < hits < len(texts)
    adapter = TextGeneration("gen", TextGenerationParams(blocklist=str(blocklist)))
    assert [(f.name, f.type) for f in adapter.fields()] == [
        ("gen", pa.string()),
        ("gen_flagged", pa.bool_()),
    ]
    assert [f.name for f in TextGeneration("gen").fields()] == ["gen"]


def test_blocklist_words_match_whole_words_only(tmp_path):
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("ass\nc++\n/colou?r/\n")
    patterns = [re.compile(p, re.IGNORECASE) for p in read_blocklist(str(blocklist))]

    def flagged(text):
        return any(p.search(text) for p in patterns)

    assert flagged("You ASS!") and flagged("uses C++ daily") and flagged("Colour me")
    assert not flagged("a classic passage") and not flagged("abc++") and not flagged("col")


def test_bad_blocklists_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="cannot read blocklist"):
        TextGeneration("gen", TextGenerationParams(blocklist=str(tmp_path / "missing.txt")))
    bad = tmp_path / "bad.txt"
    bad.write_text("fine\n/(unclosed/\n")
    with pytest.raises(ValueError, match="line 2: bad regex"):
        TextGeneration("gen", TextGenerationParams(blocklist=str(bad)))


def test_cli_end_to_end_with_a_prompt_template(tmp_path, tiny_models, reference):
    model, tokenizer = reference
    source = tmp_path / "reviews.parquet"
    table = pa.table(
        {
            "id": pa.array([1, 2, 3, 4], pa.int64()),
            "text": ["Great headphones.", "Stopped working {after} a week.", None, "Fine."],
            "product": ["H1", "Kettle", "Lamp", "X" * 5 + " word" * 300],
        }
    )
    pq.write_table(table, source)
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("python\n")
    template = "Product: {product}\nReview: {text}\nSummary:"
    spec = {
        "rows_per_chunk": 2,
        "keep_order": True,
        "tasks": [
            {
                "name": "summary",
                "task": "text-generation",
                "model": str(tiny_models["text-generation"]),
                "max_batch_tokens": 300,
                "params": {
                    "prompt": template,
                    "max_new_tokens": 10,
                    "stop": ["\n"],
                    "blocklist": str(blocklist),
                },
            }
        ],
    }
    parse_spec(spec)  # the spec layer accepts every key
    (tmp_path / "job.yaml").write_text(json.dumps(spec))
    output = tmp_path / "out"
    argv = ["--input", str(source), "--output", str(output), "--spec", str(tmp_path / "job.yaml")]
    assert main(argv) == 0

    parts = sorted(output.glob("part-*.parquet"))
    result = pa.concat_tables(pq.read_table(p) for p in parts).sort_by("id")
    assert result.column_names == [
        "id",
        "text",
        "product",
        "summary",
        "summary_flagged",
        "enrich_errors",
    ]
    assert result.schema.field("summary").type == pa.string()
    assert result.schema.field("summary_flagged").type == pa.bool_()
    rows = result.to_pylist()
    for row in rows[:2]:
        prompt = f"Product: {row['product']}\nReview: {row['text']}\nSummary:"
        ids = _greedy(model, tokenizer(prompt)["input_ids"], 10)
        expected = tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0]
        assert row["summary"] == expected
        assert row["summary_flagged"] == bool(re.search(r"\bpython\b", expected, re.I))
        assert row["enrich_errors"] == []
    assert rows[2]["summary"] is None and "text is null" in rows[2]["enrich_errors"][0]["error"]
    assert rows[3]["summary"] is None and "prompt is" in rows[3]["enrich_errors"][0]["error"]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["rows"]["failed"] == {"summary": 2}
    # Generation's default budget is twice the encoders' (its cost counts new tokens).
    assert manifest["tasks"][0]["batching"]["max_batch_tokens_default"] == {
        "cpu": 4096,
        "cuda": 16384,
    }
