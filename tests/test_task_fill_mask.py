"""fill-mask, row by row, against the transformers pipeline."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import pipeline

from pipelines.cli import main
from pipelines.spec import SpecError, parse_spec
from pipelines.test_models import byte_level_bpe, save
from transforms.inference import run_task
from transforms.models import resolve_model
from transforms.tasks.fill_mask import FillMask, FillMaskParams

SMALL_BUDGET = 400
TOLERANCE = 1e-4


def _runner(path, **params):
    return FillMask("fill", FillMaskParams(**params)).load(resolve_model(str(path)), "cpu", "fp32")


def _masked(texts: list[str], mask: str) -> list[str]:
    """Each text with its middle word replaced by `mask`."""
    out = []
    for text in texts:
        words = text.split(" ")
        words[len(words) // 2] = mask
        out.append(" ".join(words))
    return out


def _assert_matches(ours: list[dict], expected: list[dict]) -> None:
    assert [f["token_str"] for f in ours] == [e["token_str"] for e in expected]
    assert [f["sequence"] for f in ours] == [e["sequence"] for e in expected]
    assert [f["score"] for f in ours] == pytest.approx(
        [e["score"] for e in expected], abs=TOLERANCE
    )


@pytest.fixture(scope="module")
def roberta_mlm(tmp_path_factory):
    """A tiny RoBERTa masked LM: byte-level BPE and `<mask>`, like distilroberta-base."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizer

    vocab, merges = byte_level_bpe(2000, ("<s>", "<pad>", "</s>", "<unk>", "<mask>"))
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=514,  # RoBERTa's positions start after the padding id
        initializer_range=0.5,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
    )
    target = tmp_path_factory.mktemp("roberta-mlm")
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=512)
    save(RobertaForMaskedLM(config), tokenizer, target)
    return target


@pytest.mark.parametrize(
    ("model", "mask", "top_k"),
    [
        ("bert", "[MASK]", 5),
        ("bert", "{mask}", 3),
        ("bert", "[MASK]", 1),
        ("roberta", "<mask>", 5),
        ("roberta", "{mask}", 4),
    ],
)
def test_fill_mask_matches_pipeline(tiny_models, roberta_mlm, sample_texts, model, mask, top_k):
    path = tiny_models["fill-mask"] if model == "bert" else roberta_mlm
    texts = _masked(sample_texts[:24], mask)
    results, errors, _ = run_task(_runner(path, top_k=top_k), texts, SMALL_BUDGET)

    assert errors == [None] * len(texts)
    direct = pipeline("fill-mask", model=str(path))
    model_mask = direct.tokenizer.mask_token
    for text, (fills,) in zip(texts, results, strict=True):
        expected = direct(text.replace("{mask}", model_mask), top_k=top_k)
        assert len(fills) == top_k
        _assert_matches(fills, expected)
    assert len({fills[0]["token_str"] for (fills,) in results}) > 1


def test_rows_without_exactly_one_mask_fail_alone(tiny_models, sample_texts):
    runner = _runner(tiny_models["fill-mask"])
    good = _masked(sample_texts[:2], "[MASK]")
    texts = [
        good[0],
        "no mask at all",
        "two [MASK] in one [MASK]",
        "a {mask} and a [MASK]",
        good[1],
    ]
    results, errors, _ = run_task(runner, texts, SMALL_BUDGET)
    assert errors == [
        None,
        "InvalidInput: expected exactly one [MASK] (or {mask}) in the text, found 0",
        "InvalidInput: expected exactly one [MASK] (or {mask}) in the text, found 2",
        "InvalidInput: expected exactly one [MASK] (or {mask}) in the text, found 2",
        None,
    ]
    assert results[1] is None and results[2] is None
    direct = pipeline("fill-mask", model=str(tiny_models["fill-mask"]))
    _assert_matches(results[4][0], direct(good[1]))


def test_mask_cut_off_by_truncation_is_an_error(tiny_models):
    runner = _runner(tiny_models["fill-mask"])
    long_text = " ".join(["The committee in Geneva discussed the annual report again."] * 80)
    results, errors, truncated = run_task(
        runner, [long_text + " [MASK].", "[MASK] " + long_text], SMALL_BUDGET
    )
    assert errors[0] == (
        "InvalidInput: the [MASK] falls after the model's 512-token limit; "
        "shorten the text before it"
    )
    assert errors[1] is None and truncated == 1
    assert len(results[1][0]) == 5


@pytest.mark.parametrize("top_k", [0, None, "3"])
def test_spec_rejects_bad_top_k(top_k):
    task = {"name": "fill", "task": "fill-mask", "params": {"top_k": top_k}}
    with pytest.raises(SpecError, match=r"tasks\[0\]\.params\.top_k"):
        parse_spec({"tasks": [task]})


def test_fill_mask_end_to_end(tmp_path, tiny_models, sample_texts):
    model = str(tiny_models["fill-mask"])
    texts = [*_masked(sample_texts[:15], "{mask}"), "nothing to fill here"]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "sentence": texts}), source)
    task = {
        "name": "fill",
        "task": "fill-mask",
        "model": model,
        "input": "sentence",
        "max_batch_tokens": SMALL_BUDGET,
        "params": {"top_k": 2},
    }
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"rows_per_chunk": 8, "tasks": [task]}))
    output = tmp_path / "out"
    assert main(["--input", str(source), "--output", str(output), "--spec", str(spec)]) == 0

    parts = sorted(output.glob("part-*.parquet"))
    result = pa.concat_tables(pq.read_table(p) for p in parts).sort_by("id")
    assert result.column_names == ["id", "sentence", "fill", "enrich_errors"]
    fill_type = result.schema.field("fill").type.value_type
    assert [(f.name, f.type) for f in fill_type] == [
        ("token_str", pa.string()),
        ("score", pa.float32()),
        ("sequence", pa.string()),
    ]
    fills = result.column("fill").to_pylist()
    errors = result.column("enrich_errors").to_pylist()
    direct = pipeline("fill-mask", model=model)
    for text, row, row_errors in zip(texts[:-1], fills, errors, strict=False):
        assert row_errors == []
        _assert_matches(row, direct(text.replace("{mask}", "[MASK]"), top_k=2))
    assert fills[-1] is None
    assert errors[-1] == [
        {
            "task": "fill",
            "error": "InvalidInput: expected exactly one [MASK] (or {mask}) in the text, found 0",
        }
    ]
