"""The job spec: YAML -> frozen pydantic models, rejected early with the key's path.

Each task family in `transforms.tasks` defines its own typed parameters; this module
composes them, so `params` of a `ner` task is checked against the ner parameters and an
unknown key anywhere is named with its full path and the accepted names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from transforms.models import DTYPES
from transforms.tasks import ADAPTERS, TaskAdapter

__all__ = ["JobSpec", "SpecError", "TaskSpec", "load_spec", "parse_spec"]

_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_DEVICE = r"^(auto|cpu|cuda(:(0|[1-9][0-9]*))?)$"
_PATTERN_HELP = {
    "name": "must start with a letter or _ and hold only letters, digits and _ "
    "(it prefixes the task's column names)",
    "device": "expected auto, cpu, cuda or cuda:N",
}


class SpecError(ValueError):
    """A job spec that cannot run; the message names each bad key's path."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TaskSpec(_Frozen):
    """One task of a job: what to run, on which column, with which model."""

    name: str = Field(pattern=_NAME, description="unique; prefixes the task's columns")
    task: str
    model: str | None = Field(None, description="hub id or local directory; default per task")
    revision: str = Field(
        "main", description="branch, tag or commit; the manifest records the commit"
    )
    input: str | None = Field(None, description="input column; defaults to text_column")
    device: str = Field("auto", pattern=_DEVICE)
    dtype: Literal[DTYPES] = "auto"  # type: ignore[valid-type]
    max_batch_tokens: StrictInt = Field(8192, gt=0, le=10_000_000)
    on_long_input: Literal["truncate", "chunk"] = Field(
        "truncate", description="truncate to the model's limit, or cover the text in windows"
    )
    trust_remote_code: StrictBool = False
    allow_pickle_weights: StrictBool = Field(
        False, description="load pickle (.bin) weights, which can run code; default safetensors"
    )
    inference_timeout_s: float | None = Field(
        None, gt=0, description="a micro-batch still running after this long fails its rows"
    )
    share_model: Literal["auto", "process", "machine"] = Field(
        "auto", description="one model per SDK process, or one per machine (auto: per GPU)"
    )
    params: Any = None

    @field_validator("params", mode="before")
    @classmethod
    def _empty_params(cls, value: Any) -> Any:
        return {} if value is None else value  # `params:` left empty in YAML

    @model_validator(mode="after")
    def _chunking_is_supported(self) -> TaskSpec:
        adapter = ADAPTERS.get(self.task)
        if self.on_long_input == "chunk" and adapter and not adapter.supports_chunking:
            supported = sorted(t for t, a in ADAPTERS.items() if a.supports_chunking)
            raise ValueError(
                f"on_long_input: 'chunk' is supported by {', '.join(supported) or 'no task'}; "
                f"{self.task!r} takes 'truncate'"
            )
        return self

    @property
    def model_id(self) -> str:
        """The model to load: the spec's, or the task's well-known default."""
        return self.model or ADAPTERS[self.task].default_model


def _task_variant(task_names: tuple[str, ...], params_type: type) -> type[TaskSpec]:
    return create_model(
        f"TaskSpec_{params_type.__name__}",
        __base__=TaskSpec,
        task=(Literal[task_names], ...),
        # A missing `params` is validated as {} (see _empty_params), so a family with
        # required parameters names them: tasks[0].params.candidate_labels.
        params=(params_type, Field(None, validate_default=True)),
    )


# One variant per task family, told apart by `task`: pydantic then checks `params`
# against the family's own parameter model, and an unknown task lists the known ones.
_VARIANTS = {
    adapter: _task_variant(adapter.tasks, adapter.params_type) for adapter in set(ADAPTERS.values())
}
_AnyTask = Annotated[Union[tuple(_VARIANTS.values())], Field(discriminator="task")]  # noqa: UP007


class JobSpec(_Frozen):
    """A whole job: defaults shared by all tasks, and the tasks in the order they run."""

    text_column: str = Field("text", min_length=1)
    rows_per_chunk: StrictInt = Field(512, gt=0, le=1_000_000)
    keep_order: StrictBool = False
    max_new_tokens_limit: StrictInt = Field(
        1024, gt=0, description="the most new tokens any generation task may ask for"
    )
    tasks: list[_AnyTask] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_are_unique(self) -> JobSpec:
        seen: set[str] = set()
        for i, task in enumerate(self.tasks):
            if task.name in seen:
                # "path: message", split apart again by _message.
                raise ValueError(
                    f"tasks[{i}].name: duplicate task name {task.name!r}; names must be unique"
                )
            seen.add(task.name)
        return self

    @model_validator(mode="after")
    def _tasks_can_be_built(self) -> JobSpec:
        for i, task in enumerate(self.tasks):
            requested = getattr(task.params, "max_new_tokens", None)
            if requested is not None and requested > self.max_new_tokens_limit:
                raise ValueError(
                    f"tasks[{i}].params.max_new_tokens: {requested} is above "
                    f"max_new_tokens_limit ({self.max_new_tokens_limit}); lower it or raise "
                    "the limit"
                )
            try:  # what only the adapter can check: templates, files it reads, …
                self.adapter(task)
            except ValueError as err:
                raise ValueError(f"tasks[{i}]: {err}") from None
        return self

    def adapter(self, task: TaskSpec) -> TaskAdapter:
        """The task's adapter, configured for this job."""
        return ADAPTERS[task.task](
            task.name,
            task.params,
            input_column=self.input_column(task),
            on_long_input=task.on_long_input,
        )

    def input_column(self, task: TaskSpec) -> str:
        """The column a task reads."""
        return task.input or self.text_column


def _location(loc: tuple) -> str:
    # pydantic puts the matched task variant's tag after `tasks[i]`; drop it.
    if len(loc) > 2 and loc[0] == "tasks" and isinstance(loc[1], int) and loc[2] in ADAPTERS:
        loc = loc[:2] + loc[3:]
    parts: list[str] = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _message(error: dict) -> tuple[str, str]:
    """(where, what) for one pydantic error, in the spec's own words."""
    where, kind = _location(error["loc"]), error["type"]
    known = ", ".join(ADAPTERS)
    if kind == "extra_forbidden":
        accepted = _accepted_keys(error["loc"])
        return where, "unknown key" + (
            f"; accepted keys: {', '.join(accepted)}" if accepted else ""
        )
    if kind == "union_tag_invalid":
        return f"{where}.task", f"unknown task {error['ctx']['tag']!r}; expected one of: {known}"
    if kind == "union_tag_not_found":
        return f"{where}.task", f"missing; expected one of: {known}"
    if kind == "string_pattern_mismatch" and error["loc"][-1] in _PATTERN_HELP:
        return where, f"{_PATTERN_HELP[error['loc'][-1]]}, got {error['input']!r}"
    if kind == "literal_error":
        return where, f"{error['msg']}, got {error['input']!r}"
    if kind == "value_error":
        message = str(error["ctx"]["error"])
        key = re.match(r"^([\w\[\].]+): ", message)  # a model validator's "key: message"
        if key:
            message = message[key.end() :]
            where = key[1] if where == "(top level)" else f"{where}.{key[1]}"
        return where, message
    return where, error["msg"]


def _explain(err: ValidationError, source: str) -> SpecError:
    lines = []
    for error in err.errors():
        where, message = _message(error)
        lines.append(f"  {where}: {message}")
    return SpecError(f"invalid job spec {source}:\n" + "\n".join(lines))


def _accepted_keys(loc: tuple) -> list[str]:
    """The keys allowed beside an unknown key at `loc`, for the error message."""
    model: Any = JobSpec
    path = list(loc[:-1])
    if len(path) > 2 and path[0] == "tasks" and path[2] in ADAPTERS:
        model = _VARIANTS[ADAPTERS[path[2]]]
        path = path[3:]
    elif path[:1] == ["tasks"]:
        model = TaskSpec
        path = path[2:]
    for item in path:
        field = getattr(model, "model_fields", {}).get(item)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def parse_spec(data: Any, source: str = "") -> JobSpec:
    """Validates a spec already parsed from YAML or JSON.

    Raises:
        SpecError: with one line per problem: the key's path, what is wrong, and the
            accepted values.
    """
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec {source}: expected a mapping of keys at the top level")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from None
    except ValueError as err:  # raised by a validator outside pydantic's wrapping
        raise SpecError(f"invalid job spec {source}: {err}") from None


def load_spec(path: str | Path) -> JobSpec:
    """Reads and validates a YAML job spec.

    Raises:
        SpecError: the file is missing, is not YAML, or fails validation.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(f"cannot read job spec {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise SpecError(
            f"job spec {path} is not UTF-8 text: {err.reason} at byte {err.start}"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"job spec {path} is not valid YAML: {err}") from None
    return parse_spec(data, str(path))
