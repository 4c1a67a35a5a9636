"""feature-extraction: one embedding vector per row, as sentence-transformers computes it.

sentence-transformers defines how an embedding model turns text into a vector: its
`modules.json` chains the transformer with a pooling mode, optional Dense layers and an
optional Normalize, and `sentence_bert_config.json` sets `max_seq_length` (all-MiniLM-L6-v2
reads 256 tokens, not the tokenizer's 512). Mean pooling over the tokenizer's length gives
other vectors, so such a model runs through sentence-transformers' own modules, and each row
gets exactly what `SentenceTransformer(model).encode(text)` returns. A model without that
config is built from the same modules: the transformer, the `pooling` param, and Normalize
when `normalize` is set.

Micro-batches are beam-enrich's own (length-sorted, token budget); each one runs the steps
of one `encode` call with `batch_size` equal to its size, split as a `SplitRunner`
(`collate` / `forward` / `decode`), so a model server runs only the network's forward pass
and gets the very arrays `encode` would feed it: the vectors are bit-equal to `encode`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from transforms.models import ModelError, ResolvedModel, load_kwargs, place_model
from transforms.tasks.base import Encoded, Params, TaskAdapter, encode_texts, to_model

__all__ = ["FeatureExtraction", "FeatureExtractionParams"]

#: Our `pooling` names -> sentence-transformers' pooling modes.
_POOLING_MODES = {"mean": "mean", "cls": "cls", "max": "max", "last": "lasttoken"}
#: The boolean keys older sentence-transformers releases saved in `1_Pooling/config.json`,
#: in the order its Pooling module concatenates them.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class FeatureExtractionParams(Params):
    """Parameters of feature extraction.

    Attributes:
        pooling: how token vectors become one vector, for a model without a
            sentence-transformers config: `mean` (default), `cls`, `max` or `last`. A
            model with one uses its own pooling; naming another is an error.
        normalize: scale each vector to unit length. Default: what the model's
            sentence-transformers config says (its Normalize module), else false.
        prompt: text put before every row, as `encode(prompt=...)` does.
        prompt_name: one of the prompts in the model's sentence-transformers config
            (`query`, `passage`, …), as `encode(prompt_name=...)` does.
    """

    pooling: Literal["mean", "cls", "max", "last"] | None = None
    normalize: bool | None = None
    prompt: str | None = None
    prompt_name: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_prompt(self) -> FeatureExtractionParams:
        if self.prompt is not None and self.prompt_name is not None:
            raise ValueError("set at most one of `prompt` (the text) and `prompt_name`")
        return self


@dataclasses.dataclass(frozen=True)
class _SentenceTransformersConfig:
    """What a model's sentence-transformers files say, read without loading weights."""

    modules: tuple[str, ...]  # module class names, in order
    pooling: str | None  # sentence-transformers' pooling mode ("mean", "cls+max", …)
    normalize: bool
    prompts: dict[str, str]
    default_prompt_name: str | None


class FeatureExtraction(TaskAdapter):
    """Adapter for `feature-extraction`: sentence-transformers' embedding of each row."""

    tasks = ("feature-extraction",)
    params_type = FeatureExtractionParams
    default_model = "sentence-transformers/all-MiniLM-L6-v2"

    params: FeatureExtractionParams

    def fields(self) -> list[pa.Field]:
        return [pa.field(self.name, pa.list_(pa.float32()))]

    def resolved_parameters(self, model: ResolvedModel) -> dict[str, Any]:
        """The pooling, normalization, prompt and input length in use, for the manifest.

        Raises:
            ModelError: `pooling`, `normalize` or `prompt_name` contradicts the model's
                sentence-transformers config.
        """
        resolved = _resolve(self.name, self.params, _read_config(model))
        return {**resolved, "max_seq_length": _max_seq_length(model)}

    def check_model(self, model: str) -> None:
        """Refuses, when the spec is read, params that contradict a local model's
        sentence-transformers config (hub models: `resolved_parameters`, before the run).

        Raises:
            ModelError: as `resolved_parameters`.
        """
        from transforms.models import PACKAGE_PREFIX, package_file

        try:
            path = package_file(model) if model.startswith(PACKAGE_PREFIX) else model
        except ModelError:
            return  # resolving the model reports it, beside any other model problem
        if os.path.isdir(path):
            local = ResolvedModel(path, requested_revision=None, source="local", revision=None)
            _resolve(self.name, self.params, _read_config(local))

    def load(self, model: ResolvedModel, device: str, dtype: str) -> _EmbeddingRunner:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )

        config = _read_config(model)
        resolved = _resolve(self.name, self.params, config)
        kwargs = load_kwargs(model, dtype)
        shared = {"revision": kwargs.pop("revision", None)}
        shared["trust_remote_code"] = kwargs.pop("trust_remote_code")
        if config is not None:
            network = SentenceTransformer(model.model, device=device, model_kwargs=kwargs, **shared)
        else:
            # The same modules sentence-transformers would build, with the asked pooling.
            transformer = Transformer(
                model.model,
                model_kwargs={**shared, **kwargs},
                processor_kwargs=dict(shared),
                config_kwargs=dict(shared),
            )
            modules = [
                transformer,
                Pooling(transformer.get_embedding_dimension(), _POOLING_MODES[resolved["pooling"]]),
            ]
            if resolved["normalize"]:
                modules.append(Normalize())
            network = SentenceTransformer(modules=modules, device=device)
        network = place_model(network, device, dtype)
        return _EmbeddingRunner(network[0], resolved["prompt"], self.params, network, device)

    def load_front(self, model: ResolvedModel) -> _EmbeddingRunner | None:
        """The tokenizing and normalizing half of `load`'s runner, without weights.

        sentence-transformers has no weightless construction: `from_pretrained` inside a
        meta-device context raises, and `device_map="meta"` still reads every tensor of the
        checkpoint before dropping it. So the front builds only the model's input module
        (its Transformer: config, tokenizer, `max_seq_length`, processing kwargs) through
        sentence-transformers' own loading, with the network made from its config on the
        meta device (`_weightless_transformer`). Pooling, Dense and Normalize modules run in
        the server's forward pass and are not built here. A model whose first module is not
        a Transformer has no front (the server embeds whole chunks).
        """
        if model.gguf_file is not None:
            return None
        config = _read_config(model)
        resolved = _resolve(self.name, self.params, config)
        pinned: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
        if model.revision is not None:
            pinned["revision"] = model.revision
        weightless = _weightless_transformer()
        if config is None:
            module = weightless(
                model.model,
                model_kwargs=dict(pinned),
                processor_kwargs=dict(pinned),
                config_kwargs=dict(pinned),
            )
        else:
            entry = (_read_json(model, "modules.json") or [{}])[0]
            if config.modules[:1] != ("Transformer",):
                return None
            module = weightless.load(
                model.model,
                subfolder=entry.get("path", ""),
                revision=model.revision,
                trust_remote_code=model.trust_remote_code,
            )
        return _EmbeddingRunner(module, resolved["prompt"], self.params, None, "meta")


def _resolve(
    name: str, params: FeatureExtractionParams, config: _SentenceTransformersConfig | None
) -> dict[str, Any]:
    """The settings a task runs with: its params checked against the model's config."""
    if config is None:
        if params.prompt_name is not None:
            raise ModelError(
                f"task {name!r}: prompt_name {params.prompt_name!r} needs a model with a "
                "sentence-transformers config (modules.json) that defines prompts; this one "
                "has none, so give the text itself as `prompt`"
            )
        return {
            "sentence_transformers_modules": None,
            "pooling": params.pooling or "mean",
            "normalize": bool(params.normalize),
            "prompt": params.prompt,
        }
    fix = "remove the key to use the model's own"
    own_pooling = _our_pooling(config.pooling)
    if params.pooling is not None and params.pooling != own_pooling:
        raise ModelError(
            f"task {name!r}: pooling {params.pooling!r}, but the model's sentence-transformers "
            f"config pools with {config.pooling!r}; {fix}"
        )
    if params.normalize is False and config.normalize:
        raise ModelError(
            f"task {name!r}: normalize false, but the model's sentence-transformers config ends "
            f"with a Normalize module; {fix}"
        )
    if params.prompt_name is not None and params.prompt_name not in config.prompts:
        known = ", ".join(repr(p) for p in config.prompts) or "none"
        raise ModelError(
            f"task {name!r}: prompt_name {params.prompt_name!r} is not among the model's "
            f"prompts ({known}); name one of them, or give the text as `prompt`"
        )
    prompt = params.prompt
    if prompt is None:
        prompt_name = params.prompt_name or config.default_prompt_name
        prompt = config.prompts.get(prompt_name) if prompt_name else None
    return {
        "sentence_transformers_modules": list(config.modules),
        "pooling": own_pooling,
        "normalize": config.normalize or bool(params.normalize),
        "prompt": prompt,
    }


def _our_pooling(mode: str | None) -> str | None:
    """A sentence-transformers pooling mode in our names (`lasttoken` is `last`)."""
    ours = {value: key for key, value in _POOLING_MODES.items()}
    return ours.get(mode, mode) if mode is not None else None


def _read_config(model: ResolvedModel) -> _SentenceTransformersConfig | None:
    """The model's sentence-transformers config, or None when it has no `modules.json`.

    Raises:
        ModelError: a file of the config cannot be read or is not JSON.
    """
    modules = _read_json(model, "modules.json")
    if modules is None:
        return None
    names = tuple(str(entry.get("type", "")).rsplit(".", 1)[-1] for entry in modules)
    pooling = None
    for entry, module_name in zip(modules, names, strict=True):
        if module_name == "Pooling":
            folder = entry.get("path", "")
            name = f"{folder}/config.json" if folder else "config.json"
            found = _read_json(model, name)
            if found is None:
                # sentence-transformers cannot build the module without it either.
                raise ModelError(
                    f"model {model.model!r} lists a Pooling module in modules.json but has no "
                    f"{name}; copy or download the whole model folder, subfolders included"
                )
            pooling = _pooling_mode(found)
    settings = _read_json(model, "config_sentence_transformers.json") or {}
    return _SentenceTransformersConfig(
        modules=names,
        pooling=pooling,
        normalize="Normalize" in names,
        prompts=dict(settings.get("prompts") or {}),
        default_prompt_name=settings.get("default_prompt_name"),
    )


def _max_seq_length(model: ResolvedModel) -> int | None:
    """The tokens per row sentence-transformers keeps, as its Transformer module sets it:
    `sentence_bert_config.json`'s `max_seq_length` (older saves), else the tokenizer's
    `model_max_length` capped by the model's positions."""
    legacy = (_read_json(model, "sentence_bert_config.json") or {}).get("max_seq_length")
    if isinstance(legacy, int):
        return legacy
    limits = [
        (_read_json(model, "tokenizer_config.json") or {}).get("model_max_length"),
        (_read_json(model, "config.json") or {}).get("max_position_embeddings"),
    ]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


def _pooling_mode(config: dict) -> str:
    """The pooling mode a Pooling module's config describes, old or new format."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [value for key, value in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = modes or ["mean"]
    return mode if isinstance(mode, str) else "+".join(mode)


def _read_json(model: ResolvedModel, name: str) -> Any:
    """A JSON file of the model (a local folder, or the hub at the pinned commit), or None
    when the model has no such file."""
    try:
        if model.source == "local":
            path = Path(model.model, name)
            if not path.is_file():
                return None
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path = Path(hf_hub_download(model.model, name, revision=model.revision))
            except EntryNotFoundError:
                return None
        return json.loads(path.read_text(encoding="utf-8"))
    except Exception as err:
        raise ModelError(
            f"cannot read {name} of model {model.model!r} ({type(err).__name__}: {err}); "
            "check the model's files, or download it again"
        ) from err


def _weightless_transformer() -> type:
    """sentence-transformers' Transformer module, its network built on the meta device.

    Only `_load_model` (the one step that reads weights) is replaced: config, processor,
    `max_seq_length` and processing kwargs load as sentence-transformers loads them, so
    `preprocess` gives the very arrays `SentenceTransformer.encode` feeds the network.
    """
    import torch
    from sentence_transformers.base.modules.transformer import TRANSFORMER_TASK_TO_AUTO_MODEL
    from sentence_transformers.sentence_transformer.modules import Transformer

    class _WeightlessTransformer(Transformer):
        def _load_model(
            self, model_name_or_path, transformer_task, config, backend, is_peft_model, **kwargs
        ):
            if backend != "torch" or is_peft_model:
                raise ModelError(f"no weightless front for a {backend} or PEFT model")
            auto_class = TRANSFORMER_TASK_TO_AUTO_MODEL[transformer_task]
            with torch.device("meta"):
                return auto_class.from_config(
                    config, trust_remote_code=kwargs.get("trust_remote_code", False)
                )

    return _WeightlessTransformer


class _EmbeddingRunner:
    """Embeds micro-batches as `SentenceTransformer.encode(texts, batch_size=len(texts))`.

    `collate` is what `encode` feeds the network: the rows in its order (longest text
    first), prompt and truncation applied by the input module's own `preprocess`;
    `forward` runs every module (transformer, pooling, Dense, Normalize) to the
    `sentence_embedding`; `decode` normalizes where `normalize_embeddings=True` would and
    restores the rows' order. A front (`network` None) has the input module only.
    """

    def __init__(
        self, module, prompt: str | None, params: FeatureExtractionParams, network, device
    ):
        self.module = module
        self.network = network
        self.device = device
        self.prompt = prompt or None
        # `normalize: true` on top of the model's own modules: encode(normalize_embeddings=True).
        self.normalize = bool(params.normalize)
        self.max_length = module.max_seq_length or 512
        # encode interleaves long and short rows when flash attention drops the padding.
        self.interleave = bool(getattr(module, "can_flatten_inputs", False))

    def prepare(self, texts: Sequence[str]) -> list[Encoded]:
        # Token counts for sorting and packing only: `collate` tokenizes with the input
        # module's `preprocess`, so the arrays are sentence-transformers' own (prompt,
        # truncation, token types). Tokenizing costs well under 1% of embedding a row.
        prefix = self.prompt or ""
        prefixed = [prefix + text for text in texts] if prefix else texts
        items = encode_texts(self.module.tokenizer, prefixed, self.max_length)
        return [
            dataclasses.replace(item, text=text) for item, text in zip(items, texts, strict=True)
        ]

    def cost(self, item: Encoded) -> int:
        return len(item.input_ids)

    def infer(self, items: list[Encoded]) -> list[tuple]:
        return self.decode(items, self.forward(self.collate(items)))

    def _order(self, items: list[Encoded]) -> np.ndarray:
        """The order `encode` runs rows in: by text length, longest first."""
        order = np.argsort([-len(item.text) for item in items])
        if self.interleave:
            from sentence_transformers.base.model import BaseModel

            order = BaseModel._interleave_sorted_indices(order)
        return order

    def collate(self, items: list[Encoded]) -> dict[str, np.ndarray]:
        texts = [items[i].text for i in self._order(items)]
        features = self.module.preprocess(texts, prompt=self.prompt)
        # Tensors as arrays; `modality` and `prompt_length` (plain values) as 0-d arrays.
        return {
            key: value.numpy() if hasattr(value, "numpy") else np.asarray(value)
            for key, value in features.items()
        }

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        arrays = {key: value for key, value in batch.items() if value.ndim > 0}
        features: dict[str, Any] = to_model(arrays, self.device)
        features.update({key: value.item() for key, value in batch.items() if value.ndim == 0})
        with torch.inference_mode():
            embeddings = self.network(features)["sentence_embedding"]
        return {"sentence_embedding": embeddings.float().cpu().numpy()}

    def decode(self, items: list[Encoded], outputs: dict[str, np.ndarray]) -> list[tuple]:
        embeddings = outputs["sentence_embedding"]
        if self.normalize:
            import torch

            tensor = torch.nn.functional.normalize(torch.from_numpy(embeddings), p=2, dim=1)
            embeddings = tensor.numpy()
        vectors: list = [None] * len(items)
        for position, row in enumerate(self._order(items)):
            vectors[row] = (embeddings[position],)
        return vectors
