"""The layer every verb stands on: reading nfb outputs back (streamed tables, provenance, a
DuckDB view over all inputs), a verb's input paths, the columns nfb added, and where the scores
are (the score column and the responses it belongs to).

`ScoredView` checks every input up front (a 0-byte or damaged Parquet file is an InputError,
not a traceback), unifies their schemas with nfb's own rules, and opens an in-process DuckDB
connection with one view, `scored`, over all of them (Parquet read in place; JSONL read once
by nfb's reader, every key of every row, and spooled to a temporary Parquet file, so values
keep the types nfb gave them). Once the view exists the connection may read only those files:
external access is switched off, so an expression cannot open any other file. Files on a
store (s3://...) are streamed like local ones; for the view, a store's Parquet file is
downloaded to the view's temporary directory first (JSONL is spooled as always).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from nfb.errors import UsageError
from nfb.io.arrow import conform, unify_schemas
from nfb.io.readers import InputError, input_format, read_chunks, resolve_inputs
from nfb.io.storage import download, is_url, source
from nfb.io.writers import read_metadata

VIEW = "scored"
FILE_COL, ROW_COL = "__nfb_file", "__nfb_pos"   # hidden: input order across files


def scored_files(specs: list[str], exclude: str | None = None) -> list[str]:
    """Resolved files; stdin ('-') is spooled to a temporary file, since filter and stats read
    their input more than once (schema, best-of-n). `exclude`: the verb's own output, never
    read back from a folder or glob it is in."""
    files = resolve_inputs(specs, exclude=exclude)
    if files == ["-"]:
        tmp = tempfile.NamedTemporaryFile(prefix="nfb-stdin-", suffix=".jsonl", delete=False)
        atexit.register(lambda: os.unlink(tmp.name) if os.path.exists(tmp.name) else None)
        with tmp:
            shutil.copyfileobj(sys.stdin.buffer, tmp, 1 << 20)
        files = [tmp.name]
    return files


def _parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(source(path))
    except (OSError, pa.ArrowException) as e:
        reason = "an empty file" if not is_url(path) and os.path.exists(path) \
            and os.path.getsize(path) == 0 \
            else str(e).splitlines()[0]
        raise InputError(f"{path}: not a readable Parquet file ({reason})") from None


def iter_tables(path: str, batch_rows: int = 16_384,
                columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows of one scored file in batches (Parquet, or JSONL written by nfb)."""
    if input_format(path) == "parquet":
        pf = _parquet(path)
        cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                yield pa.Table.from_batches([batch])
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        return
    for chunk in read_chunks([path], batch_rows):
        bad = [e for e in chunk.errors if e]
        if bad:
            raise InputError(f"{path}: row {chunk.first_row + chunk.errors.index(bad[0])} is "
                             f"not valid JSON ({bad[0]}); is this an nfb output?")
        t = chunk.table
        if columns:
            t = t.select([c for c in columns if c in t.column_names])
        yield t


def metadata(path: str) -> dict:
    return (read_metadata(path) or {}) if path != "-" else {}


def file_schema(path: str) -> pa.Schema:
    """One file's schema: the Parquet footer, or every row of a JSONL file (so a key that
    first appears late is seen)."""

    if input_format(path) == "parquet":
        return _parquet(path).schema_arrow.remove_metadata()
    return unify_schemas(t.schema for t in iter_tables(path))


def schema_names(path: str) -> list[str]:
    return file_schema(path).names


def unified_schema(files: list[str]) -> pa.Schema:
    """One schema for all rows of `files`: Parquet footers, or a full pass over JSONL."""

    return unify_schemas(file_schema(f) for f in files)


class ScoredView:
    """A DuckDB connection with the view `scored` over the inputs, in input order.

    `schema` is the inputs' unified Arrow schema (what an output is conformed to); `types`
    maps each column to its DuckDB type; `meta` is the first input's provenance. The view
    also has two hidden columns (file index, row within file) that give the input order.
    """

    def __init__(self, files: list[str], *, threads: int | None = None,
                 memory_limit: str | None = None):
        import duckdb

        from nfb.io.arrow import conform

        self.files = files
        # DuckDB spills sorts and windows to disk past this; default: DuckDB's (80% of RAM)
        memory_limit = memory_limit or os.environ.get("NFB_SQL_MEMORY_LIMIT") or None
        self.meta = metadata(files[0]) if files else {}
        self._tmp = tempfile.mkdtemp(prefix="nfb-sql-")
        schemas, paths = [], []
        try:
            for i, f in enumerate(files):
                if input_format(f) == "parquet":
                    pf = _parquet(f)
                    schemas.append(pf.schema_arrow.remove_metadata())
                    # DuckDB reads local files only: a store's is downloaded first
                    paths.append(download(f, self._tmp) if is_url(f) else os.path.abspath(f))
                    continue
                s = file_schema(f)   # JSONL: first pass for the schema, second to spool
                schemas.append(s)
                spool = os.path.join(self._tmp, f"{i:06d}.parquet")
                try:
                    with pq.ParquetWriter(spool, s, compression="lz4") as w:
                        for t in iter_tables(f):
                            w.write_table(conform(t, s))
                except (pa.ArrowException, TypeError, ValueError) as e:
                    raise InputError(f"{f}: its rows do not fit one table "
                                     f"({str(e).splitlines()[0]})") from None
                paths.append(spool)
            self.schema = unify_schemas(schemas)
            self.con = duckdb.connect(config={"threads": threads or os.cpu_count() or 1,
                                              **({"memory_limit": memory_limit}
                                                 if memory_limit else {})})
            self.con.execute("SET temp_directory = ?", [os.path.join(self._tmp, "spill")])
            self.con.execute("SET preserve_insertion_order = true")
            # pyarrow leaves NaN out of Parquet min/max statistics, and DuckDB 2.0 trusts them:
            # with these optimizers on, isnan() is folded to false and `WHERE isnan(x)` prunes
            # row groups that hold NaN. nfb never answers from statistics.
            self.con.execute("SET disabled_optimizers = 'statistics_propagation,filter_pushdown'")
            if not self.schema.names:
                # rows without a single column ({} lines): only their number is known
                n = sum(len(t) for f in files for t in iter_tables(f))
                self.con.execute(f"CREATE VIEW {VIEW} AS SELECT 0::BIGINT AS {FILE_COL}, "
                                 f"range AS {ROW_COL} FROM range({int(n)})")
            else:
                self.con.execute(self._view_sql(paths))
            self.con.execute("SET allowed_directories = ?", [[self._tmp]])
            self.con.execute("SET allowed_paths = ?", [paths])
            self.con.execute("SET enable_external_access = false")
            self.con.execute("SET lock_configuration = true")
            self.types = {r[0]: r[1] for r in self.con.execute(f"DESCRIBE {VIEW}").fetchall()
                          if r[0] not in (FILE_COL, ROW_COL)}
        except duckdb.Error as e:
            self.close()
            raise InputError("cannot read " + ", ".join(files) + ": "
                             + str(e).splitlines()[0]) from None
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _view_sql(paths: list[str]) -> str:
        lst = "[" + ", ".join(_sql_str(p) for p in paths) + "]"
        return (f"CREATE VIEW {VIEW} AS SELECT * EXCLUDE (__nfb_fn, file_row_number), "
                f"list_position({lst}, __nfb_fn) - 1 AS {FILE_COL}, "
                f"file_row_number AS {ROW_COL} "
                f"FROM read_parquet({lst}, union_by_name = true, filename = '__nfb_fn', "
                "file_row_number = true)")

    @property
    def names(self) -> list[str]:
        return list(self.types)

    def close(self) -> None:
        con = getattr(self, "con", None)
        if con is not None:
            con.close()
            self.con = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ScoredView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def quote(name: str) -> str:
    """A column name as a SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def is_numeric_type(duck_type: str) -> bool:
    t = duck_type.upper()
    return t in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT",
                 "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE") or \
        t.startswith("DECIMAL")


def is_float_type(duck_type: str) -> bool:
    return duck_type.upper() in ("FLOAT", "DOUBLE")


# --- the inputs of a verb ---------------------------------------------------------------------

def paths(inputs) -> list[str]:
    """A verb's `inputs` (one path or several) as a list of path strings."""
    if isinstance(inputs, (str, os.PathLike)):
        return [os.fspath(inputs)]
    return [os.fspath(i) for i in inputs]


def resolve(inputs, exclude: str | None = None) -> list[str]:
    """The scored files a verb reads (globs and folders expanded; never `exclude`)."""
    return scored_files(paths(inputs), exclude=exclude)


# --- the columns nfb added --------------------------------------------------------------------

def nfb_columns(names: list[str], meta: dict, prefix: str) -> list[str]:
    """The columns nfb added: the provenance's `columns` list; without provenance (e.g. a
    JSONL from a pipe), everything from `nfb_row` on, since nfb appends its columns."""
    listed = meta.get("columns")
    if listed is not None:
        return [c for c in listed if c in names]
    row = prefix + "nfb_row"
    return names[names.index(row):] if row in names else []


def score_candidates(names: list[str], meta: dict, prefix: str) -> list[str]:
    """Where a verb looks for score columns: the provenance's `columns` list, else every column
    with the prefix (every column without one)."""
    added = [c for c in (meta.get("columns") or []) if c in names]
    return added or [c for c in names if c.startswith(prefix)]


# --- the score column -------------------------------------------------------------------------

SCORE_AUTO = ("reward", "feedback_level_mean", "feedback_level")   # the score, when none is named


def load(files: list[str], columns: list[str], schema: pa.Schema) -> pa.Table:
    """The named columns of all files, concatenated in input order, one schema."""
    want = pa.schema([schema.field(c) for c in dict.fromkeys(columns)])
    parts = [conform(t, want) for f in files for t in iter_tables(f, columns=list(want.names))]
    if not parts:
        return pa.Table.from_arrays([pa.array([], f.type) for f in want], schema=want)
    return pa.concat_tables(parts)


def is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def is_number_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and is_number(t.value_type)


@dataclass
class Shape:
    """Where the responses and their scores are in a scored file.

    kind "row": one response per row (`responses[0]`, `scores[0]`); "fields": several named
    response columns per row, each with its score column; "list": one list column of
    responses and its aligned list of scores.
    """

    kind: str
    responses: list[str]
    scores: list[str]
    score: str          # the score's name without prefix or field, e.g. "reward"

    def describe(self) -> str:
        if self.kind == "row":
            return f"one response per row ({self.responses[0]}, {self.scores[0]})"
        if self.kind == "fields":
            return "responses in fields " + ", ".join(
                f"{r} ({s})" for r, s in zip(self.responses, self.scores))
        return f"a list of responses ({self.responses[0]}, {self.scores[0]})"


def detect_shape(schema: pa.Schema, *, prefix: str = "", score: str | None = None,
                 response_field: list[str] | None = None,
                 responses_field: str | None = None) -> Shape:
    """Find the responses and their scores; UsageError when they are not there."""
    names = set(schema.names)
    cands = [score] if score else list(SCORE_AUTO)
    hint = " (use --prefix if the scoring run had one)" if not prefix else ""

    def typ(c):
        return schema.field(c).type

    if responses_field:
        if responses_field not in names:
            raise UsageError(f"--responses-field {responses_field}: no such column")
        for s in cands:
            col = f"{prefix}{responses_field}_{s}"
            if col in names and is_number_list(typ(col)):
                return Shape("list", [responses_field], [col], s)
        raise UsageError(f"no list of scores for --responses-field {responses_field} (looked "
                         f"for {', '.join(f'{prefix}{responses_field}_{s}' for s in cands)})"
                         + hint)
    fields = list(response_field or [])
    if len(fields) >= 2:
        for s in cands:
            cols = [f"{prefix}{f}_{s}" for f in fields]
            if all(c in names and is_number(typ(c)) for c in cols):
                missing = [f for f in fields if f not in names]
                if missing:
                    raise UsageError(f"--response-field {missing[0]}: no such column")
                return Shape("fields", fields, cols, s)
        raise UsageError("no score columns for --response-field " + ", ".join(fields)
                         + f" (looked for {prefix}FIELD_{'|'.join(cands)})" + hint)
    # one response per row
    for s in cands:
        col = prefix + s
        if col in names and is_number(typ(col)):
            resp = fields[0] if fields else "response"
            if resp not in names:
                raise UsageError(f"--response-field {resp}: no such column (columns: "
                                 f"{', '.join(schema.names)})")
            return Shape("row", [resp], [col], s)
    if fields:
        raise UsageError(f"no {prefix}{cands[0]} column" + hint)
    # several responses per row, found by their score columns
    for s in cands:
        lists = [c for c in schema.names if f"{prefix}{c}_{s}" in names
                 and is_number_list(typ(f"{prefix}{c}_{s}"))]
        if lists:
            return Shape("list", [lists[0]], [f"{prefix}{lists[0]}_{s}"], s)
        named = [c for c in schema.names if f"{prefix}{c}_{s}" in names
                 and is_number(typ(f"{prefix}{c}_{s}"))]
        if len(named) >= 2:
            return Shape("fields", named, [f"{prefix}{c}_{s}" for c in named], s)
    raise UsageError(f"no scores found: no {prefix}{cands[0]} column, nor per-response score "
                     f"columns (FIELD_{cands[0]}); is this an nfb score or feedback output?"
                     + hint)
