"""`nfb report`: one self-contained HTML page of plots of a scored file.

The page needs no network and runs no script: every chart is inline SVG drawn here, the
style sheet is inline, and every text from the data (prompts, error reasons, column names)
is HTML-escaped. Charts (each a `<figure class="chart" data-chart=ID>`):

- `dist-COLUMN`: the distribution of the reward and of each attribute (list columns of
  several responses per row are flattened);
- `levels`: the histogram of feedback levels, with the rows where no level was parsed;
- `length-COLUMN`: the score against the response's length in characters, with Pearson and
  Spearman correlations over every response (length bias);
- `correlations`: the Pearson correlations between the attributes;
- `errors`: the rows with an `nfb_error`, by reason;
and a provenance table (model, weights, prompt, settings) from the file's metadata.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nfb.errors import InputError, UsageError
from nfb.tasks.feedback import LABELS
from nfb.verbs.evaluate import pearson, spearman
from nfb.verbs.scored import (
    detect_shape,
    is_number,
    is_number_list,
    resolve,
    score_candidates,
    unified_schema,
)

MAX_POINTS = 3000       # points drawn per scatter (a fixed-seed sample); statistics use all
MAX_MATRIX = 16         # columns in the correlation matrix
W, H = 560, 300         # chart size (px)
ML, MR, MT, MB = 56, 16, 16, 44

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:24px;
color:#1f2328;background:#fff;max-width:1240px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;
padding-bottom:4px}.sub{color:#57606a;font-size:13px}
.grid{display:flex;flex-wrap:wrap;gap:16px}
figure.chart{margin:0;border:1px solid #d0d7de;border-radius:6px;padding:8px;background:#fff}
figcaption{font-size:13px;font-weight:600;margin-bottom:4px}
.note{font-size:12px;color:#57606a;margin-top:4px;max-width:560px}
svg text{font-size:11px;fill:#1f2328}svg .axis{stroke:#8c959f;stroke-width:1}
svg .bar{fill:#4c78a8}svg .bar.err{fill:#e45756}svg .dot{fill:#4c78a8;fill-opacity:.45}
table.kv{border-collapse:collapse;font-size:13px}
table.kv td{border:1px solid #d0d7de;padding:4px 8px;
vertical-align:top}table.kv td:first-child{font-weight:600;white-space:nowrap}
pre{white-space:pre-wrap;word-break:break-word;font-size:12px;margin:0;max-width:900px}
"""


# ----------------------------------------------------------------------------- SVG


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _g(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    a = abs(v)
    return f"{v:.3g}" if a < 1e4 else f"{v:,.0f}"


def _svg(body: str, w: int = W, h: int = H, label: str = "") -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{_e(label)}">{body}</svg>')


def _empty(text: str, w: int = W, h: int = 80) -> str:
    return _svg(f'<text class="empty" x="{w / 2}" y="{h / 2}" text-anchor="middle">'
                f'{_e(text)}</text>', w, h, text)


def _axes(x0: float, x1: float, y0: float, y1: float, xlabel: str, ylabel: str,
          xticks: list[tuple[float, str]] | None = None) -> str:
    pw, ph = W - ML - MR, H - MT - MB

    def sx(v):
        return ML + (v - x0) / ((x1 - x0) or 1) * pw

    def sy(v):
        return MT + ph - (v - y0) / ((y1 - y0) or 1) * ph

    out = [f'<line class="axis" x1="{ML}" y1="{MT + ph}" x2="{ML + pw}" y2="{MT + ph}"/>',
           f'<line class="axis" x1="{ML}" y1="{MT}" x2="{ML}" y2="{MT + ph}"/>']
    ticks = xticks if xticks is not None else [(x0 + (x1 - x0) * i / 4, None) for i in range(5)]
    for v, lab in ticks:
        out.append(f'<text x="{sx(v):.1f}" y="{MT + ph + 14}" text-anchor="middle">'
                   f'{_e(lab if lab is not None else _g(v))}</text>')
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{ML - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{_g(v)}</text>')
    out.append(f'<text x="{ML + pw / 2}" y="{H - 8}" text-anchor="middle">{_e(xlabel)}</text>')
    out.append(f'<text x="14" y="{MT + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {MT + ph / 2})">{_e(ylabel)}</text>')
    return "".join(out)


def _bin_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    """`bins` finite, increasing bin edges over [lo, hi]: one value, values a few ulps apart
    (numpy: "Too many bins") and a span past the largest float all get a usable range."""
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    with np.errstate(all="ignore"):
        edges = np.linspace(lo / 2, hi / 2, bins + 1) * 2   # no overflow of hi - lo
        if not (np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0)):
            pad = max(abs(lo), abs(hi), 1.0) * 1e-6
            edges = np.linspace(lo - pad, hi + pad, bins + 1)
    edges[0], edges[-1] = min(edges[0], lo), max(edges[-1], hi)
    return edges


def histogram_svg(values: np.ndarray, label: str, bins: int = 20) -> str:
    v = values[np.isfinite(values)]
    if not len(v):
        return _empty(f"no values of {label}")
    lo, hi = float(v.min()), float(v.max())
    edges = _bin_edges(lo, hi, bins)
    lo, hi = float(edges[0]), float(edges[-1])
    counts, _ = np.histogram(v, bins=edges)
    top = max(int(counts.max()), 1)
    pw, ph = W - ML - MR, H - MT - MB
    bw = pw / bins
    bars = []
    for i, c in enumerate(counts):
        h = c / top * ph
        bars.append(f'<rect class="bar" x="{ML + i * bw + 1:.1f}" y="{MT + ph - h:.1f}" '
                    f'width="{max(bw - 2, 1):.1f}" height="{h:.1f}"><title>'
                    f'[{_g(edges[i])}, {_g(edges[i + 1])}): {int(c):,}</title></rect>')
    return _svg(_axes(lo, hi, 0, top, label, "responses") + "".join(bars), label=label)


def bars_svg(items: list[tuple[str, int]], xlabel: str, ylabel: str, cls: str = "bar") -> str:
    if not items:
        return _empty("nothing to show")
    top = max(max(c for _, c in items), 1)
    n = len(items)
    pw, ph = W - ML - MR, H - MT - MB
    bw = pw / n
    out = []
    for i, (lab, c) in enumerate(items):
        h = c / top * ph
        out.append(f'<rect class="{cls}" x="{ML + i * bw + 4:.1f}" y="{MT + ph - h:.1f}" '
                   f'width="{max(bw - 8, 1):.1f}" height="{h:.1f}"><title>{_e(lab)}: {c:,}'
                   f'</title></rect>')
        out.append(f'<text x="{ML + (i + .5) * bw:.1f}" y="{MT + ph - h - 4:.1f}" '
                   f'text-anchor="middle">{c:,}</text>')
    ticks = [(i + .5, lab) for i, (lab, _) in enumerate(items)]
    return _svg(_axes(0, n, 0, top, xlabel, ylabel, ticks) + "".join(out), label=xlabel)


def hbars_svg(items: list[tuple[str, int]], label: str) -> str:
    """Horizontal bars (long labels such as error reasons)."""
    row = 24
    h = MT + row * len(items) + 12
    left = 260
    top = max(max(c for _, c in items), 1)
    out = []
    for i, (lab, c) in enumerate(items):
        y = MT + i * row
        w = c / top * (W - left - 70)
        short = lab if len(lab) <= 40 else lab[:39] + "…"
        out.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{_e(short)}</text>'
                   f'<rect class="bar err" x="{left}" y="{y + 3}" width="{max(w, 1):.1f}" '
                   f'height="{row - 6}"><title>{_e(lab)}: {c:,}</title></rect>'
                   f'<text x="{left + w + 6:.1f}" y="{y + 15}">{c:,}</text>')
    return _svg("".join(out), W, h, label)


def scatter_svg(x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str) -> str:
    if not len(x):
        return _empty("no scored responses")
    if len(x) > MAX_POINTS:
        idx = np.sort(np.random.default_rng(0).choice(len(x), MAX_POINTS, replace=False))
        x, y = x[idx], y[idx]
    x0, x1 = float(x.min()), float(x.max())
    y0, y1 = float(y.min()), float(y.max())
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if y0 == y1:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pw, ph = W - ML - MR, H - MT - MB
    sx = ML + (x - x0) / (x1 - x0) * pw
    sy = MT + ph - (y - y0) / (y1 - y0) * ph
    dots = "".join(f'<circle class="dot" cx="{a:.1f}" cy="{b:.1f}" r="2.5"/>'
                   for a, b in zip(sx, sy))
    return _svg(_axes(x0, x1, y0, y1, xlabel, ylabel) + dots, label=f"{ylabel} vs {xlabel}")


def _color(r: float) -> str:
    if r is None or not math.isfinite(r):
        return "#eeeeee"
    t = max(-1.0, min(1.0, r))
    if t >= 0:   # white -> blue
        c = (int(255 - 179 * t), int(255 - 135 * t), int(255 - 87 * t))
    else:        # white -> red
        t = -t
        c = (int(255 - 27 * t), int(255 - 168 * t), int(255 - 169 * t))
    return "#%02x%02x%02x" % c


def matrix_svg(names: list[str], m: np.ndarray) -> str:
    n = len(names)
    cell = max(28, min(56, 420 // max(n, 1)))
    left, top = 150, 16
    w, h = left + n * cell + 16, top + n * cell + 100
    out = []
    for i in range(n):
        out.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4}" '
                   f'text-anchor="end">{_e(names[i])}</text>')
        x = left + i * cell + cell / 2
        y = top + n * cell + 8
        out.append(f'<text x="{x}" y="{y}" text-anchor="end" '
                   f'transform="rotate(-60 {x} {y})">{_e(names[i])}</text>')
        for j in range(n):
            r = m[i, j]
            out.append(f'<rect class="cell" x="{left + j * cell}" y="{top + i * cell}" '
                       f'width="{cell - 1}" height="{cell - 1}" fill="{_color(r)}"><title>'
                       f'{_e(names[i])} / {_e(names[j])}: {_g(r)}</title></rect>')
            if cell >= 32:
                out.append(f'<text x="{left + j * cell + cell / 2}" '
                           f'y="{top + i * cell + cell / 2 + 4}" text-anchor="middle">'
                           f'{"-" if not math.isfinite(r) else f"{r:.2f}"}</text>')
    return _svg("".join(out), w, h, "correlations between attributes")


# ----------------------------------------------------------------------------- data


def _flat(col: pa.ChunkedArray) -> np.ndarray:
    if is_number_list(col.type):
        col = pc.list_flatten(col)
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(float)


def _lengths(col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        col = pc.list_flatten(col)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    return pc.utf8_length(col).to_numpy(zero_copy_only=False).astype(float)


def _score_columns(schema: pa.Schema, meta: dict, prefix: str) -> list[str]:
    """Numeric (or list-of-numeric) columns nfb added: the reward, attributes, mean level."""
    cands = score_candidates(schema.names, meta, prefix)
    skip = {prefix + "nfb_row", prefix + "feedback_level", prefix + "feedback_levels"}
    return [c for c in cands if c not in skip and not c.endswith("feedback_level")
            and (is_number(schema.field(c).type) or is_number_list(schema.field(c).type))]


def collect(files: list[str], prefix: str = "") -> dict:
    """Everything the page shows, read in one streamed pass over the files."""
    from nfb.verbs.scored import iter_tables, metadata

    schema = unified_schema(files)
    names = schema.names
    meta = metadata(files[0]) if files else {}
    err_col, lvl_col = prefix + "nfb_error", prefix + "feedback_level"
    numeric = _score_columns(schema, meta, prefix)
    try:
        shape = detect_shape(schema, prefix=prefix)
        if shape.kind == "row" and shape.responses[0] not in names:
            shape = None
    except UsageError:
        shape = None
    length_pairs = list(zip(shape.responses, shape.scores)) if shape else []
    want = list(dict.fromkeys([err_col, lvl_col, *numeric,
                               *[c for pr in length_pairs for c in pr]]))
    want = [c for c in want if c in names]
    rows = 0
    errors: Counter = Counter()
    levels: Counter = Counter()
    unparsed = 0
    values: dict[str, list[np.ndarray]] = {c: [] for c in numeric}
    lens: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for _, s in length_pairs}
    for f in files:
        for t in iter_tables(f, columns=want):
            rows += len(t)
            errs = t.column(err_col).to_pylist() if err_col in t.column_names else \
                [None] * len(t)
            errors.update(e.split(":", 1)[0] for e in errs if e is not None)
            if lvl_col in t.column_names:
                for e, lv in zip(errs, t.column(lvl_col).to_pylist()):
                    if lv is not None:
                        levels[int(lv)] += 1
                    elif e is None:
                        unparsed += 1
            for c in numeric:
                if c in t.column_names:
                    values[c].append(_flat(t.column(c)))
            for r, s in length_pairs:
                if r in t.column_names and s in t.column_names:
                    ln, sc = _lengths(t.column(r)), _flat(t.column(s))
                    if len(ln) == len(sc):
                        lens[s].append((ln, sc))
    vals = {c: np.concatenate(v) if v else np.zeros(0) for c, v in values.items()}
    length = {}
    for (r, s) in length_pairs:
        ln = np.concatenate([a for a, _ in lens[s]]) if lens[s] else np.zeros(0)
        sc = np.concatenate([b for _, b in lens[s]]) if lens[s] else np.zeros(0)
        ok = np.isfinite(ln) & np.isfinite(sc)
        length[s] = (r, ln[ok], sc[ok])
    # correlations between row-level attributes (list columns are not per row)
    flat_cols = [c for c in numeric if is_number(schema.field(c).type)][:MAX_MATRIX]
    m = np.full((len(flat_cols), len(flat_cols)), np.nan)
    for i, a in enumerate(flat_cols):
        for j, b in enumerate(flat_cols):
            x, y = vals[a], vals[b]
            if len(x) != len(y):
                continue
            ok = np.isfinite(x) & np.isfinite(y)
            m[i, j] = pearson(x[ok], y[ok])
    return {"files": files, "meta": meta, "rows": rows, "errors": errors, "levels": levels,
            "unparsed": unparsed, "has_levels": lvl_col in names, "values": vals,
            "length": length, "matrix": (flat_cols, m), "shape": shape}


# ----------------------------------------------------------------------------- page


def _figure(chart_id: str, title: str, svg: str, note: str = "") -> str:
    n = f'<div class="note">{_e(note)}</div>' if note else ""
    return (f'<figure class="chart" id="chart-{_e(chart_id)}" data-chart="{_e(chart_id)}">'
            f'<figcaption>{_e(title)}</figcaption>{svg}{n}</figure>')


def _provenance(meta: dict) -> str:
    if not meta:
        return '<p class="sub" id="provenance-missing">The input carries no nfb provenance ' \
               '(footer key <code>nfb</code>).</p>'
    ts = meta.get("task_settings") or {}
    rows = [("model", meta.get("model")), ("revision", meta.get("revision")),
            ("task", meta.get("task")), ("nfb version", meta.get("nfb_version")),
            ("attributes", ts.get("attributes") or meta.get("attributes")),
            ("weights", ts.get("weights") or meta.get("weights")),
            ("reward token", meta.get("reward_token")),
            ("sampling", meta.get("sampling") or ts.get("sampling")),
            ("engine", meta.get("engine")), ("inputs", meta.get("inputs")),
            ("started", meta.get("started")), ("finished", meta.get("finished"))]
    for k in ("filter", "pairs"):
        if k in meta:
            rows.append((k, meta[k]))
    prompt = meta.get("prompt") or ts.get("prompt")
    if prompt is not None:
        rows.append(("prompt", prompt))
    cells = []
    for k, v in rows:
        if v is None or v == {} or v == []:
            continue
        text = v if isinstance(v, str) else json.dumps(v, indent=1, default=str)
        cells.append(f"<tr><td>{_e(k)}</td><td><pre>{_e(text)}</pre></td></tr>")
    full = json.dumps(meta, indent=1, default=str)
    return (f'<table class="kv" id="provenance">{"".join(cells)}</table>'
            f'<details><summary class="sub">all metadata (JSON)</summary>'
            f'<pre>{_e(full)}</pre></details>')


def render(data: dict, title: str | None = None) -> str:
    meta = data["meta"]
    rows, errs = data["rows"], sum(data["errors"].values())
    title = title or "nfb report: " + ", ".join(Path(f).name for f in data["files"])
    parts = [f"<h1>{_e(title)}</h1>",
             f'<div class="sub">{rows:,} rows, {errs:,} with errors'
             + (f"; model {_e(meta.get('model'))}" if meta.get("model") else "")
             + (f"; {_e(data['shape'].describe())}" if data["shape"] else "") + "</div>"]
    dist = []
    for c, v in data["values"].items():
        fin = v[np.isfinite(v)]
        note = (f"{len(fin):,} values, mean {_g(fin.mean())}, median {_g(np.median(fin))}"
                if len(fin) else "no values")
        dist.append(_figure(f"dist-{c}", f"distribution of {c}", histogram_svg(v, c), note))
    parts.append("<h2>Scores</h2>")
    parts.append('<div class="grid">' + "".join(dist) + "</div>" if dist else
                 '<p class="sub">No reward or attribute columns.</p>')
    if data["has_levels"]:
        lv = [(f"{k} {LABELS[k]}", data["levels"].get(k, 0)) for k in range(1, 6)]
        lv.append(("unparsed", data["unparsed"]))
        parsed = sum(data["levels"].values())
        mean = sum(k * n for k, n in data["levels"].items()) / parsed if parsed else None
        parts.append("<h2>Feedback levels</h2>")
        parts.append(_figure("levels", "feedback level histogram",
                             bars_svg(lv, "level", "rows"),
                             f"{parsed:,} rows with a level, mean {_g(mean)}; error rows "
                             "are not counted"))
    if data["length"]:
        figs = []
        for s, (r, ln, sc) in data["length"].items():
            pr, sr = pearson(ln, sc), spearman(ln, sc)
            note = (f"Pearson r = {_g(pr)}, Spearman ρ = {_g(sr)} over {len(ln):,} responses"
                    + (f" ({MAX_POINTS:,} drawn)" if len(ln) > MAX_POINTS else "")
                    + ". A strong positive correlation is a length bias.")
            figs.append(_figure(f"length-{s}", f"{s} against the length of {r}",
                                scatter_svg(ln, sc, f"length of {r} (characters)", s), note))
        parts.append("<h2>Length bias</h2>")
        parts.append('<div class="grid">' + "".join(figs) + "</div>")
    names, m = data["matrix"]
    if len(names) >= 2:
        parts.append("<h2>Correlations between attributes</h2>")
        parts.append(_figure("correlations", "Pearson correlation", matrix_svg(names, m),
                             "blue: positive, red: negative"))
    parts.append("<h2>Errors</h2>")
    if data["errors"]:
        items = data["errors"].most_common()
        parts.append(_figure("errors", "rows with an nfb_error, by reason",
                             hbars_svg(items, "errors by reason"),
                             f"{errs:,} of {rows:,} rows ({100 * errs / max(rows, 1):.1f}%)"))
    else:
        parts.append(_figure("errors", "rows with an nfb_error, by reason",
                             _empty(f"no error rows (0 of {rows:,})")))
    parts.append("<h2>Provenance</h2>")
    parts.append(_provenance(meta))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'; img-src data:\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def chart_ids(data: dict) -> list[str]:
    """The data-chart ids the page holds (for tests and scripts)."""
    ids = [f"dist-{c}" for c in data["values"]]
    if data["has_levels"]:
        ids.append("levels")
    ids += [f"length-{s}" for s in data["length"]]
    if len(data["matrix"][0]) >= 2:
        ids.append("correlations")
    return ids + ["errors"]


def report(inputs, output: str, *, prefix: str = "", title: str | None = None) -> str:
    """`nfb report` as one call: write the HTML page for `inputs` to `output`; returns its
    path."""
    out = Path(str(output))
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"{output}: the report is an HTML file; name it .html")
    from nfb.io.outputs import check_not_input, guarded, temp_path

    files = resolve(inputs, exclude=str(output))
    check_not_input(str(output), files)
    page = render(collect(files, prefix), title)
    with guarded(str(output), files):   # one writer; a failed write is one line
        tmp = temp_path(out)
        try:
            tmp.write_text(page, encoding="utf-8")
            tmp.replace(out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise InputError(f"{output}: cannot write ({e.strerror or e})") from None
    return str(out)
