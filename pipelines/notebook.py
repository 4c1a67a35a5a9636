"""Run a job spec's tasks on an in-memory table, in this process: no Beam pipeline, no files.

For small data and exploration in a notebook. The same checks as a pipeline run come
first (the spec, the columns, the models and their revisions), then the same task
adapters run over slices of `rows_per_chunk` rows, so the rows, columns and types equal
a pipeline run's output for the same rows::

    from pipelines import enrich_dataframe

    enriched = enrich_dataframe(df, "job.yaml", progress=True)

Loaded models are kept for the next call (a notebook reruns cells); free them with
`clear_model_cache()`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.job import bind_tasks
from pipelines.spec import JobSpec, SpecError, load_spec, parse_spec
from transforms.inference import LoadedModel, TaskBinding, apply_task, load_task
from transforms.io import InputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["clear_model_cache", "enrich_dataframe", "enrich_table"]

_LOADED: dict[Hashable, LoadedModel] = {}


def enrich_table(
    table: pa.Table,
    spec: JobSpec | Mapping[str, Any] | str | os.PathLike,
    *,
    progress: bool = False,
) -> pa.Table:
    """Adds each task's columns and `enrich_errors` to a table, as a pipeline run would.

    Args:
        table: the rows to enrich; its columns come back untouched, first.
        spec: a `JobSpec`, a mapping as parsed from YAML, or the path of a YAML job spec.
        progress: show a progress bar (tqdm: a widget in notebooks, text elsewhere).

    Returns:
        The input columns, then each task's typed columns, then `enrich_errors` (a
        row whose task failed gets nulls in that task's columns and an entry there).

    Raises:
        SpecError: the spec is invalid; the message names each bad key's path.
        InputError: a column a task reads is missing or not text, or a task would add a
            column the table already has.
        ModelError: a model or revision cannot be found.
    """
    job_spec = _as_spec(spec)
    if not isinstance(table, pa.Table):
        raise InputError(
            f"enrich_table takes a pyarrow.Table, got {type(table).__name__}; "
            "use enrich_dataframe for a pandas DataFrame"
        )
    bindings, output_schema = bind_tasks(job_spec, table.schema)
    # The input's own metadata (pandas' index, …) stays, as its columns do.
    output_schema = output_schema.with_metadata(table.schema.metadata)
    if table.num_rows == 0:
        return output_schema.empty_table()
    loaded = [_loaded_model(binding) for binding in bindings]
    slices = []
    with _progress_bar(table.num_rows, enabled=progress) as bar:
        for offset in range(0, table.num_rows, job_spec.rows_per_chunk):
            part = table.slice(offset, job_spec.rows_per_chunk)
            for binding, model in zip(bindings, loaded, strict=True):
                part, _ = apply_task(binding, model, part)
            slices.append(part)
            bar.update(part.num_rows)
    return pa.concat_tables(slices).cast(output_schema)


def enrich_dataframe(
    df: pd.DataFrame,
    spec: JobSpec | Mapping[str, Any] | str | os.PathLike,
    *,
    progress: bool = False,
) -> pd.DataFrame:
    """Adds each task's columns and `enrich_errors` to a pandas DataFrame.

    Args:
        df: the rows to enrich; its index and columns come back untouched, first.
        spec: a `JobSpec`, a mapping as parsed from YAML, or the path of a YAML job spec.
        progress: show a progress bar (tqdm: a widget in notebooks, text elsewhere).

    Returns:
        A new DataFrame: `df`'s columns, then the task columns (float32 scores, lists
        and structs as arrays of Python values), then `enrich_errors`.

    Raises:
        SpecError, InputError, ModelError: as for `enrich_table`; InputError also when a
            column cannot be converted to Arrow (mixed types in one column).
    """
    import pandas as pd

    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        # pyarrow puts the cause and the column's name in separate arguments.
        reason = "; ".join(str(arg) for arg in err.args)
        raise InputError(
            f"the DataFrame cannot be converted to Arrow ({reason}); give that column one "
            "type, e.g. df[column].astype('string')"
        ) from None
    enriched = enrich_table(table, spec, progress=progress)
    added = enriched.drop_columns(table.column_names).to_pandas()
    added.index = df.index
    # The input columns are df's own, not a round trip through Arrow: their dtypes
    # (categoricals, nullable and timezone-aware types, …) stay exactly as they were.
    return pd.concat([df, added], axis=1)


def clear_model_cache() -> None:
    """Forgets the models kept by earlier calls, so their memory can be freed."""
    _LOADED.clear()


def _as_spec(spec: JobSpec | Mapping[str, Any] | str | os.PathLike) -> JobSpec:
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, Mapping):
        return parse_spec(dict(spec), "(mapping)")
    if isinstance(spec, str | os.PathLike):
        return load_spec(spec)
    raise SpecError(
        f"invalid job spec: expected a JobSpec, a mapping or a YAML file's path, "
        f"got {type(spec).__name__}"
    )


def _loaded_model(binding: TaskBinding) -> LoadedModel:
    key = _cache_key(binding)
    if key not in _LOADED:
        _LOADED[key] = load_task(binding)
    return _LOADED[key]


def _cache_key(binding: TaskBinding) -> Hashable:
    # Every bind makes new adapter objects, which compare by identity; the key is what
    # they are configured with instead. Parameters may hold lists (unhashable): JSON.
    adapter = binding.adapter
    return (
        type(adapter),
        adapter.name,
        adapter.params.model_dump_json(),
        adapter.input_column,
        adapter.on_long_input,
        dataclasses.replace(binding, adapter=None),
    )


def _progress_bar(rows: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=rows, unit="row", desc="enrich", disable=not enabled)
