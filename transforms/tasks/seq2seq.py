"""summarization / translation: an encoder-decoder model rewrites each row.

transformers 5 removed `SummarizationPipeline` and `TranslationPipeline`; this module
gives the same text for the same model and input, with the generation settings chosen
the way the last 4.x pipelines chose them:

1. the model's `generation_config`;
2. for what the model leaves at the library default, the 4.x pipelines' own defaults:
   4 beams and 256 new tokens (256 only when the model sets neither `max_new_tokens`
   nor a `max_length` other than 20);
3. the model config's `task_specific_params` for the task (`summarization`, or the
   first `translation_*` entry for translation), whose `prefix` is prepended to every
   input (the config's plain `prefix` otherwise), as T5 checkpoints expect;
4. the task's parameters from the spec.

Outputs are decoded with `skip_special_tokens=True` and without cleaning up
tokenization spaces, the 4.x default. Unlike 4.x, which refused inputs longer than the
model takes, long inputs are cut to the model's limit (and counted as truncated).

The runner splits at `generate` (`SplitRunner`): behind a model server each caller
tokenizes, pads and decodes with a front that loads no weights (`load_front`), and the
server only generates, from padded ids to output ids.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from transforms.models import ResolvedModel, load_kwargs, place_model
from transforms.tasks.base import (
    Encoded,
    Params,
    TaskAdapter,
    encode_texts,
    model_max_length,
    pad_ids,
    to_model,
)

__all__ = [
    "Seq2SeqParams",
    "Summarization",
    "SummarizationParams",
    "Translation",
    "TranslationParams",
    "generation_settings",
]

# What 4.x Text2TextGenerationPipeline used where the model's generation config kept
# the library default (num_beams 1, max_length 20).
_PIPELINE_NUM_BEAMS = 4
_PIPELINE_MAX_NEW_TOKENS = 256
_LIBRARY_MAX_LENGTH = 20


class Seq2SeqParams(Params):
    """Generation parameters shared by summarization and translation.

    Attributes:
        max_length: the most tokens of the output, counting the decoder's start token;
            null: the model's generation config (else 256 new tokens, as 4.x did).
        min_length: the fewest output tokens before end of sequence may be generated;
            null: the model's generation config.
        num_beams: beam search width; null: the model's generation config (else 4, as
            the 4.x pipelines did).
        do_sample: sample the next token instead of searching for the most likely output.
        no_repeat_ngram_size: no n-gram of this size appears twice in an output; null:
            the model's generation config.
        length_penalty: beam search's exponent on length (> 0 favours longer outputs);
            null: the model's generation config.
        prefix: text prepended to every input, such as T5's "summarize: "; null: the
            prefix in the model's config, if it has one; "" for none.
    """

    max_length: int | None = Field(None, ge=1)
    min_length: int | None = Field(None, ge=0)
    num_beams: int | None = Field(None, ge=1)
    do_sample: bool = False
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    length_penalty: float | None = None
    prefix: str | None = None

    @model_validator(mode="after")
    def _lengths_fit_together(self) -> Seq2SeqParams:
        if (
            self.max_length is not None
            and self.min_length is not None
            and self.min_length > self.max_length
        ):
            raise ValueError(
                f"min_length {self.min_length} is above max_length {self.max_length}; "
                "lower min_length or raise max_length"
            )
        return self


class SummarizationParams(Seq2SeqParams):
    """Parameters of summarization: the generation parameters of `Seq2SeqParams`."""


class TranslationParams(Seq2SeqParams):
    """Parameters of translation.

    Attributes:
        src_lang: the input's language code, for multilingual models whose tokenizer
            marks it (mBART `en_XX`, NLLB `eng_Latn`, M2M100 `en`); null for
            single-pair models.
        tgt_lang: the output's language code, forced as the first generated token of
            such models; null for single-pair models. Multi-target Marian models take
            their `>>de<<` token through `prefix` instead.
    """

    src_lang: str | None = None
    tgt_lang: str | None = None


class _Seq2Seq(TaskAdapter):
    """Runs an encoder-decoder model (`AutoModelForSeq2SeqLM`) with `generate`."""

    @property
    def deterministic(self) -> bool:
        # Sampling (seq2seq takes no seed) draws a new output per row, even for equal inputs.
        return not self.params.do_sample

    def fields(self) -> list[pa.Field]:
        return [pa.field(self.name, pa.string())]

    def load(self, model: ResolvedModel, device: str, dtype: str) -> _Runner:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        kwargs = load_kwargs(model, dtype)
        tokenizer = AutoTokenizer.from_pretrained(
            model.model, revision=kwargs.get("revision"), trust_remote_code=model.trust_remote_code
        )
        network = AutoModelForSeq2SeqLM.from_pretrained(model.model, **kwargs)
        network = place_model(network, device, dtype)
        config, prefix = generation_settings(network, tokenizer, self.tasks[0], self.params)
        return _Runner(tokenizer, network.config, prefix, network, device, config)

    def load_front(self, model: ResolvedModel) -> _Runner:
        """The runner without weights: the tokenizer (its source language set) and the
        config's prefix and length limit; the server holds the generation config."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        pinned: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
        if model.revision is not None:
            pinned["revision"] = model.revision
        tokenizer = AutoTokenizer.from_pretrained(model.model, **pinned)
        config = AutoConfig.from_pretrained(model.model, **pinned)
        # The prefix and the tokenizer's source language come from the config and the
        # parameters only; the generation config made beside them is the server's concern.
        weightless = types.SimpleNamespace(config=config, generation_config=GenerationConfig())
        _, prefix = generation_settings(weightless, tokenizer, self.tasks[0], self.params)
        return _Runner(tokenizer, config, prefix)


class Summarization(_Seq2Seq):
    """Adapter for `summarization`."""

    tasks = ("summarization",)
    params_type = SummarizationParams
    default_model = "sshleifer/distilbart-cnn-12-6"


class Translation(_Seq2Seq):
    """Adapter for `translation`."""

    tasks = ("translation",)
    params_type = TranslationParams
    default_model = "Helsinki-NLP/opus-mt-en-de"


def generation_settings(model, tokenizer, task: str, params: Seq2SeqParams) -> tuple[Any, str]:
    """The generation config and input prefix a 4.x pipeline would have used.

    Sets `tokenizer.src_lang` when the parameters name one.

    Args:
        model: the loaded encoder-decoder model.
        tokenizer: its tokenizer.
        task: `summarization` or `translation`.
        params: the task's parameters.

    Returns:
        (generation config, prefix for every input).

    Raises:
        ValueError: a language code the tokenizer does not know, languages given for a
            model without language codes, or a multilingual model without both.
    """
    config = copy.deepcopy(model.generation_config)
    if config.num_beams in (None, 1):
        config.num_beams = _PIPELINE_NUM_BEAMS
    if config.max_new_tokens is None and config.max_length in (None, _LIBRARY_MAX_LENGTH):
        config.max_new_tokens = _PIPELINE_MAX_NEW_TOKENS

    prefix = getattr(model.config, "prefix", None)
    task_params = _task_specific_params(model.config, task)
    if "prefix" in task_params:
        prefix = task_params.pop("prefix")
    config.update(**task_params)
    if params.prefix is not None:
        prefix = params.prefix

    if params.max_length is not None:
        config.max_length = params.max_length
        config.max_new_tokens = None  # else it would win over the length asked for
    chosen = {
        name: getattr(params, name)
        for name in ("min_length", "num_beams", "no_repeat_ngram_size", "length_penalty")
        if getattr(params, name) is not None
    }
    config.update(do_sample=params.do_sample, **chosen)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id

    if isinstance(params, TranslationParams):
        _set_languages(tokenizer, config, params)
    return config, prefix or ""


def _task_specific_params(model_config, task: str) -> dict:
    every = getattr(model_config, "task_specific_params", None) or {}
    if task == "translation":
        # 4.x's pipeline("translation") took the first translation_XX_to_YY entry.
        task = next((key for key in every if key.startswith("translation")), task)
    return dict(every.get(task) or {})


def _set_languages(tokenizer, config, params: TranslationParams) -> None:
    # Tokenizers of multilingual models (mBART, M2M100, NLLB) have the hook the 4.x
    # pipeline called; it refused to run them without both languages.
    multilingual = hasattr(tokenizer, "_build_translation_inputs")
    if params.src_lang is None and params.tgt_lang is None:
        if multilingual:
            raise ValueError(
                f"this model ({type(tokenizer).__name__}) translates between many "
                "languages: set params src_lang and tgt_lang to its language codes"
            )
        return
    if not multilingual:
        raise ValueError(
            f"src_lang / tgt_lang apply to multilingual models, but this model's "
            f"tokenizer ({type(tokenizer).__name__}) has no language codes; remove them "
            "(a multi-target Marian model takes its target through prefix, e.g. '>>de<< ')"
        )
    if params.src_lang is None or params.tgt_lang is None:
        raise ValueError("translation with this model needs both src_lang and tgt_lang")
    _language_id(tokenizer, params.src_lang, "src_lang")
    tokenizer.src_lang = params.src_lang
    config.forced_bos_token_id = _language_id(tokenizer, params.tgt_lang, "tgt_lang")


def _language_id(tokenizer, code: str, name: str) -> int:
    try:
        if hasattr(tokenizer, "get_lang_id"):  # M2M100 names languages "de", not "__de__"
            return tokenizer.get_lang_id(code)
        by_code = getattr(tokenizer, "lang_code_to_id", None)
        if isinstance(by_code, dict) and code in by_code:
            return by_code[code]
        token_id = tokenizer.convert_tokens_to_ids(code)
    except KeyError:
        token_id = None
    if token_id is None or token_id == tokenizer.unk_token_id:
        known = getattr(tokenizer, "lang_code_to_id", None) or {}
        hint = f"; known codes include {', '.join(list(known)[:8])}" if known else ""
        raise ValueError(f"{name} {code!r} is not a language code of this tokenizer{hint}")
    return token_id


class _Runner:
    """`prepare / cost / collate / decode` need the tokenizer only; `forward`
    (`generate`) needs the model: None in a front (`_Seq2Seq.load_front`).

    `forward` takes the padded encoder inputs and gives the output ids as `generate`
    returns them (decoder start token first, padded with the pad token).
    """

    def __init__(
        self,
        tokenizer,
        config,
        prefix: str,
        model: Any = None,
        device: str = "meta",
        generation_config: Any = None,
    ):
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.generation_config = generation_config
        self.prefix = prefix
        self.max_length = model_max_length(tokenizer, config)

    def prepare(self, texts: Sequence[str]) -> list[Encoded]:
        return encode_texts(self.tokenizer, [self.prefix + t for t in texts], self.max_length)

    def cost(self, item: Encoded) -> int:
        return len(item.input_ids)

    def infer(self, items: list[Encoded]) -> list[tuple]:
        return self.decode(items, self.forward(self.collate(items)))

    def collate(self, items: list[Encoded]) -> dict[str, np.ndarray]:
        # Encoder inputs pad on the tokenizer's side (the right, for these models); the
        # attention mask keeps padding out of every row's encoding.
        return pad_ids(self.tokenizer, [item.input_ids for item in items])

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.model is None:
            raise RuntimeError("this seq2seq runner is a front: it has no model")
        with torch.inference_mode():
            output = self.model.generate(
                **to_model(batch, self.device), generation_config=self.generation_config
            )
        return {"ids": output.cpu().numpy()}

    def decode(self, items: list[Encoded], outputs: dict[str, np.ndarray]) -> list[tuple]:
        texts = self.tokenizer.batch_decode(
            outputs["ids"].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return [(text,) for text in texts]
