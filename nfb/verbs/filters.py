"""`nfb filter`: keep rows of scored files with a SQL condition; best-of-n, top-k, rank within
a group. One DuckDB query over the inputs, streamed into nfb's writer.

Every option compiles to one query over the view `scored` (see nfb.verbs.scored):

    --min-level L        "feedback_level" >= L
    --max-level L        "feedback_level" <= L
    --min-reward X       ("reward" >= X AND NOT isnan("reward"))
    --max-reward X       ("reward" <= X AND NOT isnan("reward"))
    --drop-errors        "nfb_error" IS NULL
    --where EXPR         (EXPR)                       any SQL boolean expression; repeatable, AND
    --best-of-n          --top-k 1
    --top-k K --group-by G
                         QUALIFY row_number() OVER (PARTITION BY G ORDER BY score DESC) <= K
                         over the rows that pass the conditions; score = reward, else
                         feedback_level_mean, else feedback_level; a row whose score is null or
                         NaN never wins; ties go to the earlier row; a row whose G is null is a
                         group of its own.
    --add-rank --group-by G
                         adds nfb_rank (1 = best in its group) and nfb_z (the score's z-score in
                         its group, population standard deviation; null when undefined).

Rows come out in input order. `--where` accepts an expression only: it is parsed by DuckDB
and refused unless it is one boolean expression with no subquery, no table function and no
statement; the connection can read no file but the inputs in any case.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from nfb.errors import UsageError
from nfb.io.arrow import conform
from nfb.io.writers import OutputWriter, output_format
from nfb.tasks.feedback import LEVELS
from nfb.verbs.scored import (
    FILE_COL,
    ROW_COL,
    VIEW,
    ScoredView,
    is_float_type,
    is_numeric_type,
    nfb_columns,
    quote,
)

ConfigError = UsageError
_WHERE = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|==|!=|>|<|=)\s*(\S+)\s*")
_HINT = ("write a SQL condition over the columns, e.g. "
         "\"helpfulness >= 3 AND source IN ('web', 'forum')\" (or COLUMN OP NUMBER)")
RANK_COL, Z_COL = "nfb_rank", "nfb_z"
BT_CAVEAT = ("rewards are comparable only between responses to the same prompt")


class FilterResult(NamedTuple):
    rows_read: int
    rows_kept: int


def parse_level(text: str) -> int:
    t = str(text).strip().lower()
    if t in LEVELS:
        return LEVELS[t]
    if t.isdigit() and 1 <= int(t) <= 5:
        return int(t)
    raise ConfigError(f"level {text!r}: use 1-5 or one of {', '.join(LEVELS)}")


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if v == v and abs(v) != float("inf") else None


# --- expressions --------------------------------------------------------------------------

_TABLE_FUNCS: set[str] | None = None
_DENY_FUNCS = {"getenv", "current_setting", "read_text", "read_blob", "query", "query_table",
               "glob", "sql_auto_complete", "json_serialize_sql", "json_deserialize_sql",
               "json_execute_serialized_sql"}


def _table_functions(con) -> set[str]:
    global _TABLE_FUNCS
    if _TABLE_FUNCS is None:
        _TABLE_FUNCS = {r[0].lower() for r in con.execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() "
            "WHERE function_type IN ('table', 'table_macro', 'pragma')").fetchall()}
    return _TABLE_FUNCS


def _walk(node, out: list) -> None:
    """Every dict in the parse tree, in order (iterative: a deep tree is no recursion)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            out.append(n)
            stack.extend(reversed(list(n.values())))
        elif isinstance(n, list):
            stack.extend(reversed(n))


def check_expression(view: ScoredView, expr: str) -> None:
    """Refuse anything but one boolean expression over the view: parsed by DuckDB, the parse
    tree must be `SELECT * FROM scored WHERE (expr)` with no subquery and no table function."""
    if not expr.strip():
        raise ConfigError(f"--where {expr!r}: empty; {_HINT}")
    sql = f"SELECT * FROM {VIEW} WHERE (\n{expr}\n)"
    try:
        tree = orjson.loads(view.con.execute("SELECT json_serialize_sql(?)",
                                             [sql]).fetchall()[0][0])
    except orjson.JSONDecodeError:   # its parse tree is deeper than orjson reads
        raise ConfigError(f"--where {expr[:80]!r}...: nested too deeply; write a flatter "
                          f"condition. {_HINT}") from None
    if tree.get("error"):
        msg = tree.get("error_message", "syntax error")
        if ";" in expr:
            msg = "only an expression is allowed, not statements (';')"
        raise ConfigError(f"--where {expr!r}: {msg}; {_HINT}")
    stmts = tree.get("statements") or []
    node = stmts[0].get("node", {}) if len(stmts) == 1 else {}
    frm = node.get("from_table") or {}
    if (len(stmts) != 1 or node.get("type") != "SELECT_NODE" or frm.get("type") != "BASE_TABLE"
            or frm.get("table_name") != VIEW or node.get("group_expressions")
            or node.get("having") or node.get("qualify") or node.get("sample")
            or node.get("modifiers") or (node.get("cte_map") or {}).get("map")):
        raise ConfigError(f"--where {expr!r}: only an expression is allowed (no statements, "
                          f"no clauses); {_HINT}")
    nodes: list = []
    _walk(node.get("where_clause"), nodes)
    tables = _table_functions(view.con)
    for n in nodes:
        cls = str(n.get("class", "")).upper()
        if cls == "SUBQUERY" or "subquery" in n:
            raise ConfigError(f"--where {expr!r}: a subquery is not allowed; {_HINT}")
        if cls == "FUNCTION":
            name = str(n.get("function_name", "")).lower()
            if name in tables or name in _DENY_FUNCS:
                raise ConfigError(f"--where {expr!r}: {name}() is not allowed: an expression "
                                  f"may use the columns only, not read or write files; {_HINT}")


def _bind_error(view: ScoredView, expr: str, e: Exception, extra: str = "") -> ConfigError:
    text = str(e).splitlines()[0]
    m = re.search(r'Referenced column "?(.+?)"? not found', text)
    if m:
        problem = (f"no column {m.group(1)} in the input (columns: "
                   f"{', '.join(view.names)})")
    else:
        problem = re.sub(r"^[A-Za-z ]*Error: ", "", text)
        if "Conversion" in text or "Cannot compare" in text or "No function matches" in text:
            problem = f"type mismatch: {problem}"
    return ConfigError(f"--where {expr!r}: {problem}{extra}; {_HINT}")


def compile_where(view: ScoredView, text: str) -> str:
    """`text` as a checked SQL condition. The older `COLUMN OP NUMBER` form means the same as
    before (the column name taken literally)."""
    m = _WHERE.fullmatch(text)
    extra = ""
    if m:
        col, op, val = m.groups()
        num = _number(val)
        if num is not None and (col in view.types or not re.search(r"[.\-]", col)):
            if col not in view.types:
                raise ConfigError(f"--where {text!r}: no column {col} in the input (columns: "
                                  f"{', '.join(view.names)})")
            if not is_numeric_type(view.types[col]):
                raise ConfigError(f"--where {text!r}: type mismatch: {col} is "
                                  f"{view.types[col]}, not a number; to compare text, quote "
                                  f"it: {col} {'=' if op == '==' else op} '{val}'")
            sql = f"{quote(col)} {'=' if op == '==' else op} {val}"
            if is_float_type(view.types[col]):
                sql = f"({sql} AND NOT isnan({quote(col)}))"
            return sql
        if num is None and not val.startswith(("'", "(")):
            extra = f" ({val!r} is not a number)"
    check_expression(view, text)
    import duckdb
    try:
        view.con.execute(f"SELECT count(*) FROM (SELECT * FROM {VIEW} WHERE (\n{text}\n) "
                         "LIMIT 0)").fetchall()
    except duckdb.Error as e:
        raise _bind_error(view, text, e, extra) from None
    return f"(\n{text}\n)"


# --- the query ----------------------------------------------------------------------------

@dataclass
class FilterSpec:
    where: list[str] = field(default_factory=list)      # raw --where texts
    min_level: str | None = None
    max_level: str | None = None
    min_reward: float | None = None
    max_reward: float | None = None
    drop_errors: bool = False
    top_k: int | None = None
    group_by: str | None = None
    add_rank: bool = False
    drop_nfb_columns: bool = False
    prefix: str = ""

    def args(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False, [], "")}


def build_spec(*, min_level=None, max_level=None, min_reward=None, max_reward=None,
               where=(), drop_errors=False, best_of_n=False, top_k=None, group_by=None,
               add_rank=False, drop_nfb_columns=False, prefix="") -> FilterSpec:
    if min_level is not None:
        parse_level(min_level)
    if max_level is not None:
        parse_level(max_level)
    if top_k is not None:
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
            raise ConfigError(f"--top-k {top_k!r}: give a whole number >= 1")
        if best_of_n and top_k != 1:
            raise ConfigError("--best-of-n is --top-k 1; give one of them")
    if best_of_n:
        top_k = 1
    if top_k is not None and not group_by:
        raise ConfigError(f"{'--best-of-n' if best_of_n else '--top-k'} needs --group-by FIELD "
                          "(e.g. --group-by prompt)")
    if add_rank and not group_by:
        raise ConfigError("--add-rank needs --group-by FIELD (e.g. --group-by prompt)")
    if group_by and top_k is None and not add_rank:
        raise ConfigError("--group-by goes with --best-of-n, --top-k or --add-rank")
    return FilterSpec(list(where), None if min_level is None else str(min_level),
                      None if max_level is None else str(max_level), min_reward, max_reward,
                      drop_errors, None if top_k is None else int(top_k), group_by, add_rank,
                      drop_nfb_columns, prefix)


def score_column(names, prefix: str) -> str:
    for c in ("reward", "feedback_level_mean", "feedback_level"):
        if prefix + c in names:
            return prefix + c
    raise ConfigError("--best-of-n needs a reward or feedback_level column (is this an nfb "
                      "output? use --prefix if its columns have one)")


def _need(view: ScoredView, col: str, flag: str, numeric: bool = True) -> None:
    if col not in view.types:
        raise ConfigError(f"no column {col} in the input (columns: {', '.join(view.names)}); "
                          f"{flag} needs it" + ("" if flag == "--group-by" else
                                                " (use --prefix if the scoring run used one)"))
    if numeric and not is_numeric_type(view.types[col]):
        raise ConfigError(f"{flag} needs a numeric column, but {col} is "
                          f"{view.types[col]} here")


def conditions(view: ScoredView, spec: FilterSpec) -> list[str]:
    """Every option as a SQL condition, in the order given above."""
    p = spec.prefix
    out = []

    def cmp(col: str, op: str, value: float, flag: str) -> None:
        _need(view, col, flag)
        sql = f"{quote(col)} {op} {value!r}"
        if is_float_type(view.types[col]):
            sql = f"({sql} AND NOT isnan({quote(col)}))"
        out.append(sql)

    if spec.min_level is not None:
        cmp(p + "feedback_level", ">=", parse_level(spec.min_level), "--min-level")
    if spec.max_level is not None:
        cmp(p + "feedback_level", "<=", parse_level(spec.max_level), "--max-level")
    if spec.min_reward is not None:
        cmp(p + "reward", ">=", float(spec.min_reward), "--min-reward")
    if spec.max_reward is not None:
        cmp(p + "reward", "<=", float(spec.max_reward), "--max-reward")
    if spec.drop_errors:
        _need(view, p + "nfb_error", "--drop-errors", numeric=False)
        out.append(f"{quote(p + 'nfb_error')} IS NULL")
    out += [compile_where(view, w) for w in spec.where]
    return out


def build_query(view: ScoredView, spec: FilterSpec) -> tuple[str, list[str], list[str]]:
    """(SQL, output columns, columns nfb added to them)."""
    if not view.names:
        n = view.con.execute(f"SELECT count(*) FROM {VIEW}").fetchall()[0][0]
        if n == 0:   # empty input (e.g. an empty pipe): an empty output
            return f"SELECT * FROM {VIEW} WHERE FALSE", [], []
        raise ConfigError(f"{', '.join(view.files)}: the rows have no columns, nothing to filter")
    conds = conditions(view, spec)
    where = " AND ".join(conds) if conds else "TRUE"
    p = spec.prefix
    added = nfb_columns(view.names, view.meta, p)
    cols = [c for c in view.names if not (spec.drop_nfb_columns and c in added)]
    order = f"{FILE_COL}, {ROW_COL}"
    if spec.group_by is None:
        sel = ", ".join(quote(c) for c in cols)
        return f"SELECT {sel} FROM {VIEW} WHERE {where}", cols, added
    _need(view, spec.group_by, "--group-by", numeric=False)
    score = score_column(view.types, p)
    sc = quote(score)
    s = f"CASE WHEN isnan({sc}) THEN NULL ELSE {sc} END" if is_float_type(view.types[score]) \
        else f"CAST({sc} AS DOUBLE)"
    g = quote(spec.group_by)
    part = f"PARTITION BY {g}, CASE WHEN {g} IS NULL THEN ({order}) END"
    win = f"({part} ORDER BY __nfb_s DESC NULLS LAST, {order})"
    extra_cols: list[str] = []
    rank_sql = ""
    if spec.add_rank:
        rank_col, z_col = p + RANK_COL, p + Z_COL
        for c in (rank_col, z_col):
            if c in view.types and c not in added:
                raise ConfigError(f"the input already has a column {c}; --add-rank would "
                                  "replace it (rename it, or use --prefix)")
        cols = [c for c in cols if c not in (rank_col, z_col)]
        extra_cols = [rank_col, z_col]
        rank_sql = (f", CASE WHEN __nfb_s IS NULL THEN NULL ELSE __nfb_k END AS {quote(rank_col)}"
                    f", (__nfb_s - avg(__nfb_s) OVER ({part})) / NULLIF(stddev_pop(__nfb_s) "
                    f"OVER ({part}), 0) AS {quote(z_col)}")
    sel = ", ".join(quote(c) for c in cols + extra_cols)
    inner = f"SELECT *, {s} AS __nfb_s FROM {VIEW} WHERE {where}"
    if not spec.add_rank:
        # narrow: rank (group, score, position) only, then keep the winners' full rows in one
        # ordered scan (a semi join on the position); memory grows with the groups, not the
        # width of the rows, and only the kept rows are sorted back into input order
        key = f"({FILE_COL} * 1099511627776 + {ROW_COL})"
        narrow = f"SELECT {g}, {FILE_COL}, {ROW_COL}, {s} AS __nfb_s FROM {VIEW} WHERE {where}"
        winners = (f"SELECT {key} FROM ({narrow}) WHERE __nfb_s IS NOT NULL "
                   f"QUALIFY row_number() OVER {win} <= {spec.top_k}")
        sql = f"SELECT {sel} FROM {VIEW} WHERE {key} IN ({winners}) ORDER BY {order}"
        return sql, cols, [c for c in added if c in cols]
    keep = "TRUE" if spec.top_k is None else f"__nfb_s IS NOT NULL AND __nfb_k <= {spec.top_k}"
    sql = (f"SELECT {sel} FROM (SELECT *, row_number() OVER {win} AS __nfb_k{rank_sql} FROM "
           f"({inner})) WHERE {keep} ORDER BY {order}")
    return sql, cols + extra_cols, [*(c for c in added if c in cols), *extra_cols]


def _scalar_reward_warning(view: ScoredView, spec: FilterSpec) -> str | None:
    """--min/--max-reward across prompts on a scalar (Bradley-Terry) reward model's output."""
    if spec.min_reward is None and spec.max_reward is None or spec.group_by:
        return None
    ts = view.meta.get("task_settings")
    if view.meta.get("task") not in (None, "score") or not isinstance(ts, dict) \
            or ts.get("attributes"):
        return None
    prompt = ((view.meta.get("fields") or {}).get("prompt")) or "prompt"
    if prompt in view.types:
        try:
            n = view.con.execute(f"SELECT approx_count_distinct({quote(prompt)}) "
                                 f"FROM {VIEW}").fetchall()[0][0]
        except Exception:  # noqa: BLE001 - a nested column: assume many
            n = 2
        if n <= 1:
            return None
    flag = "--min-reward" if spec.min_reward is not None else "--max-reward"
    return (f"{flag} applies one threshold across prompts, but {view.meta.get('model') or 'this'}"
            f" is a scalar (Bradley-Terry) reward model: its card says {BT_CAVEAT}. To keep the "
            f"best responses of each prompt, use --top-k 1 --group-by {prompt} (or --top-k K).")


def run_filter(files: list[str], output: str, spec: FilterSpec,
               warn: Callable[[str], None] | None = None) -> FilterResult:
    """Write the kept rows; returns (rows read, rows kept)."""
    import duckdb

    with ScoredView(files) as view:
        sql, cols, added = build_query(view, spec)
        note = _scalar_reward_warning(view, spec)
        if note:
            (warn or (lambda m: warnings.warn(m, stacklevel=3)))(note)
        fmt = output_format(output)
        types = {f.name: f for f in view.schema}
        import pyarrow as pa
        # the inputs' own types (and field metadata), whatever DuckDB hands back
        schema = pa.schema([types[c] if c in types else
                            pa.field(c, pa.int64() if c.endswith(RANK_COL) else pa.float64())
                            for c in cols])
        meta = dict(view.meta)
        if meta:
            meta["fingerprint"] = None   # a filtered file is no finished run of the command
            meta["identity"] = None
        meta["columns"] = added if not spec.drop_nfb_columns else \
            [c for c in added if c in (spec.prefix + RANK_COL, spec.prefix + Z_COL)]
        meta["filter"] = {**spec.args(), "inputs": files}
        meta["verbs"] = [*(view.meta.get("verbs") or []),
                         {"verb": "filter", "args": spec.args(), "inputs": files,
                          "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        try:
            read = view.con.execute(f"SELECT count(*) FROM {VIEW}").fetchall()[0][0]
            with OutputWriter(output, schema if fmt == "parquet" else pa.schema([]),
                              meta) as writer:
                reader = view.con.sql(sql).to_arrow_reader(64 * 1024)
                for batch in reader:
                    writer.write(conform(pa.Table.from_batches([batch]), schema))
        except duckdb.Error as e:
            text = str(e).splitlines()[0]
            if spec.where and ("Conversion" in text or "Invalid Input" in text
                               or "Out of Range" in text):
                raise ConfigError(f"--where: type mismatch while filtering: {text}; "
                                  f"{_HINT}") from None
            raise ConfigError(f"filter failed: {text}") from None
        return FilterResult(int(read), writer.rows)


def filter_rows(inputs: list[str] | str, output: str, *, min_level: str | int | None = None,
                max_level: str | int | None = None, min_reward: float | None = None,
                max_reward: float | None = None, where: list[str] | str | None = None,
                best_of_n: bool = False, top_k: int | None = None, group_by: str | None = None,
                add_rank: bool = False, drop_errors: bool = False,
                drop_nfb_columns: bool = False, prefix: str = "",
                warn: Callable[[str], None] | None = None) -> FilterResult:
    """`nfb filter` as one call: write the kept rows of `inputs` to `output`.
    Returns (rows read, rows kept). `warn` receives advice (default: Python warnings)."""
    from nfb.verbs.scored import resolve

    output = __import__("os").fspath(output)
    try:
        output_format(output)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    where = [where] if isinstance(where, str) else list(where or [])
    spec = build_spec(min_level=min_level, max_level=max_level, min_reward=min_reward,
                      max_reward=max_reward, where=where, drop_errors=drop_errors,
                      best_of_n=best_of_n, top_k=top_k, group_by=group_by, add_rank=add_rank,
                      drop_nfb_columns=drop_nfb_columns, prefix=prefix)
    from nfb.io.outputs import guarded

    files = resolve(inputs, exclude=output)
    with guarded(output, files):   # never over an input; one writer; a failed write one line
        return run_filter(files, output, spec, warn)
