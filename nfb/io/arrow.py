"""Arrow helpers: JSON rows -> table with drift-tolerant types, and schema unification.

JSONL has no schema: a field can be null in one batch and a string in the next, an int in
one row and a string in another. nfb keeps every value: a column whose values do not share
one Arrow type is stored as strings (non-strings JSON-encoded), and parts whose types differ
are unified when merged (null -> the other type, int -> float, anything else -> string).
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
import pyarrow as pa
import pyarrow.compute as pc


def _json_text(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    return orjson.dumps(v, default=str).decode()


def column_array(values: list) -> pa.Array:
    """An Arrow array of `values`, falling back to strings when the types do not agree."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError,
            TypeError, ValueError):
        return pa.array([_json_text(v) for v in values], type=pa.string())


def empty_rows(n: int) -> pa.Table:
    """A table of n rows and no columns (rows whose input could not be read)."""
    return pa.table({"_": pa.nulls(n)}).drop(["_"])


def rows_to_table(rows: list[dict]) -> pa.Table:
    """A table holding every key of every row (missing keys are null), in first-seen order."""
    n = len(rows)
    if n == 0:
        return pa.table({})
    keys: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k not in keys:
                keys[k] = None
    if not keys:
        return empty_rows(n)
    return pa.table({k: column_array([r.get(k) for r in rows]) for k in keys})


def _merge_type(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if a == b:
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return pa.int64()
    if (pa.types.is_integer(a) or pa.types.is_floating(a)) and (
            pa.types.is_integer(b) or pa.types.is_floating(b)):
        return pa.float64()
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        merged = unify_schemas([pa.schema(list(a)), pa.schema(list(b))])
        return pa.struct(list(merged))
    if pa.types.is_list(a) and pa.types.is_list(b):
        return pa.list_(_merge_type(a.value_type, b.value_type))
    if pa.types.is_string(a) and pa.types.is_large_string(b) or \
            pa.types.is_large_string(a) and pa.types.is_string(b):
        return pa.large_string()
    return pa.string()


def unify_schemas(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """One schema for all: union of columns in first-seen order, types merged."""
    types: dict[str, pa.DataType] = {}
    for schema in schemas:
        for f in schema:
            types[f.name] = _merge_type(types[f.name], f.type) if f.name in types else f.type
    return pa.schema([pa.field(k, t) for k, t in types.items()])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast `table` to `schema`: add missing columns as nulls, JSON-encode what must be text."""
    n = len(table)
    cols = []
    for f in schema:
        if f.name not in table.column_names:
            cols.append(pa.nulls(n, type=f.type))
            continue
        col = table.column(f.name)
        if col.type == f.type:
            cols.append(col)
            continue
        try:
            cols.append(pc.cast(col, f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            if not pa.types.is_string(f.type):
                raise
            cols.append(pa.array([_json_text(v) for v in col.to_pylist()], type=pa.string()))
    return pa.Table.from_arrays(cols, schema=schema)
