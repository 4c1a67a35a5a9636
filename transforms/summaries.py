"""Per-task summaries of an output, computed as its rows are written, merged by addition.

The writer of each staged part feeds its tables to a `Summarizer` and stores its
`state()` (counts, sums, extremes: numbers that add up) in the part's `PartInfo`;
publishing merges the parts' states with `merge_summaries` into the manifest's
summaries. The output is never read back for them.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["Summarizer", "merge_summaries"]

# Fixed bins, so that the numbers mean the same in every run: scores over 0..1; lengths
# in powers of two (0, 1, 2-3, 4-7, ...; empty bins at either end left out); embedding
# norms with one bin around 1, where normalized vectors fall.
_SCORE_EDGES = [round(i / 10, 1) for i in range(11)]
_LENGTH_EDGES = [0, 1, *(2**k for k in range(1, 25))]
_NORM_EDGES = [0.0, 0.5, 0.9, 1.1, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0]
#: Distinct values listed per count table; the rest are summed as `other`.
_TOP = 20


class _Histogram:
    """Counts of values in fixed bins, plus count, min, max and mean; values stream in."""

    def __init__(self, edges: Sequence[float], *, trim: bool):
        self.edges = list(edges)
        self.trim = trim
        self.counts = np.zeros(len(edges) - 1, dtype=np.int64)
        self.below = self.above = self.count = 0
        self.total = 0.0
        self.low, self.high = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[~np.isnan(values)]
        if not values.size:
            return
        # np.histogram: bins closed on the left, the last one on both sides.
        self.counts += np.histogram(values, self.edges)[0]
        self.below += int((values < self.edges[0]).sum())
        self.above += int((values > self.edges[-1]).sum())
        self.count += int(values.size)
        self.total += float(values.sum())
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))

    def to_json(self) -> dict:
        counts, edges = self.counts.tolist(), self.edges
        if self.trim:
            filled = [i for i, n in enumerate(counts) if n] or [0]
            first, last = filled[0], filled[-1]
            counts, edges = counts[first : last + 1], edges[first : last + 2]
        empty = not self.count
        return {
            "edges": edges,
            "counts": counts,
            "below": self.below,
            "above": self.above,
            "count": self.count,
            "min": None if empty else _rounded(self.low),
            "max": None if empty else _rounded(self.high),
            "mean": None if empty else _rounded(self.total / self.count),
        }


def _rounded(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 6)


def _top(counter: Counter) -> dict:
    ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
    kept = ranked[:_TOP]
    return {
        "counts": dict(kept),
        "other": sum(n for _, n in ranked[_TOP:]),
        "distinct": len(ranked),
    }


def _array(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.dictionary_decode() if pa.types.is_dictionary(array.type) else array


def _floats(array: pa.Array) -> np.ndarray:
    return pc.drop_null(array).to_numpy(zero_copy_only=False).astype(np.float64)


def _value_counts(array: pa.Array) -> Counter:
    counts = pc.value_counts(pc.drop_null(array))
    return Counter(
        dict(
            zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
        )
    )


def _best(array: pa.Array) -> pa.Array:
    """The first element of each non-empty list: the best label, answer or token."""
    return pc.list_flatten(pc.list_slice(array, 0, 1))


def _words(array: pa.Array) -> np.ndarray:
    return _floats(pc.list_value_length(pc.utf8_split_whitespace(array)))


class _Output:
    """Streams one task's output columns into its summary."""

    kind = "rows"

    def __init__(self, name: str, columns: Sequence[str]):
        self.name = name
        self.columns = list(columns)
        self.non_null = 0

    def add(self, table: pa.Table) -> None:
        self.non_null += sum(len(table) - table.column(c).null_count for c in self.columns)

    def to_json(self) -> dict:
        return {"kind": self.kind, "non_null_cells": self.non_null}


class _Labels(_Output):
    """text-classification (`N_label`, or the best of `N_labels`) and zero-shot."""

    kind = "labels"

    def __init__(self, name: str, columns: Sequence[str]):
        listed = f"{name}_label" not in columns
        suffix = "s" if listed else ""
        super().__init__(name, [f"{name}_label{suffix}", f"{name}_score{suffix}"])
        self.listed = listed
        self.labels: Counter = Counter()
        self.scores = _Histogram(_SCORE_EDGES, trim=False)

    def add(self, table: pa.Table) -> None:
        labels, scores = (_array(table, c) for c in self.columns)
        if self.listed:
            labels, scores = _best(labels), _best(scores)
        self.labels.update(_value_counts(labels))
        self.scores.add(_floats(scores))

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "label_counts": _top(self.labels),
            "score": self.scores.to_json(),
        }


class _Entities(_Output):
    """ner / token-classification: entity types, entities per row, entity scores."""

    kind = "entities"

    def __init__(self, name: str, columns: Sequence[str]):
        super().__init__(name, [name])
        self.groups: Counter = Counter()
        self.per_row = _Histogram(_LENGTH_EDGES, trim=True)
        self.scores = _Histogram(_SCORE_EDGES, trim=False)

    def add(self, table: pa.Table) -> None:
        entities = _array(table, self.name)
        flat = pc.list_flatten(entities)
        self.groups.update(_value_counts(pc.struct_field(flat, "entity_group")))
        self.per_row.add(_floats(pc.list_value_length(entities)))
        self.scores.add(_floats(pc.struct_field(flat, "score")))

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "entity_counts": _top(self.groups),
            "entities_per_row": self.per_row.to_json(),
            "score": self.scores.to_json(),
        }


class _FillMask(_Output):
    """fill-mask: the best token per row and its score."""

    kind = "tokens"

    def __init__(self, name: str, columns: Sequence[str]):
        super().__init__(name, [name])
        self.tokens: Counter = Counter()
        self.scores = _Histogram(_SCORE_EDGES, trim=False)

    def add(self, table: pa.Table) -> None:
        best = _best(_array(table, self.name))
        self.tokens.update(_value_counts(pc.struct_field(best, "token_str")))
        self.scores.add(_floats(pc.struct_field(best, "score")))

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "top_token_counts": _top(self.tokens),
            "score": self.scores.to_json(),
        }


class _Answers(_Output):
    """question-answering: answer length in words, answer score."""

    kind = "answers"

    def __init__(self, name: str, columns: Sequence[str]):
        super().__init__(name, [f"{name}_answer", f"{name}_score"])
        self.lengths = _Histogram(_LENGTH_EDGES, trim=True)
        self.scores = _Histogram(_SCORE_EDGES, trim=False)

    def add(self, table: pa.Table) -> None:
        answers, scores = (_array(table, c) for c in self.columns)
        self.lengths.add(_words(answers))
        self.scores.add(_floats(scores))

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "answer_words": self.lengths.to_json(),
            "score": self.scores.to_json(),
        }


class _Texts(_Output):
    """summarization, translation, text-generation: output length in words (and flags)."""

    kind = "texts"

    def __init__(self, name: str, columns: Sequence[str]):
        flagged = f"{name}_flagged"
        super().__init__(name, [name, *([flagged] if flagged in columns else [])])
        self.lengths = _Histogram(_LENGTH_EDGES, trim=True)
        self.flagged: int | None = 0 if len(self.columns) > 1 else None

    def add(self, table: pa.Table) -> None:
        texts = _array(table, self.name)
        # A text-generation task with a json_schema writes a struct: no words to count.
        if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type):
            self.lengths.add(_words(texts))
        if self.flagged is not None:
            self.flagged += int(pc.sum(_array(table, self.columns[1])).as_py() or 0)

    def to_json(self) -> dict:
        summary = {"kind": self.kind, "output_words": self.lengths.to_json()}
        if self.flagged is not None:
            summary["flagged_rows"] = self.flagged
        return summary


class _Vectors(_Output):
    """feature-extraction: vector dimensions and L2 norms."""

    kind = "vectors"

    def __init__(self, name: str, columns: Sequence[str]):
        super().__init__(name, [name])
        self.dimensions: Counter = Counter()
        self.norms = _Histogram(_NORM_EDGES, trim=True)

    def add(self, table: pa.Table) -> None:
        vectors = _array(table, self.name)
        self.dimensions.update(_value_counts(pc.list_value_length(vectors)))
        values = _floats(pc.list_flatten(vectors))
        rows = pc.list_parent_indices(vectors).to_numpy(zero_copy_only=False)
        squares = np.bincount(rows, weights=values * values, minlength=len(vectors))
        present = vectors.is_valid().to_numpy(zero_copy_only=False)
        self.norms.add(np.sqrt(squares[present]))

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "dimension_counts": _top(Counter({str(d): n for d, n in self.dimensions.items()})),
            "norm": self.norms.to_json(),
        }


_OUTPUTS: dict[str, type[_Output]] = {
    "sentiment-analysis": _Labels,
    "text-classification": _Labels,
    "zero-shot-classification": _Labels,
    "ner": _Entities,
    "token-classification": _Entities,
    "fill-mask": _FillMask,
    "question-answering": _Answers,
    "summarization": _Texts,
    "translation": _Texts,
    "text-generation": _Texts,
    "feature-extraction": _Vectors,
}


class _InputLengths:
    """Characters per input text; null (and, in CSV, empty) cells counted apart."""

    def __init__(self, column: str):
        self.columns = [column]
        self.lengths = _Histogram(_LENGTH_EDGES, trim=True)
        self.missing = 0

    def add(self, table: pa.Table) -> None:
        texts = _array(table, self.columns[0])
        self.missing += texts.null_count
        self.lengths.add(_floats(_text_lengths(texts)))

    def to_json(self) -> dict:
        return {
            "column": self.columns[0],
            "characters": self.lengths.to_json(),
            "missing": self.missing,
        }


def _text_lengths(array: pa.Array) -> pa.Array:
    """Characters per cell of any column a task may read; bytes for binary cells.

    Arrow's `utf8_length` takes only `string` and `large_string`: a `string_view`
    column, a column of nulls only (the `null` type) or a column a prompt template
    pastes as text (numbers, dates) would fail the whole report.
    """
    type_ = array.type
    if pa.types.is_null(type_):
        return pa.array([], pa.int64())
    if pa.types.is_binary_view(type_):
        array, type_ = array.cast(pa.large_binary()), pa.large_binary()
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
        return pc.binary_length(array)
    if not (pa.types.is_string(type_) or pa.types.is_large_string(type_)):
        try:
            array = array.cast(pa.large_string())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            # Lists and structs: their JSON text, as CSV output writes them.
            cells = [
                None if cell is None else json.dumps(cell, ensure_ascii=False, default=str)
                for cell in array.to_pylist()
            ]
            array = pa.array(cells, pa.large_string())
    return pc.utf8_length(array)


class Summarizer:
    """Streams output tables into every task's summary; `state()` merges by addition.

    Args:
        tasks: the manifest's task descriptions (`name`, `task`, `columns`,
            `input_columns`).
        csv: the output is CSV, where an empty text cell reads back as missing: it is
            summarized as missing here too, so summaries do not depend on when they
            are made.
    """

    def __init__(self, tasks: Sequence[dict], *, csv: bool = False):
        self._csv = csv
        self._names = [t["name"] for t in tasks]
        self._input_of = {t["name"]: t["input_columns"][0] for t in tasks}
        self._inputs = {column: _InputLengths(column) for column in self._input_of.values()}
        self._outputs = {
            t["name"]: _OUTPUTS.get(t["task"], _Output)(t["name"], t["columns"]) for t in tasks
        }
        self._failed: dict[str, Counter] = {name: Counter() for name in self._names}
        accumulators = [*self._inputs.values(), *self._outputs.values()]
        self.columns = list(dict.fromkeys(c for a in accumulators for c in a.columns))

    def add(self, table: pa.Table, failures: Iterable[dict] = ()) -> None:
        """Adds a table of output rows and its `errors.jsonl` records."""
        table = table.select(self.columns)
        if self._csv:
            table = _empty_text_as_missing(table)
        for accumulator in (*self._inputs.values(), *self._outputs.values()):
            accumulator.add(table)
        for record in failures:
            self._failed.setdefault(record["task"], Counter())[record["error_type"]] += 1

    def state(self) -> dict:
        """The raw counts, JSON-ready; `merge_summaries` adds states up."""
        return {
            "inputs": {column: _state(a) for column, a in self._inputs.items()},
            "outputs": {name: _state(a) for name, a in self._outputs.items()},
            "failed_by_type": {task: dict(found) for task, found in self._failed.items()},
        }

    def merge(self, state: dict) -> None:
        """Adds another summarizer's `state()` to this one."""
        for column, found in state.get("inputs", {}).items():
            _merge(self._inputs[column], found)
        for name, found in state.get("outputs", {}).items():
            _merge(self._outputs[name], found)
        for task, found in state.get("failed_by_type", {}).items():
            self._failed.setdefault(task, Counter()).update(found)

    def summaries(self) -> tuple[dict[str, dict], dict[str, dict[str, int]]]:
        """Task name -> `{"input": …, "output": …}`, and task name -> error type -> rows."""
        summaries = {
            name: {
                "input": self._inputs[self._input_of[name]].to_json(),
                "output": self._outputs[name].to_json(),
            }
            for name in self._names
        }
        failed = {task: dict(sorted(found.items())) for task, found in self._failed.items()}
        return summaries, failed


def merge_summaries(
    tasks: Sequence[dict], states: Iterable[dict]
) -> tuple[dict[str, dict], dict[str, dict[str, int]]]:
    """The summaries of a whole output from its parts' `Summarizer.state()`s."""
    total = Summarizer(tasks)
    for state in states:
        total.merge(state)
    return total.summaries()


def _empty_text_as_missing(table: pa.Table) -> pa.Table:
    for index, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            column = table.column(index)
            empty = pc.equal(column, pa.scalar("", field.type))
            table = table.set_column(
                index, field, pc.if_else(empty, pa.scalar(None, field.type), column)
            )
    return table


def _state(accumulator) -> dict:
    """An accumulator's counts and sums, as JSON data (its settings left out)."""
    found = {}
    for key, value in vars(accumulator).items():
        if isinstance(value, _Histogram):
            found[key] = {
                "counts": value.counts.tolist(),
                "below": value.below,
                "above": value.above,
                "count": value.count,
                "total": value.total,
                "low": None if value.count == 0 else value.low,
                "high": None if value.count == 0 else value.high,
            }
        elif isinstance(value, Counter):
            found[key] = [[item, n] for item, n in value.items()]
        elif isinstance(value, int) and not isinstance(value, bool):
            found[key] = value
    return found


def _merge(accumulator, state: dict) -> None:
    for key, value in state.items():
        current = getattr(accumulator, key)
        if isinstance(current, _Histogram):
            current.counts += np.asarray(value["counts"], dtype=np.int64)
            current.below += value["below"]
            current.above += value["above"]
            current.count += value["count"]
            current.total += value["total"]
            if value["count"]:
                current.low = min(current.low, value["low"])
                current.high = max(current.high, value["high"])
        elif isinstance(current, Counter):
            current.update({item: n for item, n in value})
        else:
            setattr(accumulator, key, current + value)
