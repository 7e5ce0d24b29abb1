"""Progress on stderr: a rich bar on a terminal, a line every 30 s in a batch log, a summary."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from nfb.api import RunResult


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} rows/s" if speed else "- rows/s", style="cyan")


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class RichProgress:
    """The pipeline's Progress, drawn with rich (live on a terminal, periodic lines otherwise)."""

    def __init__(self, console: Console, enabled: bool = True, log_every: float = 30.0):
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.log_every = log_every
        self._bar: Progress | None = None
        self._task = None
        self._total: int | None = None
        self._done = 0
        self._start_done = 0
        self._t0 = 0.0
        self._last_log = 0.0

    def start(self, total: int | None, done: int) -> None:
        self._total, self._done, self._start_done = total, done, done
        self._t0 = self._last_log = time.monotonic()
        if not self.enabled:
            return
        if done:
            self.console.print(f"{done:,} rows already done")
        if self.live:
            self._bar = Progress(
                SpinnerColumn(), TextColumn("[bold]scoring"), BarColumn(),
                MofNCompleteColumn(), TextColumn("rows"), RateColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False, refresh_per_second=4)
            self._bar.start()
            self._task = self._bar.add_task("rows", total=total, completed=done)

    def set_total(self, total: int) -> None:
        self._total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, rows: int) -> None:
        self._done += rows
        if self._bar is not None:
            self._bar.update(self._task, advance=rows)
        elif self.enabled:
            now = time.monotonic()
            if now - self._last_log >= self.log_every:
                self._last_log = now
                self.console.print(self._line(now))

    def _line(self, now: float) -> str:
        rate = (self._done - self._start_done) / max(now - self._t0, 1e-9)
        eta = (self._total - self._done) / rate if self._total is not None and rate else None
        total = f"/{self._total:,}" if self._total is not None else ""
        return f"{self._done:,}{total} rows, {rate:,.1f} rows/s, eta {_fmt_eta(eta)}"

    def note(self, message: str) -> None:
        """A line above the bar (e.g. an engine restart)."""
        if self.enabled:
            self.console.print(f"[yellow]{message}[/]")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def print_summary(console: Console, result: RunResult, task: str) -> None:
    if result.already_done:
        console.print(f"[green]{result.output} is already complete[/] ({result.rows:,} rows); "
                      "nothing to do (--overwrite to run again)", soft_wrap=True)
    console.print(f"nfb {task}: {result.output}", soft_wrap=True, style="bold")
    t = Table(show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    t.add_row("rows in output", f"{result.rows:,}")
    if not result.already_done:
        t.add_row("rows this run", f"{result.new_rows:,}")
        if result.resumed_rows:
            t.add_row("rows from checkpoint", f"{result.resumed_rows:,}")
        work = result.seconds - result.load_seconds
        rate = result.new_rows / work if work > 0 else 0.0
        t.add_row("model load", f"{result.load_seconds:,.1f} s")
        if result.data_parallel > 1 and result.cluster is None:
            t.add_row("engine replicas (-dp)", f"{result.data_parallel}")
        if result.cluster is not None:   # --engine ray
            c = result.cluster
            t.add_row("engine replicas (Ray)", f"{c.get('replicas', 0)}")
            t.add_row("engine loads", f"{c.get('engine_loads', 0)}")
            t.add_row("rows/s per replica", f"{c.get('rows_per_s_per_replica', 0.0):,.1f}")
        t.add_row("scoring", f"{work:,.1f} s ({rate:,.1f} rows/s)")
    t.add_row("rows with errors", f"{result.error_rows:,}")
    for code, n in result.errors.most_common():
        t.add_row(f"  {code}", f"{n:,}")
    for code, n in result.notes.most_common():
        t.add_row(f"rows noted {code}", f"{n:,}")
    if task == "judge":
        t.add_row("rows with no readable judgement", f"{result.unreadable:,}")
    if getattr(result, "truncated", None) is not None:
        t.add_row("rows shortened (--too-long)", f"{result.truncated:,}")
    console.print(t)
    judged = result.rows - result.error_rows
    if task == "judge" and judged and result.unreadable * 2 > judged:
        console.print(f"[yellow]warning:[/] {result.unreadable:,} of {judged:,} judged rows have "
                      "no readable judgement (see judge_error): is --max-tokens too low for the "
                      "reasoning, or is the model not a GenRM?")
    if task == "feedback" and (result.levels or result.rows):
        from nfb.api import FEEDBACK_LABELS as LABELS
        scored = result.rows - result.error_rows
        unparsed = scored - sum(result.levels.values())
        h = Table(title="feedback levels", title_justify="left")
        h.add_column("level")
        h.add_column("rows", justify="right")
        h.add_column("", justify="left")
        top = max([*result.levels.values(), unparsed, 1])
        for lv in range(1, 6):
            n = result.levels.get(lv, 0)
            h.add_row(f"{lv} {LABELS[lv]}", f"{n:,}", "█" * round(30 * n / top))
        h.add_row("unparsed", f"{unparsed:,}", "█" * round(30 * unparsed / top))
        console.print(h)


def print_plan(plan, as_json: bool) -> None:
    """`--dry-run`'s report on stdout: one JSON object, or tables."""
    import sys

    import orjson

    s = plan.summary()
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(s) + b"\n")
        sys.stdout.flush()
        return
    out = Console(soft_wrap=True)
    out.print(f"nfb {s['task']} --dry-run: {s['output']} (no engine started)", style="bold")
    t = Table(show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    tok = s["prompt_tokens"]
    t.add_row("rows", f"{s['rows']:,}")
    t.add_row("requests", f"{s['requests']:,}")
    if s["sequences"]:
        t.add_row("generated sequences", f"{s['sequences']:,} (at most {s['max_tokens']:,} "
                  "tokens each)")
    t.add_row("prompt tokens", f"{tok['total']:,}")
    if tok["mean"] is not None:
        t.add_row("  per request: mean / p50 / p99 / max",
                  f"{tok['mean']:,.1f} / {tok['p50']:,.0f} / {tok['p99']:,.0f} / {tok['max']:,}")
    t.add_row("prompt budget", f"{s['prompt_budget']:,} of {s['max_model_len']:,} tokens")
    t.add_row("rows with errors", f"{s['error_rows']:,}")
    for code, n in s["errors"].items():
        t.add_row(f"  {code}", f"{n:,}")
    if s.get("truncated") is not None:
        t.add_row("rows shortened (--too-long)", f"{s['truncated']:,}")
    t.add_row("this dry run", f"{s['seconds']:,.1f} s")
    out.print(t)
    est = s["estimate"]
    if not est["gpus_table"]:
        out.print("engine time: no estimate (the config gives no model size)")
        return
    p = est["params"]
    size = f"{p / 1e9:,.1f} B" if p >= 1e9 else f"{p / 1e6:,.1f} M"
    e = Table(title=f"engine time estimate ({size} parameters, {est['gpus']} GPU(s))",
              title_justify="left")
    for col in ("GPU", "rates", "prefill", "decode (at most)", "total (at most)"):
        e.add_column(col, justify="left" if col in ("GPU", "rates") else "right")
    for r in est["gpus_table"]:
        e.add_row(r["gpu"], r["source"], _dur(r["prefill_s"]), _dur(r["decode_s_at_most"]),
                  _dur(r["engine_s_at_most"]))
    out.print(e)
    out.print(f"[dim]{est['assumptions']}[/]")


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"
