"""What the CLI prints of a verb's result: rich tables of `nfb stats` and `nfb eval`, the
summary lines of `nfb pairs`. The verbs return data (`nfb.api`); the printing is here."""

from __future__ import annotations

from nfb.api import STATS_QUANTILES


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
    cols = ["count", "mean", *STATS_QUANTILES]

    def fmt(q: dict, c: str) -> str:
        return "-" if q.get(c) is None else f"{q[c]:,}" if c == "count" else f"{q[c]:.3f}"

    if s["quantiles"]:
        qt = Table(title="quantiles", title_justify="left")
        qt.add_column("column")
        for c in cols:
            qt.add_column(c, justify="right")
        for name, q in s["quantiles"].items():
            qt.add_row(name, *[fmt(q, c) for c in cols])
        console.print(qt)
    if "groups" in s:
        gt = Table(title=f"by {s['group_by']}", title_justify="left")
        gt.add_column(s["group_by"])
        gt.add_column("rows", justify="right")
        gt.add_column("errors", justify="right")
        if any("level_mean" in g for g in s["groups"]):
            gt.add_column("level mean", justify="right")
        shown = list(s["quantiles"])[:4]
        for c in shown:
            gt.add_column(f"{c} mean", justify="right")
            gt.add_column(f"{c} p50", justify="right")
        for g in s["groups"]:
            cells = [str(g["group"]), f"{g['rows']:,}", f"{g['error_rows']:,}"]
            if "level_mean" in g:
                cells.append("-" if g["level_mean"] is None else f"{g['level_mean']:.2f}")
            for c in shown:
                q = g["quantiles"].get(c, {})
                cells += [fmt(q, "mean"), fmt(q, "p50")]
            gt.add_row(*cells)
        console.print(gt)


def _fmt(f: dict | None, pct: bool = False) -> str:
    if not f or f.get("value") is None:
        return "-"
    v = f["value"] * (100 if pct else 1)
    s = f"{v:.1f}%" if pct else f"{v:.3f}"
    if f.get("low") is not None:
        lo, hi = f["low"] * (100 if pct else 1), f["high"] * (100 if pct else 1)
        s += f" [{lo:.1f}, {hi:.1f}]" if pct else f" [{lo:.3f}, {hi:.3f}]"
    return s


def print_eval(console, d: dict) -> None:
    """Rich tables of an evaluate() result (figure [low, high] of the bootstrap interval)."""
    from rich.table import Table

    ci = f"{d['confidence'] * 100:g}% interval, {d['bootstrap']:,} resamples, seed {d['seed']}" \
        if d["bootstrap"] else "no intervals (--bootstrap 0)"
    console.print(f"[bold]nfb eval[/]: {', '.join(d['files'])}: {d['rows']:,} rows ({ci})")
    if d["attributes"]:
        t = Table(title="agreement with human labels", title_justify="left")
        for c in ("model", "human", "n", "skipped", "MAE", "Pearson", "Spearman"):
            t.add_column(c, justify="left" if c in ("model", "human") else "right")
        for a in d["attributes"]:
            t.add_row(a["model"], a["human"], f"{a['n']:,}", f"{a['skipped']:,}",
                      _fmt(a["mae"]), _fmt(a["pearson"]), _fmt(a["spearman"]))
        console.print(t)
    if d["levels"]:
        t = Table(title="feedback level against human level", title_justify="left")
        for c in ("model", "human", "n", "skipped", "exact", "within 1", "MAE", "Spearman"):
            t.add_column(c, justify="left" if c in ("model", "human") else "right")
        for a in d["levels"]:
            t.add_row(a["model"], a["human"], f"{a['n']:,}", f"{a['skipped']:,}",
                      _fmt(a["exact"], True), _fmt(a["within_one"], True), _fmt(a["mae"]),
                      _fmt(a["spearman"]))
        console.print(t)
    p = d["pairwise"]
    if p:
        t = Table(title=f"pairwise accuracy: {p['chosen']} > {p['rejected']} (a tie is wrong)",
                  title_justify="left")
        for c in ("subset", "pairs", "ties", "skipped", "accuracy"):
            t.add_column(c, justify="left" if c == "subset" else "right")
        for s in p["subsets"]:
            t.add_row(str(s["subset"]), f"{s['n']:,}", f"{s['ties']:,}", f"{s['skipped']:,}",
                      _fmt(s["accuracy"], True))
        t.add_row("[bold]all[/]", f"{p['n']:,}", f"{p['ties']:,}", f"{p['skipped']:,}",
                  _fmt(p["accuracy"], True))
        console.print(t)


def pairs_summary(res) -> list[str]:
    """The summary `nfb pairs` prints on stderr."""
    lines = [f"{res.pairs:,} pairs from {res.groups_with_pairs:,} of {res.groups:,} groups "
             f"({res.rows:,} rows, {res.responses:,} responses, score {res.score}) -> "
             f"{res.output}"]
    dropped = [
        (res.ties, "tied pairs dropped (equal scores)"),
        (res.below_margin, "pairs below --min-margin dropped"),
        (res.over_per_group, "pairs beyond --per-group dropped"),
        (res.null_scores, "responses without a score skipped"
         + (f" ({res.error_rows:,} error rows)" if res.error_rows else "")),
        (res.small_groups, "groups with fewer than two scored responses skipped"),
        (res.null_groups, "responses with a null group key skipped"),
        (res.misaligned_rows, "rows whose responses and scores lists differ in length skipped"),
    ]
    lines += [f"  {n:,} {what}" for n, what in dropped if n]
    return lines
