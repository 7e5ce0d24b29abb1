"""`nfb filter`: keep rows by level, reward, attributes; best-of-n per group. Streams.

Conditions combine with AND; a null value fails every numeric condition. Best-of-n reads
the files twice: first only the group and score columns (to find each group's best row),
then every column, keeping the winners, so memory grows with the number of groups only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nfb.config import ConfigError
from nfb.io.scored import iter_tables, metadata, schema_names, unified_schema
from nfb.io.writers import OutputWriter, output_format
from nfb.tasks.feedback import LEVELS

_OPS = {">=": pc.greater_equal, "<=": pc.less_equal, ">": pc.greater, "<": pc.less,
        "==": pc.equal, "=": pc.equal, "!=": pc.not_equal}
_WHERE = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|==|!=|>|<|=)\s*(\S+)\s*")


@dataclass(frozen=True)
class Condition:
    column: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Condition:
        m = _WHERE.fullmatch(text)
        if not m:
            raise ConfigError(f"--where {text!r}: write COLUMN OP NUMBER, e.g. "
                              "'helpfulness>=3' (OP one of >= <= > < == !=)")
        try:
            value = float(m.group(3))
        except ValueError:
            raise ConfigError(f"--where {text!r}: {m.group(3)!r} is not a number") from None
        return cls(m.group(1), m.group(2), value)

    def mask(self, table: pa.Table) -> pa.Array:
        col = table.column(self.column)
        return pc.fill_null(_OPS[self.op](col, self.value), False)


def parse_level(text: str) -> int:
    t = text.strip().lower()
    if t in LEVELS:
        return LEVELS[t]
    if t.isdigit() and 1 <= int(t) <= 5:
        return int(t)
    raise ConfigError(f"level {text!r}: use 1-5 or one of {', '.join(LEVELS)}")


@dataclass
class FilterSpec:
    conditions: list[Condition] = field(default_factory=list)
    drop_errors: bool = False
    best_of_n: bool = False
    group_by: str | None = None
    drop_nfb_columns: bool = False
    prefix: str = ""


def build_spec(*, min_level: str | None, max_level: str | None, min_reward: float | None,
               max_reward: float | None, where: list[str], drop_errors: bool, best_of_n: bool,
               group_by: str | None, drop_nfb_columns: bool, prefix: str) -> FilterSpec:
    conds = []
    lvl = prefix + "feedback_level"
    rew = prefix + "reward"
    if min_level is not None:
        conds.append(Condition(lvl, ">=", parse_level(min_level)))
    if max_level is not None:
        conds.append(Condition(lvl, "<=", parse_level(max_level)))
    if min_reward is not None:
        conds.append(Condition(rew, ">=", min_reward))
    if max_reward is not None:
        conds.append(Condition(rew, "<=", max_reward))
    conds += [Condition.parse(w) for w in where]
    if best_of_n and not group_by:
        raise ConfigError("--best-of-n needs --group-by FIELD (e.g. --group-by prompt)")
    if group_by and not best_of_n:
        raise ConfigError("--group-by goes with --best-of-n")
    return FilterSpec(conds, drop_errors, best_of_n, group_by, drop_nfb_columns, prefix)


def _score_column(names: list[str], prefix: str) -> str:
    for c in ("reward", "feedback_level_mean", "feedback_level"):
        if prefix + c in names:
            return prefix + c
    raise ConfigError("--best-of-n needs a reward or feedback_level column (is this an nfb "
                      "output? use --prefix if its columns have one)")


def _check_columns(files: list[str], spec: FilterSpec) -> list[str]:
    names: dict[str, None] = {}
    for f in files:
        names.update(dict.fromkeys(schema_names(f)))
    need = [c.column for c in spec.conditions]
    if spec.drop_errors:
        need.append(spec.prefix + "nfb_error")
    if spec.group_by:
        need.append(spec.group_by)
    missing = sorted({c for c in need if c not in names})
    if missing:
        raise ConfigError(f"no column {', '.join(missing)} in the input (columns: "
                          f"{', '.join(names)})")
    return list(names)


def _group_key(values: pa.ChunkedArray) -> list:
    return values.to_pylist() if not pa.types.is_nested(values.type) else [
        repr(v) for v in values.to_pylist()]


def _winners(files: list[str], spec: FilterSpec, score_col: str) -> set[int]:
    """Global row positions of the best row per group (first one wins a tie)."""
    best: dict = {}
    pos = 0
    cols = [spec.group_by, score_col, *{c.column for c in spec.conditions}]
    if spec.drop_errors:
        cols.append(spec.prefix + "nfb_error")
    for f in files:
        for t in iter_tables(f, columns=cols):
            keep = _mask(t, spec)
            scores = t.column(score_col).to_pylist()
            for i, (g, s, k) in enumerate(zip(_group_key(t.column(spec.group_by)), scores,
                                              keep)):
                if not k or s is None:
                    continue
                cur = best.get(g)
                if cur is None or s > cur[0]:
                    best[g] = (s, pos + i)
            pos += len(t)
    return {p for _, p in best.values()}


def _mask(table: pa.Table, spec: FilterSpec) -> np.ndarray:
    mask = np.ones(len(table), dtype=bool)
    for c in spec.conditions:
        mask &= c.mask(table).to_numpy(zero_copy_only=False)
    if spec.drop_errors:
        mask &= table.column(spec.prefix + "nfb_error").is_null().to_numpy(zero_copy_only=False)
    return mask


def run_filter(files: list[str], output: str, spec: FilterSpec) -> tuple[int, int]:
    """Write the kept rows; returns (rows read, rows kept)."""
    names = _check_columns(files, spec)
    meta = metadata(files[0]) if files else {}
    drop: set[str] = set()
    if spec.drop_nfb_columns:
        drop = set(meta.get("columns") or [])
        drop |= {c for c in names if c.startswith(spec.prefix + "nfb_")}
    winners = np.fromiter(sorted(_winners(files, spec, _score_column(names, spec.prefix))),
                          np.int64) if spec.best_of_n else None
    schema = unified_schema(files) if output_format(output) == "parquet" else pa.schema([])
    schema = pa.schema([fld for fld in schema if fld.name not in drop])
    out_meta = dict(meta, filter={"conditions": [f"{c.column}{c.op}{c.value:g}"
                                                 for c in spec.conditions],
                                  "drop_errors": spec.drop_errors,
                                  "best_of_n_by": spec.group_by, "inputs": files})
    if spec.drop_nfb_columns:
        out_meta = {}
    read = kept = pos = 0
    with OutputWriter(output, schema, out_meta or None) as writer:
        for f in files:
            for t in iter_tables(f):
                mask = _mask(t, spec)
                if winners is not None:
                    mask &= np.isin(np.arange(pos, pos + len(t)), winners)
                pos += len(t)
                read += len(t)
                sel = t.filter(pa.array(mask))
                if drop:
                    sel = sel.drop_columns([c for c in sel.column_names if c in drop])
                writer.write(sel)
                kept += len(sel)
    return read, kept




def filter_rows(inputs: list[str] | str, output: str, *, min_level: str | int | None = None,
                max_level: str | int | None = None, min_reward: float | None = None,
                max_reward: float | None = None, where: list[str] | str | None = None,
                best_of_n: bool = False, group_by: str | None = None,
                drop_errors: bool = False, drop_nfb_columns: bool = False,
                prefix: str = "") -> tuple[int, int]:
    """`nfb filter` as one call: write the kept rows of `inputs` to `output`.
    Returns (rows read, rows kept)."""
    from nfb.io.scored import scored_files
    from nfb.io.writers import output_format as _fmt

    try:
        _fmt(output)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    where = [where] if isinstance(where, str) else list(where or [])
    spec = build_spec(min_level=None if min_level is None else str(min_level),
                      max_level=None if max_level is None else str(max_level),
                      min_reward=min_reward, max_reward=max_reward, where=where,
                      drop_errors=drop_errors, best_of_n=best_of_n, group_by=group_by,
                      drop_nfb_columns=drop_nfb_columns, prefix=prefix)
    files = scored_files([inputs] if isinstance(inputs, str) else list(inputs))
    return run_filter(files, output, spec)
