"""JSON Schema -> Arrow types: what a structured-output task writes, known before the run.

A schema is checked where the pipeline is built: it must be valid JSON Schema (checked
with `jsonschema`) and map onto Arrow types, so its column can be declared up front:

| schema | Arrow |
|---|---|
| `type: object` with `properties` | struct, fields in `properties` order |
| `string`, `enum` / `const` of strings | string |
| `integer`, `number`, `boolean` | int64, float64, bool |
| `array` with `items` | list<items> |
| not `required`, `type: [X, "null"]`, `anyOf: [X, {type: null}]` | nullable |

Local `$ref`s (`#/$defs/...`, as pydantic writes them) are followed. Anything else (free
`additionalProperties`, unions of two types, tuples, recursion) is refused with the key's
path. The grammar the model is held to is the same schema with `additionalProperties:
false` on every object, so a model cannot add keys the struct has no field for.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pyarrow as pa

__all__ = ["SchemaError", "arrow_type", "closed_schema", "load_schema", "to_arrow_value"]

_SCALARS = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}
_ENUM_TYPES = ((bool, pa.bool_()), (int, pa.int64()), (float, pa.float64()), (str, pa.string()))
# Keywords that constrain values without changing their type: the grammar enforces what
# it can of them, and the column type ignores them.
_ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "readOnly",
    "writeOnly",
    "deprecated",
}


class SchemaError(ValueError):
    """A schema that is not valid JSON Schema, or that beam-enrich cannot type."""


def load_schema(value: dict | str) -> dict:
    """The schema itself: an inline mapping, or read from a JSON file path.

    Raises:
        SchemaError: the file cannot be read, is not JSON, or the schema is not a valid
            JSON Schema (the message names the key's path).
    """
    if isinstance(value, str):
        try:
            with open(value, encoding="utf-8") as handle:
                schema = json.load(handle)
        except OSError as err:
            raise SchemaError(f"cannot read schema file {value}: {err.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SchemaError(f"schema file {value} is not JSON: {err}") from None
        if not isinstance(schema, dict):
            raise SchemaError(f"schema file {value} must hold a JSON object")
    else:
        schema = value
    try:
        from jsonschema import validators
        from jsonschema.exceptions import SchemaError as InvalidSchema
    except ImportError:
        raise SchemaError(
            "json_schema needs the jsonschema package; install the llm extra "
            "(pip install -e '.[llm]')"
        ) from None
    try:
        validators.validator_for(schema).check_schema(schema)
    except InvalidSchema as err:
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise SchemaError(f"not a valid JSON Schema at {where}: {err.message}") from None
    return schema


def arrow_type(schema: dict) -> pa.StructType:
    """The struct type of the column a top-level object schema fills.

    Raises:
        SchemaError: the schema is not an object, or holds a part that has no Arrow type
            (the message names its path, e.g. `properties.tags.items`).
    """
    kind, _ = _type(schema, schema, "", ())
    if not pa.types.is_struct(kind):
        raise SchemaError("the top level must be `type: object` with `properties`")
    return kind


def closed_schema(schema: dict) -> dict:
    """The schema with `additionalProperties: false` on every object that leaves it out."""
    closed = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for child in node.values():
                close(child)
        elif isinstance(node, list):
            for child in node:
                close(child)

    close(closed)
    return closed


def to_arrow_value(value: Any, kind: pa.DataType) -> Any:
    """`value` (parsed JSON) checked against `kind`, in the form pyarrow builds it from.

    Raises:
        ValueError: a value of another type, naming where.
    """
    return _convert(value, kind, "")


def _convert(value: Any, kind: pa.DataType, where: str) -> Any:
    if value is None:
        return None
    if pa.types.is_struct(kind):
        if not isinstance(value, dict):
            raise ValueError(f"{where or 'output'}: expected an object")
        names = {kind.field(i).name for i in range(kind.num_fields)}
        extra = sorted(set(value) - names)
        if extra:
            raise ValueError(f"{where or 'output'}: unexpected key(s) {extra}")
        return {
            field.name: _convert(value.get(field.name), field.type, f"{where}.{field.name}")
            for field in kind
        }
    if pa.types.is_list(kind):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected an array")
        return [_convert(item, kind.value_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if pa.types.is_boolean(kind):
        ok = isinstance(value, bool)
    elif pa.types.is_integer(kind):
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    elif pa.types.is_floating(kind):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{where}: {json.dumps(value)[:40]} is not {kind}")
    return value


def _resolve(root: dict, node: dict, where: str, seen: tuple[str, ...]) -> tuple[dict, tuple]:
    """Follows a local `$ref` (`#/...`); refuses remote and recursive ones."""
    while "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{where or '(top level)'}.$ref: only local refs (#/...) are typed")
        if ref in seen:
            raise SchemaError(f"{where}.$ref: recursive {ref!r} has no fixed Arrow type")
        target: Any = root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{where}.$ref: {ref!r} points nowhere")
            target = target[part]
        if not isinstance(target, dict):
            raise SchemaError(f"{where}.$ref: {ref!r} is not a schema")
        seen = (*seen, ref)
        rest = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **rest}
    return node, seen


def _type(root: dict, node: Any, where: str, seen: tuple[str, ...]) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) of a schema node at `where`."""
    here = where or "(top level)"
    if not isinstance(node, dict):
        raise SchemaError(f"{here}: `true`/`false` schemas have no fixed Arrow type")
    node, seen = _resolve(root, node, where, seen)
    for union in ("anyOf", "oneOf"):
        if union in node:
            options = node[union]
            others = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            if len(others) != 1 or len(options) > 2:
                raise SchemaError(
                    f"{here}.{union}: a union of several types has no single Arrow type; "
                    "only [X, {type: null}] (X or null) is typed"
                )
            rest = {k: v for k, v in node.items() if k != union}
            kind, _ = _type(root, {**rest, **others[0]}, where, seen)
            return kind, len(options) == 2
    unsupported = sorted(
        set(node)
        - _ANNOTATIONS
        - {"type", "properties", "required", "additionalProperties", "items", "enum", "const"}
    )
    if unsupported:
        raise SchemaError(f"{here}: keyword(s) {', '.join(unsupported)} cannot be typed")
    if "enum" in node or "const" in node:
        values = node["enum"] if "enum" in node else [node["const"]]
        nullable = None in values
        kinds = {
            next((k for t, k in _ENUM_TYPES if isinstance(v, t)), None)
            for v in values
            if v is not None
        }
        if len(kinds) != 1 or None in kinds:
            raise SchemaError(
                f"{here}.enum: values must all be strings, all integers, all numbers or all "
                "booleans to share one Arrow type"
            )
        return kinds.pop(), nullable
    types = node.get("type")
    if types is None:
        if "properties" in node:
            types = "object"
        else:
            raise SchemaError(f"{here}: no `type`; say which JSON type this value has")
    names = [types] if isinstance(types, str) else list(types)
    nullable = "null" in names
    names = [n for n in names if n != "null"]
    if len(names) != 1:
        raise SchemaError(
            f"{here}.type: {types!r} has no single Arrow type; use one type (plus null)"
        )
    name = names[0]
    if name in _SCALARS:
        return _SCALARS[name], nullable
    if name == "array":
        items = node.get("items")
        if not isinstance(items, dict):
            raise SchemaError(f"{here}.items: an array needs one `items` schema to be typed")
        kind, _ = _type(root, items, f"{where}.items" if where else "items", seen)
        return pa.list_(kind), nullable
    if name == "object":
        properties = node.get("properties")
        if not isinstance(properties, dict) or not properties:
            raise SchemaError(f"{here}.properties: an object needs `properties` to be typed")
        if node.get("additionalProperties", False) is not False:
            raise SchemaError(
                f"{here}.additionalProperties: free extra keys have no column; leave it out "
                "or set it to false"
            )
        required = set(node.get("required", ()))
        fields = []
        for key, child in properties.items():
            path = f"{where}.properties.{key}" if where else f"properties.{key}"
            kind, optional = _type(root, child, path, seen)
            fields.append(pa.field(key, kind, nullable=optional or key not in required))
        return pa.struct(fields), nullable
    raise SchemaError(f"{here}.type: {name!r} has no Arrow type")
