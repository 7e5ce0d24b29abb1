"""`nfb eval`: how well a reward or feedback model agrees with human labels.

- Attributes (HelpSteer2 shape: `helpfulness` ... `verbosity`, 0-4, scored with
  `--prefix rm_`): MAE, Pearson and Spearman between each model column and its human column.
- Feedback level against a human level (1-5 or a label): exact agreement, agreement within
  one level, MAE and Spearman.
- Pairwise accuracy on chosen/rejected rows (RewardBench shape, scored with `--response-field
  chosen --response-field rejected`): the share of rows whose chosen response scores strictly
  higher than the rejected one (a tie counts as wrong, as in RewardBench, and is counted), per
  value of a subset column when given.

Every figure comes with a bootstrap interval (rows resampled with replacement, percentile
method, a fixed seed: the same data gives the same interval). Rows where either side is null
(error rows, missing labels) are left out of a figure and counted as skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nfb.errors import UsageError
from nfb.tasks.feedback import LEVELS
from nfb.verbs.scored import SCORE_AUTO, is_number, load, resolve, unified_schema

Stat = Callable[[np.ndarray, np.ndarray], float]


# ----------------------------------------------------------------------------- metrics


def rankdata(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing their mean rank (scipy's 'average')."""
    a = np.asarray(a, dtype=float)
    sorter = np.argsort(a, kind="mergesort")
    inv = np.empty(len(a), dtype=np.intp)
    inv[sorter] = np.arange(len(a), dtype=np.intp)
    s = a[sorter]
    obs = np.r_[True, s[1:] != s[:-1]]
    dense = obs.cumsum()[inv]
    count = np.r_[np.nonzero(obs)[0], len(obs)]
    return 0.5 * (count[dense] + count[dense - 1] + 1)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    xm, ym = x - x.mean(), y - y.mean()
    den = np.sqrt((xm * xm).sum() * (ym * ym).sum())
    if den == 0:
        return float("nan")
    return float(np.clip((xm * ym).sum() / den, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    return pearson(rankdata(x), rankdata(y))


def mae(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(x - y).mean()) if len(x) else float("nan")


def exact(x: np.ndarray, y: np.ndarray) -> float:
    return float((x == y).mean()) if len(x) else float("nan")


def within_one(x: np.ndarray, y: np.ndarray) -> float:
    return float((np.abs(x - y) <= 1).mean()) if len(x) else float("nan")


def accuracy(c: np.ndarray, r: np.ndarray) -> float:
    return float((c > r).mean()) if len(c) else float("nan")


def _num(v: float) -> float | None:
    return None if v is None or v != v else float(v)


def figures(x: np.ndarray, y: np.ndarray, stats: dict[str, Stat], *, bootstrap: int,
            seed: int, confidence: float) -> dict[str, dict]:
    """Each statistic on (x, y) with its bootstrap percentile interval.

    The same `seed` gives the same resamples for every call, so an interval does not depend
    on which other figures were asked for. A resample where a statistic is undefined (e.g. a
    constant column for a correlation) is left out of that statistic's interval.
    """
    out = {name: {"value": _num(fn(x, y)), "low": None, "high": None}
           for name, fn in stats.items()}
    n = len(x)
    if bootstrap <= 0 or n < 2:
        return out
    rng = np.random.default_rng(seed)
    draws = {name: np.empty(bootstrap) for name in stats}
    for b in range(bootstrap):
        idx = rng.integers(0, n, size=n)
        xb, yb = x[idx], y[idx]
        for name, fn in stats.items():
            draws[name][b] = fn(xb, yb)
    alpha = (1 - confidence) / 2
    for name, d in draws.items():
        d = d[~np.isnan(d)]
        if len(d) and out[name]["value"] is not None:
            out[name]["low"] = float(np.quantile(d, alpha))
            out[name]["high"] = float(np.quantile(d, 1 - alpha))
    return out


# ----------------------------------------------------------------------------- inputs


def numeric_labels(col: pa.ChunkedArray, name: str, *, levels: bool = False) -> np.ndarray:
    """A column as float64 (null -> NaN); text that is not a number (nor, for levels, a level
    label) is a UsageError naming the column and a bad value."""
    t = col.type
    if is_number(t) or pa.types.is_boolean(t):
        return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(float)
    if pa.types.is_null(t):
        return np.full(len(col), np.nan)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        out = np.full(len(col), np.nan)
        bad = []
        for i, v in enumerate(col.to_pylist()):
            if v is None or not v.strip():
                continue
            key = v.strip().lower()
            if levels and key in LEVELS:
                out[i] = LEVELS[key]
                continue
            try:
                out[i] = float(key)
            except ValueError:
                bad.append(v)
        if bad:
            raise UsageError(f"column {name}: {len(bad):,} values are not numbers (e.g. "
                             f"{bad[0]!r}); human labels must be numeric"
                             + (" or a level label (not ... perfectly)" if levels else ""))
        return out
    raise UsageError(f"column {name} is {t}, not numeric labels")


def _pair_spec(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise UsageError(f"--pair {text!r}: write MODEL_COLUMN=HUMAN_COLUMN, "
                         "e.g. rm_helpfulness=helpfulness")
    m, h = (s.strip() for s in text.split("=", 1))
    if not m or not h:
        raise UsageError(f"--pair {text!r}: write MODEL_COLUMN=HUMAN_COLUMN")
    return m, h


def _both(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    ok = ~(np.isnan(x) | np.isnan(y))
    return x[ok], y[ok], int((~ok).sum())


# ----------------------------------------------------------------------------- evaluate


def evaluate(inputs, *, human: list[str] | str | None = None,
             pair: list[str] | str | None = None, human_level: str | None = None,
             chosen: str = "chosen", rejected: str = "rejected", subset: str | None = None,
             score: str | None = None, prefix: str = "", bootstrap: int = 1000, seed: int = 0,
             confidence: float = 0.95) -> dict:
    """`nfb eval` as one call: the dict `--json` prints.

    - `human`: human label columns whose model column is `prefix + name` (HelpSteer data
      scored with `--prefix rm_`: `human=["helpfulness", ...], prefix="rm_"`).
    - `pair`: "MODEL_COLUMN=HUMAN_COLUMN" strings, for any other naming.
    - `human_level`: a human level column (1-5 or labels) against `feedback_level`.
    - Pairwise accuracy runs when `prefix + chosen + "_" + score` and the rejected one exist
      (`score`: reward by default, else the mean level, else the level); `subset` adds one
      accuracy per value of that column.
    """
    human = [human] if isinstance(human, str) else list(human or [])
    pair = [pair] if isinstance(pair, str) else list(pair or [])
    if bootstrap < 0:
        raise UsageError("--bootstrap must be >= 0 (0: no intervals)")
    if not 0 < confidence < 1:
        raise UsageError("--confidence must be between 0 and 1, e.g. 0.95")
    files = resolve(inputs)
    schema = unified_schema(files)
    names = schema.names

    def need(col: str, what: str) -> str:
        if col not in names:
            hint = " (use --prefix if the scoring run had one)" if not prefix and \
                what == "model" else ""
            raise UsageError(f"no column {col} ({what}) in the input{hint}; columns: "
                             f"{', '.join(names)}")
        return col

    attrs: list[tuple[str, str]] = []
    for h in human:
        m = prefix + h
        if m == h:
            raise UsageError(f"--human {h}: the model's column would be {h} itself; pass the "
                             "--prefix of the scoring run (e.g. --prefix rm_), or --pair "
                             "MODEL_COLUMN=HUMAN_COLUMN")
        attrs.append((need(m, "model"), need(h, "human")))
    for p in pair:
        m, h = _pair_spec(p)
        attrs.append((need(m, "model"), need(h, "human")))
    level_pair = None
    if human_level:
        lvl = prefix + "feedback_level"
        if lvl not in names and prefix + "feedback_level_mean" in names:
            lvl = prefix + "feedback_level_mean"
        level_pair = (need(lvl, "model"), need(human_level, "human"))
    pw = None
    cands = [score] if score else list(SCORE_AUTO)
    for s in cands:
        c, r = f"{prefix}{chosen}_{s}", f"{prefix}{rejected}_{s}"
        if c in names and r in names:
            pw = (c, r, s)
            break
    if subset is not None:
        need(subset, "subset")
        if pw is None:
            raise UsageError(f"--subset {subset}: there are no chosen/rejected scores "
                             f"({prefix}{chosen}_{cands[0]}, {prefix}{rejected}_{cands[0]})")
    if not attrs and level_pair is None and pw is None:
        raise UsageError("nothing to evaluate: pass --human COLUMN (with the scoring run's "
                         "--prefix), --pair MODEL=HUMAN or --human-level COLUMN, or score "
                         f"chosen/rejected fields ({prefix}{chosen}_reward, "
                         f"{prefix}{rejected}_reward)")
    cols = [c for mh in attrs for c in mh] + list(level_pair or []) + \
        ([pw[0], pw[1]] if pw else []) + ([subset] if subset else [])
    model_cols = [m for m, _ in attrs] + ([level_pair[0]] if level_pair else []) + \
        (list(pw[:2]) if pw else [])
    for c in model_cols:
        if not is_number(schema.field(c).type):
            raise UsageError(f"column {c} is {schema.field(c).type}, not a model score")
    table = load(files, cols, schema)
    kw = {"bootstrap": int(bootstrap), "seed": int(seed), "confidence": float(confidence)}
    out: dict = {"files": files, "rows": len(table), "bootstrap": int(bootstrap),
                 "seed": int(seed), "confidence": float(confidence),
                 "attributes": [], "levels": [], "pairwise": None}
    for m, h in attrs:
        x = numeric_labels(table.column(m), m)
        y = numeric_labels(table.column(h), h)
        x, y, skipped = _both(x, y)
        out["attributes"].append({
            "model": m, "human": h, "n": len(x), "skipped": skipped,
            **figures(x, y, {"mae": mae, "pearson": pearson, "spearman": spearman}, **kw)})
    if level_pair:
        m, h = level_pair
        x = numeric_labels(table.column(m), m, levels=True)
        y = numeric_labels(table.column(h), h, levels=True)
        x, y, skipped = _both(x, y)
        out["levels"].append({
            "model": m, "human": h, "n": len(x), "skipped": skipped,
            **figures(x, y, {"exact": exact, "within_one": within_one, "mae": mae,
                             "spearman": spearman}, **kw)})
    if pw:
        c_all = numeric_labels(table.column(pw[0]), pw[0])
        r_all = numeric_labels(table.column(pw[1]), pw[1])
        ok = ~(np.isnan(c_all) | np.isnan(r_all))

        def acc(mask: np.ndarray) -> dict:
            c, r = c_all[mask & ok], r_all[mask & ok]
            return {"n": len(c), "skipped": int((mask & ~ok).sum()),
                    "ties": int((c == r).sum()),
                    **figures(c, r, {"accuracy": accuracy}, **kw)}

        everything = np.ones(len(table), dtype=bool)
        out["pairwise"] = {"chosen": pw[0], "rejected": pw[1], "score": pw[2],
                           **acc(everything), "subset": subset, "subsets": []}
        if subset:
            keys = table.column(subset).to_pylist()
            order = list(dict.fromkeys(keys))
            arr = np.array([order.index(k) for k in keys]) if keys else np.zeros(0, int)
            for i, k in enumerate(order):
                out["pairwise"]["subsets"].append({"subset": k, **acc(arr == i)})
    return out
