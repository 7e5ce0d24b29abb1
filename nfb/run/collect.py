"""The ordered collector: holds chunks until all their rows are finished, then emits them in
input order, counting errors, notes and the task's own tallies as rows are written."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from nfb.tasks.base import Task

ROW, ERROR, TRUNCATED = "nfb_row", "nfb_error", "nfb_truncated"

@dataclass
class RunResult:
    output: str
    rows: int = 0                     # rows in the output
    new_rows: int = 0                 # rows processed by this invocation
    resumed_rows: int = 0             # rows found done in the work directory
    errors: Counter = field(default_factory=Counter)   # error code -> rows
    # the task's tallies (`Task.counts`, `Task.tally`): count name -> value -> rows (a "rows"
    # count keeps its rows under the value None)
    counts: dict[str, Counter] = field(default_factory=dict)
    count_kinds: dict[str, str] = field(default_factory=lambda: dict(Task.counts))
    truncated: int | None = None      # rows shortened by --too-long (None: the policy is error)
    # rows whose input the task changed on purpose, by note code (e.g. SteerLM's
    # system_turn_left_out): the task's `row_notes`, counted once per row written
    notes: Counter = field(default_factory=Counter)
    seconds: float = 0.0              # wall time of this invocation
    load_seconds: float = 0.0         # of which: starting the engine (loading the model)
    already_done: bool = False
    card: str | None = None           # the dataset card written beside the output (--card)
    data_parallel: int = 1            # engine replicas that ran (-dp)
    # --engine ray: replicas, engine loads, rows/s per replica (nfb.engines.ray)
    cluster: dict | None = None

    @property
    def error_rows(self) -> int:
        return sum(self.errors.values())

    @property
    def levels(self) -> Counter:
        """Feedback level -> rows (the `levels` count)."""
        return self.counts.setdefault("levels", Counter())

    @property
    def unreadable(self) -> int:
        """Rows with no readable judgement (the `unreadable` count)."""
        return sum(self.counts.get("unreadable", Counter()).values())

    def add(self, tallies) -> None:
        """Count one row's (count name, value) tallies."""
        for name, value in tallies:
            self.counts.setdefault(name, Counter())[value] += 1

    def summary(self) -> dict:
        counts = {}
        for name, kind in self.count_kinds.items():
            c = self.counts.get(name, Counter())
            counts[name] = sum(c.values()) if kind == "rows" else \
                {str(k): v for k, v in sorted(c.items())}
        return {"rows": self.rows, "error_rows": self.error_rows,
                "errors": dict(self.errors.most_common()), **counts,
                "notes": dict(self.notes.most_common()),
                "data_parallel": self.data_parallel} | (
                    {} if self.truncated is None else {"truncated": self.truncated}) | (
                    {} if self.cluster is None else {"cluster": dict(self.cluster)})

    @classmethod
    def from_summary(cls, output: str, s: dict, count_kinds: dict[str, str],
                     **kw) -> RunResult:
        """The result a finished output's summary records."""
        counts = {}
        for name, kind in count_kinds.items():
            if kind == "rows":
                counts[name] = Counter({None: s[name]} if s.get(name) else {})
            else:
                counts[name] = Counter({_value(k): v for k, v in (s.get(name) or {}).items()})
        return cls(output, rows=s.get("rows", 0), errors=Counter(s.get("errors", {})),
                   counts=counts, count_kinds=dict(count_kinds), truncated=s.get("truncated"),
                   notes=Counter(s.get("notes", {})), **kw)


def _value(key: str):
    """A counted value back from the summary's JSON key (levels are numbers)."""
    try:
        return int(key)
    except ValueError:
        return key


def error_code(reason: str) -> str:
    return reason.split(":", 1)[0]

# --- the ordered collector ------------------------------------------------------------------

class _Pending:
    """One chunk of rows on its way through the engine."""

    __slots__ = ("table", "rows", "errors", "values", "outputs", "remaining", "truncated",
                 "notes")

    def __init__(self, table: pa.Table, rows: np.ndarray):
        self.table = table
        self.rows = rows
        self.truncated: dict[int, int] = {}        # row in chunk -> prompt tokens removed
        self.errors: list[str | None] = [None] * len(rows)
        self.values: list[dict | None] = [None] * len(rows)
        self.outputs: list[list | None] = [None] * len(rows)   # per row: one per request
        self.remaining = len(rows)
        self.notes: dict[int, tuple[str, ...]] = {}            # row in chunk -> note codes


class Collector:
    """Holds chunks until all their rows are finished, then emits them in input order."""

    def __init__(self, task: Task, prefix: str, emit: Callable[[pa.Table], None],
                 result: RunResult, truncated_column: bool = False,
                 note: Callable[[str], None] | None = None):
        self.task = task
        self.note = note or (lambda _m: None)   # says each note code once, when first counted
        self.prefix = prefix
        self.truncated_column = truncated_column
        self.schema = task.schema("")
        self.emit = emit
        self.result = result
        self.queue: deque[_Pending] = deque()
        self.held = 0
        self.emitted: list[np.ndarray] = []     # row numbers written so far
        self._empty = task.empty_values()

    def add(self, p: _Pending) -> None:
        self.queue.append(p)
        self.held += len(p.rows)
        self.drain()

    def fail(self, p: _Pending, i: int, reason: str) -> None:
        p.errors[i] = reason
        p.values[i] = self._empty
        p.outputs[i] = None
        p.remaining -= 1

    def expect(self, p: _Pending, i: int, requests: int) -> None:
        p.outputs[i] = [None] * requests

    def output(self, key: tuple[_Pending, int, int], value) -> None:
        """One request's output; the row resolves when all its requests are back."""
        p, i, k = key
        outs = p.outputs[i]
        outs[k] = value
        if all(o is not None for o in outs):
            p.outputs[i] = None
            self.resolve(p, i, self.task.parse(outs))

    def resolve(self, p: _Pending, i: int, values: dict) -> None:
        p.values[i] = values
        p.remaining -= 1
        if p.remaining == 0 and self.queue and self.queue[0] is p:
            self.drain()

    def save_finished(self, sink) -> None:
        """Keep every finished row, whatever stopped the run: emit the finished chunks and
        flush `sink` when it checkpoints (stdout gets only what the run finished)."""
        if sink.checkpoints:
            self.drain()
            sink.flush()

    def drain(self) -> None:
        while self.queue and self.queue[0].remaining == 0:
            p = self.queue.popleft()
            self.held -= len(p.rows)
            self.emit(self._table(p))

    def _table(self, p: _Pending) -> pa.Table:
        t = p.table
        pre = self.prefix
        t = t.append_column(pre + ROW, pa.array(p.rows, type=pa.int64()))
        t = t.append_column(pre + ERROR, pa.array(p.errors, type=pa.string()))
        for f in self.schema:
            t = t.append_column(pre + f.name, pa.array([v[f.name] for v in p.values],
                                                       type=f.type))
        if self.truncated_column:
            cut = [None if p.errors[i] is not None else p.truncated.get(i)
                   for i in range(len(p.rows))]
            t = t.append_column(pre + TRUNCATED, pa.array(cut, type=pa.int64()))
            self.result.truncated = (self.result.truncated or 0) + sum(c is not None
                                                                       for c in cut)
        self.result.new_rows += len(p.rows)
        self.emitted.append(p.rows)
        for e in p.errors:   # counted when written, so a restart never counts a row twice
            if e is not None:
                self.result.errors[error_code(e)] += 1
        for j, codes in p.notes.items():
            if p.errors[j] is None:
                for code in codes:
                    if not self.result.notes[code]:
                        self.note(note_text(self.task, code))
                    self.result.notes[code] += 1
        if self.task.tallied:
            for v in p.values:
                self.result.add(self.task.tally(v))
        return t


def note_text(task: Task, code: str) -> str:
    """The one line that names a note code (the task's `note_texts`, else the code)."""
    return f"note: {task.note_texts.get(code, code)}"
