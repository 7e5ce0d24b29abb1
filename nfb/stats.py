"""`nfb stats`: what a scored file holds: rows, errors, levels, reward/attribute quantiles."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from nfb.io.scored import iter_tables, metadata, schema_names
from nfb.tasks.feedback import LABELS

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def _numeric_columns(names: list[str], meta: dict, prefix: str) -> list[str]:
    added = meta.get("columns")
    if added:
        cands = [c for c in added if c in names]
    else:
        cands = [c for c in names if c.startswith(prefix)]
    skip = {prefix + "nfb_row", prefix + "feedback_level"}
    return [c for c in cands if c not in skip]


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def compute_stats(files: list[str], prefix: str = "") -> dict:
    meta = metadata(files[0]) if files else {}
    names: dict[str, None] = {}
    for f in files:
        names.update(dict.fromkeys(schema_names(f)))
    err_col, lvl_col = prefix + "nfb_error", prefix + "feedback_level"
    rows = 0
    errors: Counter = Counter()
    levels: Counter = Counter()
    values: dict[str, list[np.ndarray]] = {}
    numeric: list[str] | None = None
    for f in files:
        for t in iter_tables(f, columns=[err_col, lvl_col, *(meta.get("columns") or [])]
                             if meta.get("columns") else None):
            if numeric is None:
                numeric = [c for c in _numeric_columns(list(names), meta, prefix)
                           if c in t.column_names and _is_number(t.schema.field(c).type)]
            rows += len(t)
            if err_col in t.column_names:
                for e in t.column(err_col).to_pylist():
                    if e is not None:
                        errors[e.split(":", 1)[0]] += 1
            if lvl_col in t.column_names:
                levels.update(v for v in t.column(lvl_col).to_pylist() if v is not None)
            for c in numeric:
                if c in t.column_names:
                    arr = t.column(c).to_numpy(zero_copy_only=False).astype(float)
                    values.setdefault(c, []).append(arr[~np.isnan(arr)])
    out: dict = {
        "files": files, "rows": rows, "error_rows": sum(errors.values()),
        "errors": dict(errors.most_common()),
        "model": meta.get("model"), "task": meta.get("task"),
        "settings": {k: v for k, v in {
            "sampling": meta.get("sampling"),
            "weights": (meta.get("task_settings") or {}).get("weights"),
            "reward_token": meta.get("reward_token"), "prompt": meta.get("prompt"),
            "nfb_version": meta.get("nfb_version"), "started": meta.get("started"),
            "finished": meta.get("finished")}.items() if v is not None},
    }
    if lvl_col in names:
        parsed = sum(levels.values())
        out["levels"] = {f"{lv} {LABELS[lv]}": levels.get(lv, 0) for lv in range(1, 6)}
        out["levels"]["unparsed"] = rows - out["error_rows"] - parsed
        out["level_mean"] = (sum(k * v for k, v in levels.items()) / parsed) if parsed else None
    q = {}
    for c, parts in values.items():
        arr = np.concatenate(parts) if parts else np.zeros(0)
        if len(arr):
            q[c] = {"count": int(len(arr)), "mean": float(arr.mean()),
                    **{f"p{int(p * 100)}": float(np.quantile(arr, p)) for p in QUANTILES}}
        else:
            q[c] = {"count": 0}
    out["quantiles"] = q
    return out


def print_stats(console, s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"nfb stats: {', '.join(s['files'])}", show_header=False,
              title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("rows", f"{s['rows']:,}")
    if s.get("task"):
        t.add_row("task", s["task"])
    if s.get("model"):
        t.add_row("model", s["model"])
    for k, v in s.get("settings", {}).items():
        if k != "prompt":
            t.add_row(k, str(v))
    t.add_row("rows with errors", f"{s['error_rows']:,}")
    for code, n in s["errors"].items():
        t.add_row(f"  {code}", f"{n:,}")
    console.print(t)
    if "levels" in s:
        h = Table(title="feedback levels", title_justify="left")
        h.add_column("level")
        h.add_column("rows", justify="right")
        h.add_column("share", justify="right")
        scored = max(1, s["rows"] - s["error_rows"])
        for k, v in s["levels"].items():
            h.add_row(k, f"{v:,}", f"{100 * v / scored:.1f}%")
        console.print(h)
    if s["quantiles"]:
        qt = Table(title="quantiles", title_justify="left")
        qt.add_column("column")
        cols = ["count", "mean", *[f"p{int(p * 100)}" for p in QUANTILES]]
        for c in cols:
            qt.add_column(c, justify="right")
        for name, q in s["quantiles"].items():
            qt.add_row(name, *[("-" if q.get(c) is None else
                                f"{q[c]:,}" if c == "count" else f"{q[c]:.3f}") for c in cols])
        console.print(qt)


def stats(inputs: list[str] | str, *, prefix: str = "") -> dict:
    """`nfb stats` as one call: the summary dict that `--json` prints."""
    from nfb.io.scored import scored_files

    files = scored_files([inputs] if isinstance(inputs, str) else list(inputs))
    return compute_stats(files, prefix)
