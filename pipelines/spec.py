"""The job spec: YAML -> frozen pydantic models, rejected early with the key's path.

Each task family in `transforms.tasks` defines its own typed parameters; this module
composes them, so `params` of a `ner` task is checked against the ner parameters and an
unknown key anywhere is named with its full path and the accepted names. A plugin task
(`module.path:ClassName` or an installed `beam_enrich.tasks` entry point) is checked the
same way against its own adapter's parameters.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)

from transforms.chunks import ERRORS_COLUMN
from transforms.errors import JobError
from transforms.models import DTYPES
from transforms.tasks import (
    ADAPTERS,
    PLUGIN_GROUP,
    TaskAdapter,
    adapter_for,
    installed_plugins,
    is_plugin_task,
)

__all__ = ["JobSpec", "SpecError", "TaskSpec", "load_spec", "parse_spec"]

_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_DEVICE = r"^(auto|cpu|cuda(:(0|[1-9][0-9]*))?)$"
_PATTERN_HELP = {
    "name": "must start with a letter or _ and hold only letters, digits and _ "
    "(it prefixes the task's column names)",
    "device": "expected auto, cpu, cuda or cuda:N",
}


# Quality-gate limits (pipelines.quality_gate): a run whose task fails more rows exits 3.
_FailedRows = Annotated[StrictInt, Field(ge=0)]
_FailedFraction = Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)]


class SpecError(JobError):
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
    max_batch_tokens: StrictInt | None = Field(
        None,
        gt=0,
        le=10_000_000,
        description="padded tokens (rows x longest row) per forward pass; "
        "default 2048 on CPU, 8192 on GPU (twice that for text-generation)",
    )
    on_long_input: Literal["truncate", "chunk"] = Field(
        "truncate",
        description="truncate to the model's limit, or cover the text in windows; "
        "default per task (chunk for question-answering, as 4.x did)",
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
    compile: StrictBool = Field(
        False,
        description="compile the model with torch.compile on each worker: a slower start "
        "(its first batches compile), then faster forward passes; for long runs",
    )
    max_failed_rows: _FailedRows | None = Field(
        None, description="quality gate for this task (overrides the run's): exit 3 above it"
    )
    max_failed_fraction: _FailedFraction | None = Field(
        None,
        description="quality gate for this task (overrides the run's): exit 3 when a larger "
        "fraction of its rows fails",
    )
    params: Any = None

    #: The adapter whose parameters a variant checks (set by `_task_variant`).
    adapter_class: ClassVar[type[TaskAdapter] | None] = None

    @field_validator("params", mode="before")
    @classmethod
    def _empty_params(cls, value: Any) -> Any:
        return {} if value is None else value  # `params:` left empty in YAML

    @model_validator(mode="after")
    def _chunking_is_supported(self) -> TaskSpec:
        adapter = type(self).adapter_class
        if self.on_long_input == "chunk" and adapter and not adapter.supports_chunking:
            supported = sorted(t for t, a in ADAPTERS.items() if a.supports_chunking)
            raise ValueError(
                f"on_long_input: 'chunk' is supported by {', '.join(supported) or 'no task'}; "
                f"{self.task!r} takes 'truncate'"
            )
        return self

    @model_validator(mode="after")
    def _model_is_known(self) -> TaskSpec:
        adapter = type(self).adapter_class
        if self.model is None and adapter and not adapter.default_model:
            raise ValueError(
                f"model: task {self.task!r} has no default model; set `model:` to a hub id "
                "or a local directory"
            )
        return self

    @property
    def model_id(self) -> str:
        """The model to load: the spec's, or the task's well-known default."""
        return self.model or self.adapter_type.default_model

    @property
    def adapter_type(self) -> type[TaskAdapter]:
        """The adapter class that runs this task: a built-in family or a plugin."""
        return type(self).adapter_class or adapter_for(self.task)


def _task_variant(adapter: type[TaskAdapter], task_names: tuple[str, ...]) -> type[TaskSpec]:
    variant = create_model(
        f"TaskSpec_{adapter.params_type.__name__}",
        __base__=TaskSpec,
        task=(Literal[task_names], ...),
        on_long_input=(
            Literal["truncate", "chunk"],
            Field(
                adapter.default_on_long_input,
                description=TaskSpec.model_fields["on_long_input"].description,
            ),
        ),
        # A missing `params` is validated as {} (see _empty_params), so a family with
        # required parameters names them: tasks[0].params.candidate_labels.
        params=(adapter.params_type, Field(None, validate_default=True)),
    )
    variant.adapter_class = adapter
    return variant


@functools.lru_cache(maxsize=64)
def _plugin_variant(adapter: type[TaskAdapter], task: str) -> type[TaskSpec]:
    return _task_variant(adapter, (task,))


# One variant per task family, told apart by `task`: pydantic then checks `params`
# against the family's own parameter model, and an unknown task lists the known ones.
_VARIANTS = {adapter: _task_variant(adapter, adapter.tasks) for adapter in set(ADAPTERS.values())}
_BuiltInTask = Annotated[Union[tuple(_VARIANTS.values())], Field(discriminator="task")]  # noqa: UP007


def _built_in_or_plugin(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # A plugin's variant is made when its task is first seen, since only then is its
    # parameter model known; its errors keep their paths (tasks[0].params.min_score).
    task = value.get("task") if isinstance(value, dict) else getattr(value, "task", None)
    if not (isinstance(task, str) and is_plugin_task(task)):
        return handler(value)
    try:
        adapter = adapter_for(task)
    except ValueError as err:
        raise ValueError(f"task: {err}") from None  # "key: message", split by _message
    return _plugin_variant(adapter, task).model_validate(value)


_PluginTaskSchema = create_model(
    "PluginTaskSpec",
    __base__=TaskSpec,
    task=(
        str,
        Field(
            description=f"a plugin: module.path:ClassName or an installed {PLUGIN_GROUP} "
            "entry point",
            json_schema_extra={"not": {"enum": list(ADAPTERS)}},
        ),
    ),
)


class _WithPluginTasks:
    """Lists plugin tasks in the JSON Schema beside the built-in ones."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        # A plugin is any other task name with free `params`: its adapter is only known
        # when the spec is loaded, and checks them then.
        schema = handler(core_schema)
        if "oneOf" in schema:
            plugin = handler(_PluginTaskSchema.__pydantic_core_schema__)
            schema["oneOf"] = [*schema["oneOf"], plugin]
        return schema


# Plugin tasks serialize with their own variant (SerializeAsAny), not a built-in one.
_AnyTask = Annotated[
    _BuiltInTask, WrapValidator(_built_in_or_plugin), SerializeAsAny(), _WithPluginTasks
]


class JobSpec(_Frozen):
    """A whole job: defaults shared by all tasks, and the tasks in the order they run."""

    text_column: str = Field("text", min_length=1)
    rows_per_chunk: StrictInt = Field(512, gt=0, le=1_000_000)
    keep_order: StrictBool = False
    max_new_tokens_limit: StrictInt = Field(
        1024, gt=0, description="the most new tokens any generation task may ask for"
    )
    max_failed_rows: _FailedRows | None = Field(
        None,
        description="quality gate: the run publishes, then exits 3 when a task fails more "
        "rows (--max-failed-rows overrides it)",
    )
    max_failed_fraction: _FailedFraction | None = Field(
        None,
        description="quality gate: the run publishes, then exits 3 when a task fails a larger "
        "fraction of its rows (--max-failed-fraction overrides it)",
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
                adapter = self.adapter(task)
            except ValueError as err:
                raise ValueError(f"tasks[{i}]: {err}") from None
            model = (task.model or "").lower()
            if model.endswith(".gguf") and not getattr(adapter, "loads_gguf", False):
                raise ValueError(
                    f"tasks[{i}].model: GGUF files load for text-generation only; point "
                    f"`model` at a folder or hub id for {task.task!r}"
                )
            # A local model the adapter cannot use (a chat prompt for a model without a
            # chat template) fails here, before any row is read.
            check_model = getattr(adapter, "check_model", None)
            if check_model is not None and task.model is not None:
                try:
                    check_model(task.model)
                except ValueError as err:
                    raise ValueError(f"tasks[{i}].model: {err}") from None
        return self

    @model_validator(mode="after")
    def _columns_are_distinct(self) -> JobSpec:
        # Two tasks adding one column would write a Parquet file pyarrow cannot read and
        # a CSV with a duplicate header, after all the inference: refuse it here.
        owners: dict[str, int] = {}
        for i, task in enumerate(self.tasks):
            for field in self.adapter(task).fields():
                if field.name == ERRORS_COLUMN:
                    raise ValueError(
                        f"tasks[{i}].name: task {task.name!r} would add column "
                        f"{field.name!r}, which every run adds for its per-row errors; rename "
                        "the task (its `name` prefixes its columns)"
                    )
                j = owners.setdefault(field.name, i)
                if j != i:
                    raise ValueError(
                        f"tasks[{i}].name: task {task.name!r} adds column {field.name!r}, "
                        f"which task {self.tasks[j].name!r} (tasks[{j}]) adds too; rename one "
                        "of them (a task's `name` prefixes its columns)"
                    )
        return self

    def adapter(self, task: TaskSpec) -> TaskAdapter:
        """The task's adapter, configured for this job."""
        return task.adapter_type(
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


def _message(error: dict, data: Any = None) -> tuple[str, str]:
    """(where, what) for one pydantic error, in the spec's own words."""
    where, kind = _location(error["loc"]), error["type"]
    known = ", ".join(ADAPTERS)
    if kind == "extra_forbidden":
        accepted = _accepted_keys(error["loc"], data)
        return where, "unknown key" + (
            f"; accepted keys: {', '.join(accepted)}" if accepted else ""
        )
    if kind == "union_tag_invalid":
        plugins = ", ".join(installed_plugins()) or "none installed"
        return f"{where}.task", (
            f"unknown task {error['ctx']['tag']!r}; expected one of: {known}; or a plugin as "
            f"module.path:ClassName or an installed {PLUGIN_GROUP} entry point ({plugins})"
        )
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


def _explain(err: ValidationError, source: str, data: Any = None) -> SpecError:
    lines = []
    for error in err.errors():
        where, message = _message(error, data)
        lines.append(f"  {where}: {message}")
    return SpecError(f"invalid job spec {source}:\n" + "\n".join(lines))


def _accepted_keys(loc: tuple, data: Any = None) -> list[str]:
    """The keys allowed beside an unknown key at `loc`, for the error message."""
    model: Any = JobSpec
    path = list(loc[:-1])
    if len(path) > 2 and path[0] == "tasks" and path[2] in ADAPTERS:
        model = _VARIANTS[ADAPTERS[path[2]]]
        path = path[3:]
    elif path[:1] == ["tasks"]:
        # A plugin's errors carry no variant tag: find its variant from the task itself.
        model = _plugin_variant_at(data, path[1]) if len(path) > 1 else None
        model = model or TaskSpec
        path = path[2:]
    for item in path:
        field = getattr(model, "model_fields", {}).get(item)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _plugin_variant_at(data: Any, index: Any) -> type[TaskSpec] | None:
    """The variant a plugin task at `tasks[index]` of the spec was checked with, if any."""
    try:
        task = data["tasks"][index]["task"]
        return _plugin_variant(adapter_for(task), task) if is_plugin_task(task) else None
    except (LookupError, TypeError, ValueError):
        return None


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
        raise _explain(err, source, data) from None
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
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except _DuplicateKey as err:
        raise SpecError(f"invalid job spec {path}: {err}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"job spec {path} is not valid YAML: {err}") from None
    return parse_spec(data, str(path))


class _DuplicateKey(ValueError):
    """A key given twice in one YAML mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping.

    PyYAML keeps the last of two equal keys without a word, so a job would silently run
    with half of what its spec says (`params:` twice: the first block is dropped).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys beside it override the anchor's on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: the safe loader itself reports it
            second = key_node.start_mark
            if first is not second:
                where = (
                    f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"
                    if first.line == second.line
                    else f"lines {first.line + 1} and {second.line + 1}"
                )
                raise _DuplicateKey(
                    f"key {key!r} appears twice in one mapping ({where}); keep one (YAML "
                    "would silently keep only the last)"
                )
        return super().construct_mapping(node, deep=deep)
