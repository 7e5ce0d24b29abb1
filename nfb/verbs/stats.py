"""`nfb stats`: what a scored file holds: rows, errors, levels, reward/attribute quantiles,
overall and per group (`--group-by source`). Computed by DuckDB over the inputs.

Quantiles are exact (linear interpolation, like numpy's default) and out of core: each
numeric column is sorted by the engine (which spills to disk past its memory limit) and
streamed back, and only the values at the needed ranks are kept. NaN counts as missing.
"""

from __future__ import annotations

import math

import numpy as np

from nfb.errors import UsageError
from nfb.tasks.feedback import LABELS
from nfb.verbs.scored import (
    VIEW,
    ScoredView,
    is_float_type,
    is_numeric_type,
    quote,
    resolve,
    score_candidates,
)

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
QNAMES = [f"p{int(p * 100)}" for p in QUANTILES]


def _numeric_columns(view: ScoredView, prefix: str) -> list[str]:
    cands = score_candidates(view.names, view.meta, prefix)
    skip = {prefix + "nfb_row", prefix + "feedback_level"}
    return [c for c in cands if c not in skip and is_numeric_type(view.types[c])]


def _valid(view: ScoredView, col: str) -> tuple[str, str]:
    """(the column as DOUBLE, the condition for a usable value: not null, not NaN)."""
    c = quote(col)
    cond = f"{c} IS NOT NULL" + (f" AND NOT isnan({c})" if is_float_type(view.types[col]) else "")
    return f"CAST({c} AS DOUBLE)", cond


def _quantiles(view: ScoredView, col: str, group: str | None) -> list[tuple]:
    """[(group key, {count, mean, p0..p100})] in group order (one entry, key None, ungrouped)."""
    x, cond = _valid(view, col)
    g = quote(group) if group else "NULL"
    agg = view.con.execute(
        f"SELECT {g} AS g, count(*) AS n, avg({x}) AS m FROM {VIEW} WHERE {cond} "
        f"GROUP BY ALL ORDER BY g NULLS LAST").fetchall() if group else \
        view.con.execute(f"SELECT NULL, count(*), avg({x}) FROM {VIEW} WHERE {cond}").fetchall()
    counts = np.array([r[1] for r in agg], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    # the ranks each quantile needs: floor and ceil of p * (n - 1), per group
    need = []
    for off, n in zip(offsets, counts):
        for p in QUANTILES:
            k = p * (n - 1)
            need += [off + math.floor(k), off + math.ceil(k)]
    pos = np.unique(np.array(need, dtype=np.int64))
    got = np.empty(len(pos))
    if len(pos):
        order = f"{g} NULLS LAST, x" if group else "x"
        reader = view.con.sql(f"SELECT {x} AS x FROM {VIEW} WHERE {cond} ORDER BY {order}"
                              ).to_arrow_reader(1 << 17)
        start = 0
        for batch in reader:
            n = batch.num_rows
            lo, hi = np.searchsorted(pos, [start, start + n])
            if hi > lo:
                vals = batch.column(0).to_numpy(zero_copy_only=False)
                got[lo:hi] = vals[pos[lo:hi] - start]
            start += n
    value = dict(zip(pos.tolist(), got.tolist()))
    out = []
    for (key, n, mean), off in zip(agg, offsets):
        if not n:
            out.append((key, {"count": 0}))
            continue
        q = {}
        for name, p in zip(QNAMES, QUANTILES):
            k = p * (n - 1)
            a, b = value[off + math.floor(k)], value[off + math.ceil(k)]
            q[name] = a + (b - a) * (k - math.floor(k)) if b != a else a
        out.append((key, {"count": int(n), "mean": float(mean), **q}))
    return out


def _settings(meta: dict) -> dict:
    return {k: v for k, v in {
        "sampling": meta.get("sampling"),
        "weights": (meta.get("task_settings") or {}).get("weights"),
        "reward_token": meta.get("reward_token"), "prompt": meta.get("prompt"),
        "nfb_version": meta.get("nfb_version"), "started": meta.get("started"),
        "finished": meta.get("finished")}.items() if v is not None}


def compute_stats(files: list[str], prefix: str = "", group_by: str | None = None) -> dict:
    import duckdb

    with ScoredView(files) as view:
        try:
            return _compute(view, files, prefix, group_by)
        except duckdb.Error as e:
            raise UsageError(f"stats failed: {str(e).splitlines()[0]}") from None


def _key(v):
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


def _compute(view: ScoredView, files: list[str], prefix: str, group_by: str | None) -> dict:
    meta, con = view.meta, view.con
    err_col, lvl_col = prefix + "nfb_error", prefix + "feedback_level"
    if group_by is not None and group_by not in view.types:
        raise UsageError(f"no column {group_by} in the input (columns: "
                         f"{', '.join(view.names)}); --group-by needs it")
    has_err, has_lvl = err_col in view.types, lvl_col in view.types
    rows = con.execute(f"SELECT count(*) FROM {VIEW}").fetchall()[0][0]
    errors: dict = {}
    if has_err:
        errors = {r[0]: int(r[1]) for r in con.execute(
            f"SELECT split_part({quote(err_col)}, ':', 1) AS code, count(*) AS n, "
            f"min(__nfb_file * 4294967296 + __nfb_pos) AS first FROM {VIEW} "
            f"WHERE {quote(err_col)} IS NOT NULL GROUP BY code ORDER BY n DESC, first"
        ).fetchall()}
    out: dict = {
        "files": files, "rows": int(rows), "error_rows": int(sum(errors.values())),
        "errors": errors, "model": meta.get("model"), "task": meta.get("task"),
        "settings": _settings(meta),
    }
    if has_lvl:
        levels = dict(con.execute(
            f"SELECT {quote(lvl_col)}, count(*) FROM {VIEW} WHERE {quote(lvl_col)} IS NOT NULL "
            "GROUP BY 1").fetchall())
        parsed = sum(v for k, v in levels.items() if k in LABELS)
        out["levels"] = {f"{lv} {LABELS[lv]}": int(levels.get(lv, 0)) for lv in range(1, 6)}
        out["levels"]["unparsed"] = int(rows - out["error_rows"] - parsed)
        out["level_mean"] = (sum(k * v for k, v in levels.items() if k in LABELS) / parsed) \
            if parsed else None
    numeric = _numeric_columns(view, prefix)
    out["quantiles"] = {c: _quantiles(view, c, None)[0][1] for c in numeric}
    if group_by is not None:
        out["group_by"] = group_by
        out["groups"] = _groups(view, group_by, numeric, err_col if has_err else None,
                                lvl_col if has_lvl else None)
    return out


def _groups(view: ScoredView, group: str, numeric: list[str], err_col: str | None,
            lvl_col: str | None) -> list[dict]:
    g = quote(group)
    cols = [f"{g} AS g", "count(*) AS n",
            f"count({quote(err_col)})" if err_col else "0",
            f"avg({quote(lvl_col)})" if lvl_col else "NULL"]
    base = view.con.execute(f"SELECT {', '.join(cols)} FROM {VIEW} GROUP BY ALL "
                            "ORDER BY g NULLS LAST").fetchall()
    groups = {}
    order = []
    for key, n, e, lm in base:
        k = repr(key)
        order.append(k)
        groups[k] = {"group": _key(key), "rows": int(n), "error_rows": int(e)}
        if lvl_col:
            groups[k]["level_mean"] = None if lm is None else float(lm)
        groups[k]["quantiles"] = {c: {"count": 0} for c in numeric}
    for c in numeric:
        for key, q in _quantiles(view, c, group):
            groups[repr(key)]["quantiles"][c] = q
    return [groups[k] for k in order]


def stats(inputs: list[str] | str, *, prefix: str = "", group_by: str | None = None) -> dict:
    """`nfb stats` as one call: the summary dict that `--json` prints."""
    files = resolve(inputs)
    return compute_stats(files, prefix, group_by)
