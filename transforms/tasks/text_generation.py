"""text-generation: a decoder-only model continues each row's prompt, or answers it.

Prompts are tokenized once per chunk and generated in length-sorted, left-padded
micro-batches, one `generate` call per micro-batch. A prompt template can fill the
prompt from several columns; chat prompts (`system`, `messages`, `chat: true`) are
rendered with the model's chat template (`transforms.chat_prompt`); a `json_schema`
holds the output to a JSON Schema and writes it as a typed struct column
(`transforms.json_schema`, `transforms.grammar`); a blocklist can flag (and blank)
outputs that match it.

The runner splits at `generate` (`SplitRunner`): token ids in, token ids out. Behind a
model server (`share_model: machine`) each caller tokenizes, renders chat templates,
collates left-padded arrays and decodes (stop strings, JSON parsing, blocklist) with a
front that loads no weights (`TextGeneration.load_front`); the server only generates,
with the stopping criteria, grammar constraint and seeded samplers, where the model is.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from transforms.json_schema import (
    SchemaError,
    arrow_type,
    closed_schema,
    load_schema,
    to_arrow_value,
)
from transforms.models import ResolvedModel, load_kwargs, place_model
from transforms.tasks.base import (
    Encoded,
    InvalidInput,
    Params,
    TaskAdapter,
    check_text,
    model_max_length,
    pad_ids,
    to_model,
)

__all__ = [
    "ChatMessage",
    "InvalidOutput",
    "TextGeneration",
    "TextGenerationParams",
    "parse_template",
    "read_blocklist",
]

_SAMPLING_KNOBS = ("temperature", "top_p", "top_k")


class InvalidOutput(InvalidInput):
    """A row whose generated text fails its check (not JSON of the schema, …)."""


class ChatMessage(Params):
    """One message of a chat prompt; `content` is a template like `prompt`."""

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content_is_a_template(cls, value: str) -> str:
        parse_template(value)
        return value


class TextGenerationParams(Params):
    """Parameters of text generation.

    Attributes:
        max_new_tokens: the most tokens generated per row.
        do_sample: sample the next token instead of taking the most likely one.
        temperature: sampling temperature (`do_sample` only); null: the model's default.
        top_p: nucleus sampling mass (`do_sample` only); null: the model's default.
        top_k: sample among the k most likely tokens, 0 for all (`do_sample` only);
            null: the model's default.
        num_beams: beam search width; null: the model's default (usually 1).
        repetition_penalty: > 1 discourages repeats; null: the model's default.
        stop: the output is cut before the first occurrence of any of these strings,
            and a row's generation ends once one appears.
        seed: with `do_sample`, the same prompt gives the same output on every run,
            whatever rows share its micro-batch (seeded rows are generated one at a
            time); greedy decoding and beam search need none.
        return_full_text: prepend the prompt to the output (the old pipeline's default);
            false: the continuation only.
        prompt: a template such as "Review: {text}\\nSummary:" filled per row with the
            named columns' values (`{{` and `}}` are literal braces); null: the input
            column's text is the prompt.
        blocklist: a UTF-8 file of words or `/regexes/`, one per line (`#` comments and
            blank lines are skipped), matched case-insensitively against the generated
            text; adds the column `<name>_flagged`.
        drop_flagged: blank (null) outputs the blocklist flags.
        chat: render the prompt with the model's chat template, as the user's turn
            (the input column's text when there is no `prompt`); null: chat when
            `system` or `messages` is given.
        system: a system message (a template too) before the user's turn.
        messages: the whole conversation instead of `system` and `prompt`: role and
            content (a template) per message, ending with a user message.
        json_schema: a JSON Schema (inline, or the path of a JSON file) the output is
            held to while it is generated; the column is then a struct typed from the
            schema, and a row whose output is not complete JSON of it (cut by
            `max_new_tokens`) fails with the reason.
        raw_output: with `json_schema`, also write the generated text as `<name>_raw`.
    """

    max_new_tokens: int = Field(50, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    num_beams: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: tuple[str, ...] = ()
    seed: int | None = Field(None, ge=0, lt=2**63)
    return_full_text: bool = False
    prompt: str | None = None
    blocklist: str | None = None
    drop_flagged: bool = False
    chat: bool | None = None
    system: str | None = None
    messages: tuple[ChatMessage, ...] | None = Field(None, min_length=1)
    json_schema: dict[str, Any] | str | None = None
    raw_output: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings_are_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("prompt", "system")
    @classmethod
    def _prompt_is_a_template(cls, value: str | None) -> str | None:
        if value is not None:
            parse_template(value)
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema_is_typed(cls, value: dict | str | None) -> dict | None:
        # Read (from its file) and typed here, so a bad schema fails before any data is
        # read, and the manifest records the schema itself, not just a path.
        if value is None:
            return None
        from transforms.grammar import GrammarError, compile_json_schema

        try:
            schema = load_schema(value)
            arrow_type(schema)
            compile_json_schema(closed_schema(schema))
        except (SchemaError, GrammarError) as err:
            raise ValueError(str(err)) from None
        return schema

    @property
    def is_chat(self) -> bool:
        """Whether prompts are rendered with the model's chat template."""
        return bool(self.chat) or self.system is not None or self.messages is not None

    @model_validator(mode="after")
    def _options_fit_together(self) -> TextGenerationParams:
        if not self.do_sample:
            knobs = [k for k in _SAMPLING_KNOBS if getattr(self, k) is not None]
            if knobs:
                raise ValueError(
                    f"{', '.join(knobs)} only apply when sampling; set do_sample: true "
                    "or remove them"
                )
        if self.do_sample and self.seed is not None and (self.num_beams or 1) > 1:
            raise ValueError(
                "seed with do_sample and num_beams > 1 (beam sampling) is not supported; "
                "use num_beams: 1 or drop the seed"
            )
        if self.drop_flagged and self.blocklist is None:
            raise ValueError("drop_flagged needs a blocklist; set blocklist: <file>")
        if self.chat is False and (self.system is not None or self.messages is not None):
            raise ValueError("system and messages are chat prompts; remove chat: false")
        if self.messages is not None:
            if self.prompt is not None or self.system is not None:
                raise ValueError(
                    "messages holds the whole conversation; put the system and user turns "
                    "in it instead of system / prompt"
                )
            if self.messages[-1].role != "user":
                raise ValueError("messages must end with a user message the model answers")
        if self.is_chat and self.return_full_text:
            raise ValueError(
                "return_full_text applies to plain prompts; a chat output is the answer only"
            )
        if self.json_schema is not None:
            if self.stop:
                raise ValueError(
                    "stop does not apply with json_schema: the schema decides where the output ends"
                )
            if (self.num_beams or 1) > 1:
                raise ValueError("json_schema needs num_beams: 1 (one matcher per row)")
            if self.return_full_text:
                raise ValueError("return_full_text does not apply with json_schema")
        elif self.raw_output:
            raise ValueError("raw_output needs a json_schema")
        return self


def parse_template(template: str) -> list[tuple[str, str | None]]:
    """Splits a prompt template into (literal text, column name or None) pieces.

    Placeholders name columns: `{text}`; `{{` and `}}` are literal braces. Format
    specs, conversions, attribute and index access and positional fields are refused,
    so a template can only ever paste cell values in.

    Raises:
        ValueError: the template is empty, has unbalanced braces, or a placeholder that
            is not a plain column name.
    """
    if not template:
        raise ValueError("prompt template is empty; leave `prompt` unset to use the text")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"prompt template {template!r}: {err}; write {{{{ and }}}} for literal braces"
        ) from None
    pieces = []
    for literal, field, spec, conversion in parsed:
        if field is None:
            pieces.append((literal, None))
            continue
        shown = (
            "{"
            + field
            + ("!" + conversion if conversion else "")
            + (":" + spec if spec else "")
            + "}"
        )
        if not field or field.isdigit():
            raise ValueError(
                f"prompt template: positional placeholder {shown} is not allowed; "
                "name a column, e.g. {text}"
            )
        if conversion is not None or spec:
            raise ValueError(
                f"prompt template: placeholder {shown} has a conversion or format spec; "
                "only plain column names like {text} are allowed"
            )
        if any(c in field for c in ".[]"):
            raise ValueError(
                f"prompt template: placeholder {shown} uses attribute or index access; "
                "only plain column names like {text} are allowed"
            )
        pieces.append((literal, field))
    return pieces


def _folder_has_chat_template(path: str) -> bool:
    """Whether a saved tokenizer folder carries a chat template (in any of its forms)."""
    if any(
        os.path.isfile(os.path.join(path, name))
        for name in ("chat_template.jinja", "chat_template.json")
    ):
        return True
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as handle:
            return bool(json.load(handle).get("chat_template"))
    except (OSError, ValueError):
        return False


def _prompt_cell(columns: dict[str, list], field: str, row: int) -> str | InvalidInput:
    """One cell a prompt pastes in, as text; a null or unreadable cell fails its row."""
    value = columns[field][row]
    if value is None:
        return InvalidInput(f"prompt column {field!r} is null")
    if isinstance(value, InvalidInput):
        return InvalidInput(f"prompt column {field!r}: {value}")
    return value if isinstance(value, str) else str(value)


def _hub_has_chat_template(model: ResolvedModel) -> bool | None:
    """Whether a hub model carries a chat template at its pinned commit; None: unknown.

    Reads the cached snapshot when there is one (offline too), else fetches the small
    tokenizer files only. Unknown (no network, no cache): the worker checks it on load.
    """
    from transforms.models import cached_snapshot

    cached = cached_snapshot(model)
    if cached is not None:
        return _folder_has_chat_template(cached.model)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        try:
            path = hf_hub_download(model.model, name, revision=model.revision)
        except LocalEntryNotFoundError:
            return None  # offline, and not cached
        except EntryNotFoundError:
            continue  # the repository has no such file
        except Exception:
            return None
        if name != "tokenizer_config.json" or _folder_has_chat_template(os.path.dirname(path)):
            return True
    return False


def read_blocklist(path: str) -> tuple[str, ...]:
    """The regular expressions of a blocklist file, one per entry.

    A line is a word or phrase, matched case-insensitively on word boundaries, or a
    regex wrapped in slashes (`/colou?r/`), also case-insensitive. Blank lines and
    lines starting with `#` are skipped.

    Raises:
        ValueError: the file cannot be read or holds an invalid regex.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as err:
        raise ValueError(f"cannot read blocklist {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"blocklist {path} is not UTF-8 text: {err.reason}") from None
    patterns = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if len(entry) > 2 and entry.startswith("/") and entry.endswith("/"):
            pattern = entry[1:-1]
        else:
            # \b fails next to a non-word character (a word like "c++"), lookarounds do not.
            pattern = rf"(?<!\w){re.escape(entry)}(?!\w)"
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as err:
            raise ValueError(
                f"blocklist {path} line {number}: bad regex {entry!r}: {err}"
            ) from None
        patterns.append(pattern)
    return tuple(patterns)


class TextGeneration(TaskAdapter):
    """Adapter for `text-generation` with decoder-only (causal LM) models."""

    tasks = ("text-generation",)
    params_type = TextGenerationParams
    default_model = "openai-community/gpt2"
    # A row's cost counts its new tokens, the cache it grows to; but each decoding step
    # reads every weight once for the whole batch, so generation gains from more rows
    # than the encoder tasks' budget leaves. Measured on CPU (gpt2 shape, 64 prompts,
    # 32 new tokens): 51.5 new tokens/s at 2048, 55-57 at 3072 and at 4096.
    batch_tokens_factor = 2
    #: A GGUF file (`model: path/to/file.gguf`) loads as a causal LM.
    loads_gguf = True

    def __init__(self, name: str, params: Params | None = None, **kwargs: Any):
        super().__init__(name, params, **kwargs)
        params = self.params
        # Parsed and read here, where the pipeline is built: a bad template or a missing
        # blocklist fails before any data is read, and workers need no file.
        self.template = parse_template(params.prompt) if params.prompt is not None else None
        self.blocklist = read_blocklist(params.blocklist) if params.blocklist is not None else None
        self.messages = self._chat_messages() if params.is_chat else None
        self.output_type = (
            arrow_type(params.json_schema) if params.json_schema is not None else pa.string()
        )

    def _chat_messages(self) -> list[tuple[str, list[tuple[str, str | None]]]]:
        """(role, template pieces) per message; the user's turn defaults to the text."""
        params = self.params
        if params.messages is not None:
            return [(m.role, parse_template(m.content)) for m in params.messages]
        messages = []
        if params.system is not None:
            messages.append(("system", parse_template(params.system)))
        messages.append(("user", self.template or [("", self.input_column)]))
        return messages

    def check_model(self, model: str) -> None:
        """Refuses a local model a chat prompt cannot run on: one without a chat template.

        Hub models are checked on the launcher by `resolved_parameters`.

        Raises:
            ValueError: the model is a local folder or GGUF file without a chat template.
        """
        if self.messages is None:
            return
        from transforms.models import PACKAGE_PREFIX, ModelError, gguf_metadata, package_file

        try:
            path = package_file(model) if model.startswith(PACKAGE_PREFIX) else model
        except ModelError:
            return  # resolving the model reports it, beside any other model problem
        if os.path.isfile(path) and path.lower().endswith(".gguf"):
            found = "tokenizer.chat_template" in gguf_metadata(path)
        elif os.path.isdir(path):
            found = _folder_has_chat_template(path)
        else:
            return
        if not found:
            raise ValueError(
                f"model {model!r} has no chat template, so chat prompts (system, messages, "
                "chat: true) cannot be rendered; use a plain `prompt` or an instruct model"
            )

    def resolved_parameters(self, model: ResolvedModel) -> dict[str, Any]:
        """Checks a hub model's chat template on the launcher, before any row is read.

        Raises:
            ValueError: a chat prompt names a hub model without a chat template.
        """
        hub_chat = self.messages is not None and model.source == "hub"
        if hub_chat and _hub_has_chat_template(model) is False:
            raise ValueError(
                f"model {model.model!r} has no chat template, so chat prompts (system, "
                "messages, chat: true) cannot be rendered; use a plain `prompt` or an "
                "instruct model"
            )
        return {}

    def chat_columns(self) -> list[str]:
        """The column of each cell a chat prompt pastes in, in the order of its slots."""
        return [
            field for _, pieces in self.messages or () for _, field in pieces if field is not None
        ]

    @property
    def deterministic(self) -> bool:
        # Sampling without a seed draws a new output per row, wanted even for equal prompts.
        return not (self.params.do_sample and self.params.seed is None)

    def fields(self) -> list[pa.Field]:
        fields = [pa.field(self.name, self.output_type)]
        if self.params.raw_output:
            fields.append(pa.field(f"{self.name}_raw", pa.string()))
        if self.blocklist is not None:
            fields.append(pa.field(f"{self.name}_flagged", pa.bool_()))
        return fields

    def read_columns(self) -> list[str]:
        columns = [self.input_column]
        pieces = self.template or []
        for _, message in self.messages or ():
            pieces = [*pieces, *message]
        for _, field in pieces:
            if field is not None and field not in columns:
                columns.append(field)
        return columns

    def text_columns(self) -> list[str]:
        # A prompt template pastes any cell as its text (`{stars}` of an int column).
        return [self.input_column]

    def row_inputs(self, columns: dict[str, list]) -> list[Any]:
        texts = [check_text(value) for value in columns[self.input_column]]
        if self.messages is not None:
            slots = self.chat_columns()
            return [
                text if isinstance(text, InvalidInput) else self._cells(columns, slots, row)
                for row, text in enumerate(texts)
            ]
        if self.template is None:
            return texts
        prompts: list[str | InvalidInput] = []
        for row, text in enumerate(texts):
            prompts.append(text if isinstance(text, InvalidInput) else self._render(columns, row))
        return prompts

    def _cells(
        self, columns: dict[str, list], slots: list[str], row: int
    ) -> tuple[str, ...] | InvalidInput:
        # A chat prompt's cells stay apart: the runner tokenizes them as plain text.
        cells = []
        for field in slots:
            cell = _prompt_cell(columns, field, row)
            if isinstance(cell, InvalidInput):
                return cell
            cells.append(cell)
        return tuple(cells)

    def _render(self, columns: dict[str, list], row: int) -> str | InvalidInput:
        # Values are pasted, never formatted: braces inside a cell stay literal.
        parts = []
        for literal, field in self.template:
            parts.append(literal)
            if field is not None:
                cell = _prompt_cell(columns, field, row)
                if isinstance(cell, InvalidInput):
                    return cell
                parts.append(cell)
        return "".join(parts)

    def load(self, model: ResolvedModel, device: str, dtype: str) -> _TextGenerationRunner:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = load_kwargs(model, dtype)
        tokenizer = AutoTokenizer.from_pretrained(
            model.model,
            revision=kwargs.get("revision"),
            trust_remote_code=model.trust_remote_code,
            gguf_file=model.gguf_file,
        )
        if self.messages is not None:
            from transforms.chat_prompt import ChatPrompt

            # Before the weights: a model without a chat template fails at once.
            ChatPrompt(tokenizer, self.messages)
        network = AutoModelForCausalLM.from_pretrained(model.model, **kwargs)
        return self.runner(tokenizer, place_model(network, device, dtype), device)

    def load_front(self, model: ResolvedModel) -> _TextGenerationRunner:
        """The runner without weights: tokenizer, config and generation config only.

        GGUF files are supported: their tokenizer and config are read from the file's
        header, parsed once per load (`shared_gguf_readers`; about 6-10 s of one Zen 3
        core for SmolLM2's vocabulary, once per process and task). That is paid once,
        while a server running whole chunks would tokenize and decode every caller's
        rows in its one process, serialized with the forward passes.
        """
        from transformers import AutoConfig, AutoTokenizer

        from transforms.gguf_reads import shared_gguf_readers

        pinned: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
        if model.revision is not None:
            pinned["revision"] = model.revision
        if model.gguf_file is not None:
            pinned["gguf_file"] = model.gguf_file
        with shared_gguf_readers():
            tokenizer = AutoTokenizer.from_pretrained(model.model, **pinned)
            config = AutoConfig.from_pretrained(model.model, **pinned)
        generation_config = _saved_generation_config(model, config)
        return self._runner(tokenizer, config, generation_config)

    def runner(self, tokenizer, model, device: str = "cpu") -> _TextGenerationRunner:
        """The runner for a tokenizer and model already loaded (tests, notebooks)."""
        return self._runner(tokenizer, model.config, model.generation_config, model, device)

    def _runner(
        self, tokenizer, config, generation_config, model=None, device: str = "meta"
    ) -> _TextGenerationRunner:
        chat = None
        if self.messages is not None:
            from transforms.chat_prompt import ChatPrompt

            chat = ChatPrompt(tokenizer, self.messages)
        return _TextGenerationRunner(
            tokenizer,
            config,
            generation_config,
            self.params,
            self.blocklist,
            chat,
            self.output_type,
            model=model,
            device=device,
        )


def _saved_generation_config(model: ResolvedModel, config) -> Any:
    """The generation config `from_pretrained` gives the model, without loading it:
    the saved generation_config.json, else one made from config.json, else (a GGUF
    file, which has neither) one made from the config read from the file."""
    from transformers import GenerationConfig

    pinned: dict[str, Any] = {}
    if model.revision is not None:
        pinned["revision"] = model.revision
    try:
        return GenerationConfig.from_pretrained(model.model, **pinned)
    except OSError:
        pass
    if model.gguf_file is None:
        try:
            return GenerationConfig.from_pretrained(
                model.model, config_file_name="config.json", _from_model_config=True, **pinned
            )
        except OSError:
            pass
    return GenerationConfig.from_model_config(config)


class _TextGenerationRunner:
    """`prepare / cost / collate / decode` need the tokenizer and config only;
    `forward` (`generate`) needs the model: None in a front (`TextGeneration.load_front`).

    `forward` takes left-padded `input_ids` / `attention_mask` and gives each row's
    generated ids up to (not including) end of sequence: `ids` padded with 0 and their
    `lengths`.
    """

    def __init__(
        self,
        tokenizer,
        config,
        generation_config,
        params: TextGenerationParams,
        blocklist: tuple[str, ...] | None,
        chat: Any = None,
        output_type: pa.DataType | None = None,
        *,
        model: Any = None,
        device: str = "meta",
    ):
        # Decoder-only models continue the last token: pad on the left so every row's
        # prompt ends at the same position; generate derives position ids from the mask.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.params = params
        self.context = model_max_length(tokenizer, config)
        self.max_prompt = self.context - params.max_new_tokens
        eos = generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.beams = params.num_beams or generation_config.num_beams or 1
        self.seeded = params.do_sample and params.seed is not None
        if self.seeded and self.beams > 1:
            raise ValueError(
                f"the model's default num_beams is {self.beams}; a seed needs num_beams: 1"
            )
        self.blocklist = (
            None if blocklist is None else [re.compile(p, re.IGNORECASE) for p in blocklist]
        )
        self.chat = chat
        self.output_type = output_type
        self.constraint = None
        if model is not None:
            self._generation_settings(generation_config)

    def _generation_settings(self, generation_config) -> None:
        """What `generate` runs with, beside the model: kwargs, stopping criteria,
        grammar constraint, the warpers of seeded sampling."""
        from transformers import StoppingCriteriaList, StopStringCriteria

        params, tokenizer = self.params, self.tokenizer
        self.generate_kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": params.do_sample,
            "pad_token_id": tokenizer.pad_token_id,
        }
        for name in ("temperature", "top_p", "top_k", "num_beams", "repetition_penalty"):
            if getattr(params, name) is not None:
                self.generate_kwargs[name] = getattr(params, name)
        self.warpers: list = []
        if self.seeded:
            # generate adds its sampling warpers after any custom logits processor, so a
            # seeded row runs as greedy search over scores warped (as transformers would)
            # and then sampled here, with the row's own random generator.
            self.generate_kwargs["do_sample"] = False
            for name in _SAMPLING_KNOBS:
                self.generate_kwargs.pop(name, None)
            self.warpers = _sampling_warpers(params, generation_config)
        if params.stop:
            self.generate_kwargs["stopping_criteria"] = StoppingCriteriaList(
                [StopStringCriteria(tokenizer, list(params.stop))]
            )
        if params.json_schema is not None:
            from transforms.grammar import JsonSchemaConstraint, compile_json_schema

            grammar = compile_json_schema(closed_schema(params.json_schema))
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self.constraint = JsonSchemaConstraint(tokenizer, grammar, self.eos_ids, vocab)

    def prepare(self, prompts: Sequence[Any]) -> list[Encoded | InvalidInput]:
        if not prompts:
            return []  # the tokenizer rejects an empty batch
        # No truncation: a cut prompt would silently change what the model continues.
        # verbose=False: a too-long prompt is reported per row below, not as a warning.
        if self.chat is not None:
            batch_ids = self.chat.encode(prompts)
            prompts = [""] * len(prompts)  # a chat output never includes its prompt
        else:
            batch_ids = self.tokenizer(
                list(prompts),
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,
            )["input_ids"]
        items: list[Encoded | InvalidInput] = []
        for prompt, ids in zip(prompts, batch_ids, strict=True):
            if not ids:
                items.append(InvalidInput("prompt has no tokens"))
            elif len(ids) > self.max_prompt:
                items.append(
                    InvalidInput(
                        f"prompt is {len(ids)} tokens; the model's context of {self.context} "
                        f"positions leaves {max(self.max_prompt, 0)} for the prompt after "
                        f"max_new_tokens {self.params.max_new_tokens}; shorten the input or "
                        "lower max_new_tokens"
                    )
                )
            else:
                items.append(Encoded(text=prompt, input_ids=ids))
        return items

    def cost(self, item: Encoded) -> int:
        # The cache grows to prompt + new tokens for every beam.
        return (len(item.input_ids) + self.params.max_new_tokens) * self.beams

    def infer(self, items: list[Encoded]) -> list[tuple]:
        return self.decode(items, self.forward(self.collate(items)))

    def collate(self, items: list[Encoded]) -> dict[str, np.ndarray]:
        return pad_ids(self.tokenizer, [item.input_ids for item in items], right=False)

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model is None:
            raise RuntimeError("this text-generation runner is a front: it has no model")
        if not self.seeded:
            return _padded_rows(self._generate(batch))
        # One row per call: no padding, so a row's logits, and hence its draws, are
        # bit-for-bit the same whatever rows share its micro-batch.
        rows = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            prompt = ids[mask.astype(bool)][None, :]
            one = {"input_ids": prompt, "attention_mask": np.ones_like(prompt)}
            rows.extend(self._generate(one, _SeededSampler(self.params.seed)))
        return _padded_rows(rows)

    def decode(self, items: list[Encoded], outputs: dict[str, np.ndarray]) -> list[tuple]:
        ids, lengths = outputs["ids"], outputs["lengths"]
        return [
            self._postprocess(item, ids[row, : lengths[row]].tolist())
            for row, item in enumerate(items)
        ]

    def generate(self, items: list[Encoded]) -> list[list[int]]:
        """The generated token ids of each item, up to (not including) end of sequence."""
        outputs = self.forward(self.collate(items))
        return [
            outputs["ids"][row, : outputs["lengths"][row]].tolist() for row in range(len(items))
        ]

    def _generate(
        self, batch: dict[str, np.ndarray], sampler: _SeededSampler | None = None
    ) -> list[list[int]]:
        import torch
        from transformers import LogitsProcessorList

        rows = batch["input_ids"].shape[0]
        inputs = to_model(batch, self.device)
        kwargs = dict(self.generate_kwargs)
        # The grammar masks first: temperature and top-k / top-p then see allowed tokens only.
        processors = [] if self.constraint is None else [self.constraint.for_batch(rows)]
        if sampler is not None:
            processors += [*self.warpers, sampler]
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        width = inputs["input_ids"].shape[1]
        results = []
        for sequence in output[:, width:].tolist():
            end = next((i for i, t in enumerate(sequence) if t in self.eos_ids), len(sequence))
            results.append(sequence[:end])
        return results

    def _postprocess(self, item: Encoded, ids: list[int]) -> tuple | InvalidOutput:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if cuts:
            text = text[: min(cuts)]
        output: Any = item.text + text if self.params.return_full_text else text
        values: list = []
        if self.params.json_schema is not None:
            output = self._structured(text, len(ids))
            if isinstance(output, InvalidOutput):
                return output
            if self.params.raw_output:
                values.append(text)
        if self.blocklist is None:
            return (output, *values)
        # Only what the model wrote is checked, not the prompt the user supplied.
        flagged = any(pattern.search(text) for pattern in self.blocklist)
        if flagged and self.params.drop_flagged:
            output = None
            values = [None for _ in values]
        return (output, *values, flagged)

    def _structured(self, text: str, tokens: int) -> Any:
        """The output parsed and typed, or why it cannot be."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            cut = tokens >= self.params.max_new_tokens
            why = (
                f"cut by max_new_tokens ({self.params.max_new_tokens}) before the JSON "
                "was complete; raise max_new_tokens"
                if cut
                else f"not JSON ({err.msg} at character {err.pos})"
            )
            return InvalidOutput(f"output {why}: {text[:200]!r}")
        try:
            return to_arrow_value(value, self.output_type)
        except ValueError as err:
            return InvalidOutput(f"output does not fit the schema: {err}: {text[:200]!r}")


def _padded_rows(rows: list[list[int]]) -> dict[str, np.ndarray]:
    """Token id lists of different lengths as `ids` (padded with 0) and `lengths`."""
    lengths = np.array([len(row) for row in rows], dtype=np.int64)
    ids = np.zeros((len(rows), int(lengths.max(initial=0))), dtype=np.int64)
    for row, sequence in enumerate(rows):
        ids[row, : len(sequence)] = sequence
    return {"ids": ids, "lengths": lengths}


def _sampling_warpers(params: TextGenerationParams, config) -> list:
    """The warpers generate applies when sampling, in its order, with the same defaults:
    the spec's value, else the model's generation config, else transformers' default."""
    from transformers import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    def value(name: str, default):
        chosen = getattr(params, name, None)
        if chosen is None:
            chosen = getattr(config, name, None)
        return default if chosen is None else chosen

    warpers: list = []
    temperature = value("temperature", 1.0)
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    top_k = value("top_k", 50)
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    top_p = value("top_p", 1.0)
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    min_p = value("min_p", None)
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=min_p))
    typical_p = value("typical_p", 1.0)
    if typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=typical_p))
    return warpers


class _SeededSampler:
    """Draws each next token from the warped scores with its own random generator.

    The Gumbel-max trick: argmax(scores + Gumbel noise) is an exact sample from
    softmax(scores). The drawn token is left the only one with any probability, so the
    greedy step that follows picks it. No global random state is read or changed, so
    other threads sampling at the same time cannot shift this row's draws.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.generator = None

    def __call__(self, input_ids, scores):
        import torch

        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        uniform = torch.rand(
            scores.shape, generator=self.generator, device=scores.device, dtype=torch.float32
        )
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        choice = (scores.float() + gumbel).argmax(dim=-1, keepdim=True)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(-1, choice, 0.0)
