"""summarization / translation against a plain greedy decoding loop on the same model.

transformers 5 has no summarization or translation pipeline to compare with, so the
reference here is written out: encode once, then run the decoder one token at a time
taking the argmax, and decode the way the 4.x pipelines did.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from pipelines.cli import main
from pipelines.spec import parse_spec
from transforms.inference import run_task
from transforms.models import resolve_model
from transforms.tasks import ADAPTERS
from transforms.tasks.seq2seq import (
    Summarization,
    SummarizationParams,
    Translation,
    TranslationParams,
    generation_settings,
)

# Several padded micro-batches per run: padding, sorting and reordering are covered.
SMALL_BUDGET = 300
ROWS = 10

# builder name -> (adapter, params, prefix the model's config implies, src, tgt)
CASES = {
    "summarization": (Summarization, {}, "", None, None),
    "translation": (Translation, {}, "", None, None),
    "t5": (Summarization, {}, "summarize: ", None, None),
    "translation-multilingual": (
        Translation,
        {"src_lang": "en_XX", "tgt_lang": "de_DE"},
        "",
        "en_XX",
        "de_DE",
    ),
}


def _load(path):
    return AutoModelForSeq2SeqLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _greedy(model, tokenizer, text, *, forced_bos=None, min_length=0, max_length=None):
    """Greedy decoding by hand: the generated ids (start token included)."""
    config = model.generation_config
    max_length = max_length or config.max_length
    eos, forced_eos = config.eos_token_id, config.forced_eos_token_id
    ids = torch.tensor([tokenizer(text, truncation=True, max_length=512)["input_ids"]])
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=ids)
        sequence = [config.decoder_start_token_id]
        while len(sequence) < max_length:
            logits = model(
                encoder_outputs=encoded, decoder_input_ids=torch.tensor([sequence])
            ).logits[0, -1]
            if len(sequence) == 1 and forced_bos is not None:
                token = forced_bos
            elif len(sequence) == max_length - 1 and forced_eos is not None:
                token = forced_eos
            else:
                if len(sequence) < min_length:
                    logits[eos] = float("-inf")
                token = int(logits.argmax())
            sequence.append(token)
            if token == eos:
                break
    return sequence


def _decode(tokenizer, ids):
    # What the 4.x pipelines returned: special tokens dropped, spaces left as they are.
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _run(adapter_type, params, path, texts):
    runner = adapter_type("out", params).load(resolve_model(str(path)), "cpu", "fp32")
    results, errors, truncated = run_task(runner, texts, SMALL_BUDGET)
    assert errors == [None] * len(texts)
    return [text for (text,) in results], truncated


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_matches_a_plain_decoding_loop(tiny_models, sample_texts, name):
    adapter_type, extra, prefix, src_lang, tgt_lang = CASES[name]
    path = tiny_models[name]
    texts = sample_texts[:ROWS]
    if name == "summarization":
        texts = [*texts, "The committee met in Geneva again. " * 120]  # > 512 tokens
    params = adapter_type.params_type(num_beams=1, **extra)
    outputs, truncated = _run(adapter_type, params, path, texts)

    assert truncated == (1 if name == "summarization" else 0)
    model, tokenizer = _load(path)
    forced_bos = None
    if src_lang is not None:
        tokenizer.src_lang = src_lang
        forced_bos = tokenizer.convert_tokens_to_ids(tgt_lang)
    for text, output in zip(texts, outputs, strict=True):
        expected = _greedy(model, tokenizer, prefix + text, forced_bos=forced_bos)
        if forced_bos is not None:
            assert expected[1] == forced_bos
        assert output == _decode(tokenizer, expected)
    assert len(set(outputs)) > 1  # the model does not emit one constant string


@pytest.mark.parametrize("name", list(CASES))
def test_beam_search_matches_unbatched_generate(tiny_models, sample_texts, name):
    adapter_type, extra, prefix, src_lang, tgt_lang = CASES[name]
    path = tiny_models[name]
    texts = sample_texts[ROWS : 2 * ROWS]
    outputs, _ = _run(adapter_type, adapter_type.params_type(num_beams=2, **extra), path, texts)

    model, tokenizer = _load(path)
    kwargs = {}
    if src_lang is not None:
        tokenizer.src_lang = src_lang
        kwargs["forced_bos_token_id"] = tokenizer.convert_tokens_to_ids(tgt_lang)
    for text, output in zip(texts, outputs, strict=True):
        inputs = tokenizer(prefix + text, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, num_beams=2, do_sample=False, **kwargs)[0]
        assert output == _decode(tokenizer, ids)


def test_defaults_follow_the_4x_pipeline(tiny_models, sample_texts):
    # The tiny model sets max_length 24 and leaves num_beams at the library default:
    # 4.x pipelines kept the length and searched with 4 beams.
    path = tiny_models["summarization"]
    texts = sample_texts[:6]
    outputs, _ = _run(Summarization, SummarizationParams(), path, texts)
    model, tokenizer = _load(path)
    for text, output in zip(texts, outputs, strict=True):
        with torch.no_grad():
            ids = model.generate(**tokenizer(text, return_tensors="pt"), num_beams=4)[0]
        assert len(ids) <= 24
        assert output == _decode(tokenizer, ids)


def test_generation_settings_layering(tiny_models):
    model, tokenizer = _load(tiny_models["t5"])
    config, prefix = generation_settings(model, tokenizer, "translation", TranslationParams())
    assert prefix == "translate English to German: "  # first translation_* entry
    assert (config.num_beams, config.max_length, config.max_new_tokens) == (4, 24, None)
    assert config.do_sample is False

    # A model that sets no lengths: 256 new tokens, as 4.x did; max_length replaces it.
    model.generation_config.max_length = None
    config, _ = generation_settings(model, tokenizer, "summarization", SummarizationParams())
    assert config.max_new_tokens == 256
    params = SummarizationParams(max_length=12, min_length=3, length_penalty=2.0, prefix="")
    config, prefix = generation_settings(model, tokenizer, "summarization", params)
    assert (config.max_length, config.max_new_tokens, config.min_length) == (12, None, 3)
    assert config.length_penalty == 2.0 and prefix == ""


def test_min_length_is_honoured(tiny_models, sample_texts, tmp_path):
    # A copy of the tiny BART whose output bias makes end of sequence the argmax at
    # every step: without min_length each output would be empty.
    model, tokenizer = _load(tiny_models["summarization"])
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        model.final_logits_bias[0, eos] = 1e4
    path = tmp_path / "eager-eos"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    texts = sample_texts[:ROWS]
    assert [len(_greedy(model, tokenizer, t)) for t in texts] == [2] * len(texts)

    params = SummarizationParams(num_beams=1, min_length=15, max_length=20)
    outputs, _ = _run(Summarization, params, path, texts)
    for text, output in zip(texts, outputs, strict=True):
        expected = _greedy(model, tokenizer, text, min_length=15, max_length=20)
        # End of sequence is refused while the sequence (start token included) is
        # shorter than min_length, then taken at once.
        assert len(expected) == 16 and expected[-1] == eos
        assert output == _decode(tokenizer, expected)
        assert output


def test_prefix_is_prepended(tiny_models, sample_texts):
    path = tiny_models["t5"]
    texts = sample_texts[:ROWS]
    model, tokenizer = _load(path)
    with_default, _ = _run(Summarization, SummarizationParams(num_beams=1), path, texts)
    custom = "translate English to German: "
    params = SummarizationParams(num_beams=1, prefix=custom)
    with_custom, _ = _run(Summarization, params, path, texts)
    without, _ = _run(Summarization, SummarizationParams(num_beams=1, prefix=""), path, texts)

    for text, default, ours, bare in zip(texts, with_default, with_custom, without, strict=True):
        assert default == _decode(tokenizer, _greedy(model, tokenizer, "summarize: " + text))
        assert ours == _decode(tokenizer, _greedy(model, tokenizer, custom + text))
        assert bare == _decode(tokenizer, _greedy(model, tokenizer, text))
    assert with_default != without


def test_target_language_forces_the_first_token(tiny_models, sample_texts):
    path = tiny_models["translation-multilingual"]
    texts = sample_texts[:6]
    model, tokenizer = _load(path)
    results = {}
    for src, tgt in (("en_XX", "de_DE"), ("en_XX", "fr_XX"), ("ro_RO", "de_DE")):
        params = TranslationParams(num_beams=1, src_lang=src, tgt_lang=tgt)
        results[src, tgt], _ = _run(Translation, params, path, texts)
        tokenizer.src_lang = src
        forced = tokenizer.convert_tokens_to_ids(tgt)
        for text, output in zip(texts, results[src, tgt], strict=True):
            expected = _greedy(model, tokenizer, text, forced_bos=forced)
            assert expected[:2] == [model.generation_config.decoder_start_token_id, forced]
            assert output == _decode(tokenizer, expected)
    assert results["en_XX", "de_DE"] != results["en_XX", "fr_XX"]  # the target matters
    assert results["en_XX", "de_DE"] != results["ro_RO", "de_DE"]  # the source code is read


def test_language_errors_say_what_to_do(tiny_models):
    multilingual = resolve_model(str(tiny_models["translation-multilingual"]))
    with pytest.raises(ValueError, match="set params src_lang and tgt_lang"):
        Translation("t", TranslationParams()).load(multilingual, "cpu", "fp32")
    with pytest.raises(ValueError, match="tgt_lang 'xx_YY' is not a language code"):
        Translation("t", TranslationParams(src_lang="en_XX", tgt_lang="xx_YY")).load(
            multilingual, "cpu", "fp32"
        )
    with pytest.raises(ValueError, match="needs both"):
        Translation("t", TranslationParams(tgt_lang="de_DE")).load(multilingual, "cpu", "fp32")
    marian = resolve_model(str(tiny_models["translation"]))
    with pytest.raises(ValueError, match="has no language codes"):
        Translation("t", TranslationParams(src_lang="en", tgt_lang="de")).load(
            marian, "cpu", "fp32"
        )


def test_params_are_validated():
    assert ADAPTERS["summarization"] is Summarization
    assert ADAPTERS["translation"] is Translation
    assert Summarization.default_model == "sshleifer/distilbart-cnn-12-6"
    assert Translation.default_model == "Helsinki-NLP/opus-mt-en-de"
    with pytest.raises(ValidationError, match="temperature"):
        SummarizationParams(temperature=0.7)
    with pytest.raises(ValidationError, match="src_lang"):
        SummarizationParams(src_lang="en")  # languages are translation's
    with pytest.raises(ValidationError, match="min_length 30 is above max_length 20"):
        TranslationParams(min_length=30, max_length=20)
    with pytest.raises(ValidationError):
        TranslationParams(num_beams=0)
    with pytest.raises(ValueError, match=r"tasks\[0\]\.params\.max_lenght: unknown key"):
        parse_spec({"tasks": [{"name": "s", "task": "summarization", "params": {"max_lenght": 5}}]})


def _cli(tmp_path, task, model, params, texts):
    source = tmp_path / "in.parquet"
    ids = pa.array(range(len(texts)), pa.int64())
    pq.write_table(pa.table({"id": ids, "text": pa.array(texts, pa.string())}), source)
    spec = {
        "rows_per_chunk": 3,
        "tasks": [
            {
                "name": "out",
                "task": task,
                "model": str(model),
                "max_batch_tokens": SMALL_BUDGET,
                "params": params,
            }
        ],
    }
    (tmp_path / "job.yaml").write_text(json.dumps(spec))
    output = tmp_path / "result"
    argv = ["--input", str(source), "--output", str(output), "--spec", str(tmp_path / "job.yaml")]
    assert main(argv) == 0
    parts = sorted(output.glob("part-*.parquet"))
    table = pa.concat_tables(pq.read_table(p) for p in parts).sort_by("id")
    assert table.column_names == ["id", "text", "out", "enrich_errors"]
    assert table.schema.field("out").type == pa.string()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["tasks"][0]["task"] == task
    return table.to_pylist()


def test_cli_summarization_end_to_end(tmp_path, tiny_models, sample_texts):
    path = tiny_models["summarization"]
    texts = [*sample_texts[:5], None]
    rows = _cli(tmp_path, "summarization", path, {"num_beams": 1, "max_length": 16}, texts)
    model, tokenizer = _load(path)
    for row in rows[:5]:
        expected = _greedy(model, tokenizer, row["text"], max_length=16)
        assert row["out"] == _decode(tokenizer, expected)
        assert row["enrich_errors"] == []
    assert rows[5]["out"] is None
    assert "text is null" in rows[5]["enrich_errors"][0]["error"]


def test_cli_translation_end_to_end(tmp_path, tiny_models, sample_texts):
    path = tiny_models["translation-multilingual"]
    params = {"num_beams": 1, "src_lang": "en_XX", "tgt_lang": "fr_XX"}
    rows = _cli(tmp_path, "translation", path, params, sample_texts[:5])
    model, tokenizer = _load(path)
    tokenizer.src_lang = "en_XX"
    forced = tokenizer.convert_tokens_to_ids("fr_XX")
    for row in rows:
        expected = _greedy(model, tokenizer, row["text"], forced_bos=forced)
        assert row["out"] == _decode(tokenizer, expected)
        assert row["enrich_errors"] == []
