"""Arrow types for schemaless rows: inference, the type lattice, unification, conforming.

JSONL has no schema, and Parquet files of one dataset may disagree. nfb keeps every value
exactly, and a value never depends on how the rows were cut into batches or checkpoint parts:

- A column's type is the *join* of the types of its values, taken in input order, so it is
  the same whether it is inferred over one batch or over many and joined afterwards.
- Values whose types do not agree (an int and a float, a string and a number, objects with
  different keys, a list of ints and a list of objects), integers beyond 64 bits and values
  nested deeper than `MAX_DEPTH` make the whole column **JSON text**: a string column whose
  field carries the metadata `nfb.json = 1` and holds each value's JSON encoding (`5`,
  `5.5`, `"s"`, `{"a":[1]}`). JSONL output writes such values back verbatim, so `5` stays
  `5` and a 30-digit integer keeps its digits.
- null joins anything; ints of different widths join to the wider (int64 at most);
  float32/float64 to float64; string/large_string to large_string; a dictionary column
  counts as its values; lists join element-wise; structs join field-wise when their field
  names are the same, in the same order.

Joins happen only through these functions, in input order (field order = first seen).
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import json
from collections.abc import Iterable

import orjson
import pyarrow as pa
import pyarrow.compute as pc

JSON_META = {b"nfb.json": b"1"}
MAX_DEPTH = 16   # nesting levels kept as Arrow types; deeper values become JSON text


class _Json:
    """The top of the lattice: JSON text."""

    def __repr__(self) -> str:
        return "JSON"


JSON = _Json()
_NULL = pa.null()
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


# --- JSON text ------------------------------------------------------------------------------

def json_default(v: object) -> object:
    """How Python values without a JSON form are written: bytes as base64, decimals as
    numbers, maps as lists of pairs, anything else as its string."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, decimal.Decimal):
        return orjson.Fragment(str(v)) if v.is_finite() else None
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    return str(v)


def _std_default(v: object) -> object:
    if isinstance(v, orjson.Fragment):  # pragma: no cover - never produced for stdlib
        raise TypeError
    out = json_default(v)
    if isinstance(out, orjson.Fragment):
        return float(v) if isinstance(v, decimal.Decimal) else str(v)
    return out


def json_text(v: object) -> str | None:
    """The JSON encoding of a value (None stays None). Exact for integers of any size."""
    if v is None:
        return None
    try:
        return orjson.dumps(v, default=json_default).decode()
    except (orjson.JSONEncodeError, TypeError, OverflowError):
        # integers beyond 64 bits, or nesting beyond orjson's 254 levels
        try:
            return json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                              default=_std_default)
        except (ValueError, RecursionError, TypeError):
            return json.dumps(str(v), ensure_ascii=False)


def is_json_field(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(b"nfb.json") == b"1"


def json_field(name: str) -> pa.Field:
    return pa.field(name, pa.string(), metadata=JSON_META)


# --- inference --------------------------------------------------------------------------------

# Inference works on light, hashable type terms, made Arrow types once per column:
# "n" null, "b" bool, "i" int64, "f" float64, "s" string, ("l", elem), ("t", names, types),
# and JSON.
_SCALAR_TERMS = {str: "s", bool: "b", float: "f", type(None): "n"}
_ARROW = {"n": pa.null(), "b": pa.bool_(), "i": pa.int64(), "f": pa.float64(),
          "s": pa.string()}


def _term(v: object, depth: int):
    t = _SCALAR_TERMS.get(type(v))
    if t is not None:
        return t
    if type(v) is int:
        return "i" if _INT64_MIN <= v <= _INT64_MAX else JSON
    if depth >= MAX_DEPTH:
        return JSON
    if isinstance(v, list):
        e = "n"
        for x in v:
            e = _tjoin(e, _term(x, depth + 1))
            if e is JSON:
                return JSON
        return ("l", e)
    if isinstance(v, dict):
        if not v:
            return JSON      # Parquet cannot hold a struct without fields
        names = tuple(v)
        types = []
        for x in v.values():
            t = _term(x, depth + 1)
            if t is JSON:
                return JSON
            types.append(t)
        if not all(isinstance(k, str) for k in names):
            return JSON
        return ("t", names, tuple(types))
    return JSON


def _tjoin(a, b):
    if a == b:
        return a
    if a is JSON or b is JSON:
        return JSON
    if a == "n":
        return b
    if b == "n":
        return a
    if type(a) is tuple and type(b) is tuple and a[0] == b[0]:
        if a[0] == "l":
            e = _tjoin(a[1], b[1])
            return JSON if e is JSON else ("l", e)
        if a[1] != b[1]:
            return JSON
        types = []
        for x, y in zip(a[2], b[2]):
            t = _tjoin(x, y)
            if t is JSON:
                return JSON
            types.append(t)
        return ("t", a[1], tuple(types))
    return JSON


def _arrow(t):
    if t is JSON:
        return JSON
    if type(t) is str:
        return _ARROW[t]
    if t[0] == "l":
        return pa.list_(_arrow(t[1]))
    return pa.struct([pa.field(n, _arrow(x)) for n, x in zip(t[1], t[2])])


def value_type(v: object, depth: int = 0):
    """The Arrow type of one JSON value (or JSON when it has none that keeps it exactly)."""
    return _arrow(_term(v, depth))


def values_type(values: list):
    """The join of the types of `values`, in order."""
    kinds = {type(v) for v in values}
    kinds.discard(type(None))
    if not kinds:
        return _NULL
    if len(kinds) == 1:   # fast paths for the common, flat columns
        (k,) = kinds
        if k is str:
            return pa.string()
        if k is bool:
            return pa.bool_()
        if k is float:
            return pa.float64()
        if k is int:
            ints = [v for v in values if v is not None]
            return pa.int64() if _INT64_MIN <= min(ints) and max(ints) <= _INT64_MAX else JSON
    elif kinds & {str, bool, int, float}:
        return JSON      # mixed scalars, or a scalar and a nested value
    t = "n"
    for v in values:
        t = _tjoin(t, _term(v, 0))
        if t is JSON:
            return JSON
    return _arrow(t)


# --- the lattice ----------------------------------------------------------------------------

def _norm(t):
    if t is JSON:
        return t
    if pa.types.is_dictionary(t):
        return _norm(t.value_type)
    return t


def _int_join(a: pa.DataType, b: pa.DataType):
    sa, sb = pa.types.is_signed_integer(a), pa.types.is_signed_integer(b)
    if sa == sb:
        return a if a.bit_width >= b.bit_width else b
    unsigned = b if sa else a
    return pa.int64() if unsigned.bit_width < 64 else JSON


def join(a, b):
    """The least type that holds every value of both `a` and `b` exactly (JSON at worst)."""
    if a is JSON or b is JSON:
        return JSON
    a, b = _norm(a), _norm(b)
    if a == b:
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return _int_join(a, b)
    if pa.types.is_floating(a) and pa.types.is_floating(b):
        return pa.float64() if pa.float64() in (a, b) or pa.float32() in (a, b) else JSON
    if {str(a), str(b)} <= {"string", "large_string"}:
        return pa.large_string()
    if {str(a), str(b)} <= {"binary", "large_binary"}:
        return pa.large_binary()
    if _is_list(a) and _is_list(b):
        e = join(a.value_type, b.value_type)
        if e is JSON:
            return JSON
        large = pa.types.is_large_list(a) or pa.types.is_large_list(b)
        return pa.large_list(e) if large else pa.list_(e)
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        if [f.name for f in a] != [f.name for f in b]:
            return JSON
        fields = []
        for fa, fb in zip(a, b):
            t = join(fa.type, fb.type)
            if t is JSON:
                return JSON
            fields.append(pa.field(fa.name, t))
        return pa.struct(fields)
    return JSON


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _field_kind(f: pa.Field):
    return JSON if is_json_field(f) else f.type


def _make_field(name: str, kind) -> pa.Field:
    return json_field(name) if kind is JSON else pa.field(name, kind)


def unify_schemas(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """One schema for all: union of columns in first-seen order, types joined."""
    kinds: dict[str, object] = {}
    for schema in schemas:
        for f in schema:
            k = _field_kind(f)
            kinds[f.name] = join(kinds[f.name], k) if f.name in kinds else _norm(k)
    return pa.schema([_make_field(n, k) for n, k in kinds.items()])


# --- building and conforming ------------------------------------------------------------------

def _json_array(values: list) -> pa.Array:
    return pa.array([json_text(v) for v in values], type=pa.string())


def typed_column(values: list, kind=None) -> tuple[object, pa.Array]:
    """(kind, array) for `values`: kind is an Arrow type or JSON."""
    if kind is None:
        kind = values_type(values)
    if kind is JSON:
        return JSON, _json_array(values)
    try:
        return kind, pa.array(values, type=kind)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):  # pragma: no cover
        return JSON, _json_array(values)


def column_field(name: str, values: list) -> tuple[pa.Field, pa.Array]:
    kind, arr = typed_column(values)
    return _make_field(name, kind), arr


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
        keys.update(dict.fromkeys(r))
    if not keys:
        return empty_rows(n)
    fields, arrays = [], []
    for k in keys:
        f, a = column_field(k, [r.get(k) for r in rows])
        fields.append(f)
        arrays.append(a)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _to_json_column(col: pa.ChunkedArray | pa.Array, source: pa.Field) -> pa.Array:
    if is_json_field(source):
        return col.cast(pa.string()) if col.type != pa.string() else col
    return _json_array(col.to_pylist())


def conform_column(col, source: pa.Field, target: pa.Field):
    """`col` (of field `source`) as a column of field `target` (a join of its type)."""
    if is_json_field(target):
        return _to_json_column(col, source)
    if col.type == target.type and not is_json_field(source):
        return col
    try:
        return pc.cast(col, target.type)
    except (pa.ArrowException, NotImplementedError):
        pass
    try:
        return pa.array(col.to_pylist(), type=target.type)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        raise TypeError(f"column {target.name!r}: cannot hold {source.type} as "
                        f"{target.type}") from None


def conform(table: pa.Table, schema: pa.Schema, keep_extra: bool = False) -> pa.Table:
    """`table` in `schema` (a join of its own): missing columns become nulls, values are
    cast or written as JSON text. With `keep_extra`, columns not in `schema` follow it."""
    n = len(table)
    names = set(table.column_names)
    cols, fields = [], []
    for f in schema:
        if f.name not in names:
            cols.append(pa.nulls(n, type=f.type))
        else:
            cols.append(conform_column(table.column(f.name),
                                       table.schema.field(f.name), f))
        fields.append(f)
    if keep_extra:
        for f in table.schema:
            if f.name not in schema.names:
                cols.append(table.column(f.name))
                fields.append(f)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))
