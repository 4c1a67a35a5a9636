"""Generation through a model server: the caller tokenizes and decodes, the server generates.

Each case runs the same rows twice, with the model in this process and through a
`FakeProxy` of a model server: the rows must be equal, the server must get one call per
chunk holding every micro-batch, and it must never run a whole chunk.
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import FakeProxy
from transforms.inference import TaskBinding, load_task
from transforms.model_server import with_local_front
from transforms.models import resolve_model
from transforms.tasks.seq2seq import (
    Summarization,
    SummarizationParams,
    Translation,
    TranslationParams,
)
from transforms.tasks.text_generation import TextGeneration, TextGenerationParams

_NEW = 8
# A ChatML template (as SmolLM2's), so the tiny model renders chat prompts.
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SCHEMA = {
    "type": "object",
    "properties": {"good": {"type": "boolean"}},
    "required": ["good"],
}


@pytest.fixture(scope="module")
def chat_model(tiny_models, tmp_path_factory):
    """The tiny text-generation model with a chat template and its turn tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_models["text-generation"], target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = _CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(target)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _generation_cases():
    def gen(**params):
        params.setdefault("max_new_tokens", _NEW)
        return TextGeneration("gen", TextGenerationParams(**params))

    return [
        ("plain", "text-generation", gen(return_full_text=True, prompt="Review: {text}\nSo:")),
        ("stop", "text-generation", gen(stop=("e", "."), num_beams=2)),
        ("seeded", "text-generation", gen(do_sample=True, seed=7, top_k=20, temperature=0.8)),
        ("chat", "chat", gen(system="Be brief.", prompt="Rate: {text}")),
        ("json", "text-generation", gen(json_schema=_SCHEMA, raw_output=True, max_new_tokens=24)),
        ("summarization", "summarization", Summarization("sum", SummarizationParams())),
        ("t5-prefix", "t5", Summarization("t5", SummarizationParams(num_beams=2))),
        ("translation", "translation", Translation("tr", TranslationParams(num_beams=1))),
        (
            "multilingual",
            "translation-multilingual",
            Translation("ml", TranslationParams(num_beams=1, src_lang="ro_RO", tgt_lang="de_DE")),
        ),
    ]


@pytest.mark.parametrize(
    "family, adapter",
    [case[1:] for case in _generation_cases()],
    ids=[case[0] for case in _generation_cases()],
)
def test_served_generation_gets_token_ids_only_and_gives_the_same_rows(
    tiny_models, chat_model, sample_texts, family, adapter
):
    path = chat_model if family == "chat" else tiny_models[family]
    task = TaskBinding(adapter, resolve_model(str(path)), device="cpu", dtype="fp32")
    loaded = load_task(task)
    proxy = FakeProxy(loaded)  # its run_measured raises: the server never runs a chunk
    local = with_local_front(task, proxy)
    assert local is not proxy
    front = local.runner.front
    assert front.model is None  # the caller holds no weights
    if isinstance(adapter, TextGeneration):
        assert (front.beams, front.eos_ids) == (loaded.runner.beams, loaded.runner.eos_ids)

    texts = [text for text in sample_texts if len(text) < 500][:12]
    inputs = adapter.row_inputs({"text": [*texts, None, "x" * 3000]})
    budget = 400  # several micro-batches
    served = local.run_measured(inputs, budget)
    direct = loaded.run_measured(inputs, budget)
    assert proxy.calls == [len(served.batches)] and len(served.batches) > 1
    assert served.batches == direct.batches
    assert served.errors == direct.errors
    assert served.results == direct.results
    assert served.truncated == direct.truncated
    assert served.errors[len(texts)].startswith("InvalidInput")
    assert sum(error is None for error in served.errors) >= len(texts) - 1
