"""read -> skip done -> conversation -> tokens -> engine -> parse -> ordered checkpoint parts.

The pipeline is usable from Python without the CLI:

    from nfb.pipeline import run
    result = run(cfg, task, engine_factory)

Rows flow in chunks. Every row of a chunk ends as a result or an error; chunks leave in
input order once all their rows are finished, so checkpoint parts are contiguous and the
final output is their concatenation. The engine is fed continuously: requests from the next
chunks are added while earlier ones are still generating.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nfb.config import ConfigError, RunConfig, fingerprint, provenance
from nfb.engines.base import Engine
from nfb.io.readers import STDIN, Chunk, input_format, read_chunks
from nfb.io.writers import STDOUT, OutputWriter, PartWriter, merge_tables, read_metadata
from nfb.records import to_conversation
from nfb.tasks.base import Task
from nfb.workdir import ResumeError, WorkDir

ROW, ERROR = "nfb_row", "nfb_error"


from nfb.errors import Interrupted, RunError  # noqa: E402,F401


@dataclass
class RunResult:
    output: str
    rows: int = 0                     # rows in the output
    new_rows: int = 0                 # rows processed by this invocation
    resumed_rows: int = 0             # rows found done in the work directory
    errors: Counter = field(default_factory=Counter)   # error code -> rows
    levels: Counter = field(default_factory=Counter)   # feedback level -> rows
    seconds: float = 0.0              # wall time of this invocation
    load_seconds: float = 0.0         # of which: starting the engine (loading the model)
    already_done: bool = False

    @property
    def error_rows(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict:
        return {"rows": self.rows, "error_rows": self.error_rows,
                "errors": dict(self.errors.most_common()),
                "levels": {str(k): v for k, v in sorted(self.levels.items())}}


def error_code(reason: str) -> str:
    return reason.split(":", 1)[0]


# --- column names ---------------------------------------------------------------------------

def added_columns(task: Task, prefix: str) -> list[str]:
    return [prefix + ROW, prefix + ERROR, *task.schema(prefix).names]


def input_columns(files: list[str]) -> list[str]:
    """Column names of the inputs, as far as they can be known cheaply (first JSONL rows)."""
    names: dict[str, None] = {}
    for f in files:
        if f == STDIN:
            continue
        try:
            if input_format(f) == "parquet":
                names.update(dict.fromkeys(pq.read_schema(f).names))
            else:
                chunk = next(read_chunks([f], batch_rows=256), None)
                if chunk is not None:
                    names.update(dict.fromkeys(chunk.table.column_names))
        except Exception:  # noqa: BLE001 - unreadable inputs become error rows later
            continue
    return list(names)


def check_clash(task: Task, prefix: str, columns: list[str]) -> None:
    clash = [c for c in added_columns(task, prefix) if c in columns]
    if clash:
        raise ConfigError(
            f"the input already has column(s) {', '.join(clash)}, which nfb would add; "
            "pass --prefix (e.g. --prefix nfb2_) to name the new columns differently")


# --- row selection --------------------------------------------------------------------------

def count_rows(files: list[str]) -> int | None:
    """Rows in the inputs when that is cheap to know (Parquet footers, plain JSONL)."""
    total = 0
    for f in files:
        if f == STDIN:
            return None
        if input_format(f) == "parquet":
            try:
                total += pq.ParquetFile(f).metadata.num_rows
            except Exception:  # noqa: BLE001
                total += 1  # one error row
            continue
        if f.lower().endswith((".gz", ".zst")):
            return None
        n, last = 0, b"\n"
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                n += block.count(b"\n")
                last = block[-1:]
        total += n + (last != b"\n")
    return total


def selected_total(total: int | None, cfg: RunConfig) -> int | None:
    if total is None:
        return None
    if cfg.limit is not None:
        total = min(total, cfg.limit)
    if cfg.shard:
        i, n = cfg.shard.index, cfg.shard.count
        total = total // n + (1 if i < total % n else 0)
    return total


# --- the ordered collector ------------------------------------------------------------------

class _Pending:
    __slots__ = ("table", "rows", "errors", "values", "remaining")

    def __init__(self, table: pa.Table, rows: np.ndarray):
        self.table = table
        self.rows = rows
        self.errors: list[str | None] = [None] * len(rows)
        self.values: list[dict | None] = [None] * len(rows)
        self.remaining = len(rows)


class Collector:
    """Holds chunks until all their rows are finished, then emits them in input order."""

    def __init__(self, task: Task, prefix: str, emit: Callable[[pa.Table], None],
                 result: RunResult):
        self.task = task
        self.prefix = prefix
        self.schema = task.schema("")
        self.emit = emit
        self.result = result
        self.queue: deque[_Pending] = deque()
        self.held = 0
        self._empty = task.empty_values()

    def add(self, p: _Pending) -> None:
        self.queue.append(p)
        self.held += len(p.rows)
        self.drain()

    def fail(self, p: _Pending, i: int, reason: str) -> None:
        p.errors[i] = reason
        p.values[i] = self._empty
        p.remaining -= 1
        self.result.errors[error_code(reason)] += 1

    def resolve(self, p: _Pending, i: int, values: dict) -> None:
        p.values[i] = values
        p.remaining -= 1
        level = values.get("feedback_level")
        if level is not None:
            self.result.levels[level] += 1
        if p.remaining == 0 and self.queue and self.queue[0] is p:
            self.drain()

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
        self.result.new_rows += len(p.rows)
        return t


# --- signals --------------------------------------------------------------------------------

@contextmanager
def _sigterm_as_interrupt():
    """Batch schedulers stop jobs with SIGTERM: checkpoint as for Ctrl-C."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --- the run --------------------------------------------------------------------------------

class Progress:
    """What the pipeline reports while it runs; the CLI shows it with rich."""

    def start(self, total: int | None, done: int) -> None: ...
    def set_total(self, total: int) -> None: ...
    def advance(self, rows: int) -> None: ...
    def stop(self) -> None: ...


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def prepare(cfg: RunConfig, task: Task) -> tuple[str, dict]:
    """Checks that need no model: column clashes. Returns (fingerprint, provenance)."""
    check_clash(task, cfg.prefix, input_columns(list(cfg.inputs)))
    return fingerprint(cfg, task.prompt), provenance(
        cfg, task.prompt, {"task_settings": task.settings(),
                           "columns": added_columns(task, cfg.prefix)})


def finished_result(cfg: RunConfig, fp: str) -> RunResult | None:
    """The result of an earlier, finished run of the same command, if OUT holds one."""
    if cfg.output == STDOUT or cfg.overwrite or not os.path.exists(cfg.output):
        return None
    wd = WorkDir(cfg.output)
    if wd.exists:
        return None
    if STDIN in cfg.inputs:
        raise ResumeError(f"{cfg.output} already exists, and input from stdin cannot be checked "
                          "against it; add --overwrite to replace it")
    meta = read_metadata(cfg.output)
    if not meta or meta.get("fingerprint") != fp:
        raise ResumeError(
            f"{cfg.output} already exists and was not written by this command "
            f"({'another nfb run' if meta else 'not an nfb output'}). Choose another output, "
            "or add --overwrite to replace it.")
    s = meta.get("summary", {})
    return RunResult(cfg.output, rows=s.get("rows", 0), errors=Counter(s.get("errors", {})),
                     levels=Counter({int(k): v for k, v in s.get("levels", {}).items()}),
                     already_done=True)


def run(cfg: RunConfig, task: Task, engine_factory: Callable[[], Engine],
        progress: Progress | None = None, log: Callable[[str], None] = lambda _m: None
        ) -> RunResult:
    """Run `task` over the inputs of `cfg` and write the output. Resumes when it can."""
    t0 = time.monotonic()
    progress = progress or Progress()
    fp, meta = prepare(cfg, task)
    done_before = finished_result(cfg, fp)
    if done_before is not None:
        return done_before
    result = RunResult(cfg.output)
    row_col = cfg.prefix + ROW
    to_stdout = cfg.output == STDOUT

    wd: WorkDir | None = None
    done = np.zeros(0, dtype=bool)
    if not to_stdout:
        wd = WorkDir(cfg.output)
        stdin = STDIN in cfg.inputs
        wd.open(fp, {"model": cfg.engine.model, "started": _now(), "command": meta},
                overwrite=cfg.overwrite or stdin)  # stdin cannot be replayed: never resume it
        wd.clean_temporaries()
        done = wd.done_rows(row_col)
        result.resumed_rows = int(done.sum())
        if result.resumed_rows:
            log(f"resuming: {result.resumed_rows:,} rows already done in {wd.path}")
        _restore_counts(wd, cfg.prefix, result)

    def count() -> int | None:
        return selected_total(count_rows(list(cfg.inputs)), cfg)

    if result.resumed_rows:  # the count decides whether the model is needed at all
        total: int | None | Future = count()
    else:  # a fresh run: count beside the engine start, for the progress bar only
        total = ThreadPoolExecutor(1, thread_name_prefix="nfb-count").submit(count)
    if total is not None and total == result.resumed_rows and wd is not None:
        log("all rows were already done; merging")
    else:
        _process(cfg, task, engine_factory, progress, result, done, wd, total, row_col)

    if wd is not None:
        meta.update(started=(wd.state() or {}).get("started"), finished=_now())
        result.rows = _finalize(cfg, task, wd, meta, result, row_col)
        wd.remove()
    else:
        result.rows = result.new_rows
    result.seconds = time.monotonic() - t0
    return result


def _restore_counts(wd: WorkDir, prefix: str, result: RunResult) -> None:
    """Error and level counts of rows finished by earlier invocations (for the summary)."""
    for p in wd.parts():
        cols = [prefix + ERROR]
        names = pq.read_schema(p).names
        if prefix + "feedback_level" in names:
            cols.append(prefix + "feedback_level")
        t = pq.read_table(p, columns=cols)
        for e in t.column(0).to_pylist():
            if e is not None:
                result.errors[error_code(e)] += 1
        if len(cols) > 1:
            for lv in t.column(1).to_pylist():
                if lv is not None:
                    result.levels[lv] += 1


def _process(cfg: RunConfig, task: Task, engine_factory: Callable[[], Engine],
             progress: Progress, result: RunResult, done: np.ndarray, wd: WorkDir | None,
             total: int | None | Future, row_col: str) -> None:
    if wd is not None:
        sink = PartWriter(wd.path, cfg.part_rows, cfg.checkpoint_seconds, row_col)
        emit = sink.add
        out_writer = None
    else:
        sink = None
        out_writer = _StdoutWriter()
        emit = out_writer.write

    def emit_and_report(table: pa.Table) -> None:
        emit(table)
        progress.advance(len(table))

    collector = Collector(task, cfg.prefix, emit_and_report, result)
    t_load = time.monotonic()
    engine = engine_factory()
    result.load_seconds = time.monotonic() - t_load
    try:
        budget = task.prompt_budget(engine.max_model_len)
        if budget <= 0:
            raise ConfigError(
                f"the model allows {engine.max_model_len} tokens in all, which leaves no room "
                f"for a prompt: lower --max-tokens or raise --max-model-len")
        window = max(1, getattr(engine, "cfg", cfg.engine).max_in_flight)
        max_held = 8 * window + cfg.batch_rows
        pending_total = total if isinstance(total, Future) else None
        progress.start(None if pending_total else total, result.resumed_rows)

        def poll_total() -> None:
            nonlocal pending_total
            if pending_total is not None and pending_total.done():
                if pending_total.exception() is None and pending_total.result() is not None:
                    progress.set_total(pending_total.result())
                pending_total = None

        requests = _requests(cfg, task, engine, collector, done, budget, sink)
        with _sigterm_as_interrupt():
            try:
                for (p, i), values in task.run(engine, requests,
                                               lambda: collector.held < max_held):
                    collector.resolve(p, i, values)
                    if sink is not None:
                        sink.maybe_flush()
                    poll_total()
            except KeyboardInterrupt:
                if sink is not None:
                    sink.flush()
                raise Interrupted(
                    f"interrupted: {result.resumed_rows + result.new_rows:,} rows are saved in "
                    f"{wd.path if wd else 'the output'}; run the same command again to go on"
                ) from None
        collector.drain()
        if collector.queue:  # every request came back, so nothing may be left waiting
            raise RunError("internal error: rows left unfinished")
        if sink is not None:
            sink.flush()
        if out_writer is not None:
            out_writer.close()
    finally:
        progress.stop()
        engine.close()


def _requests(cfg: RunConfig, task: Task, engine: Engine, collector: Collector,
              done: np.ndarray, budget: int, sink: PartWriter | None
              ) -> Iterator[tuple[tuple[_Pending, int], list[int]]]:
    """Read chunks, turn rows into token ids, register them, yield engine requests."""
    fields = cfg.fields
    needed = fields.needed
    for chunk in read_chunks(list(cfg.inputs), cfg.batch_rows):
        if cfg.limit is not None and chunk.first_row >= cfg.limit:
            break
        rows = np.arange(chunk.first_row, chunk.first_row + len(chunk), dtype=np.int64)
        keep = np.ones(len(rows), dtype=bool)
        if cfg.limit is not None:
            keep &= rows < cfg.limit
        if cfg.shard:
            keep &= rows % cfg.shard.count == cfg.shard.index
        if len(done):
            in_range = rows < len(done)
            keep[in_range] &= ~done[rows[in_range]]
        idx = np.flatnonzero(keep)
        if len(idx) == 0:
            continue
        table = chunk.table if len(idx) == len(rows) else chunk.table.take(pa.array(idx))
        p = _Pending(table, rows[idx])
        dicts = _row_dicts(chunk, idx, needed)
        convs: list[tuple[int, list[dict]]] = []
        for j, (i, d) in enumerate(zip(idx, dicts)):
            err = chunk.errors[i]
            if err is None:
                conv, err = to_conversation(d, fields)
            if err is not None:
                collector.fail(p, j, err)
            else:
                convs.append((j, task.messages(conv)))
        requests = []
        if convs:
            ids = engine.encode_chats([c for _, c in convs], task.add_generation_prompt)
            for (j, _), toks in zip(convs, ids):
                if len(toks) > budget:
                    collector.fail(p, j, f"prompt_too_long:{len(toks)} tokens > {budget}")
                else:
                    requests.append(((p, j), toks))
        collector.add(p)
        if sink is not None:
            sink.maybe_flush()
        yield from requests


def _row_dicts(chunk: Chunk, idx: np.ndarray, needed: tuple[str, ...]) -> list[dict]:
    if chunk.rows is not None:
        return [chunk.rows[i] for i in idx]
    present = [n for n in needed if n in chunk.table.column_names]
    cols = {n: chunk.table.column(n).take(pa.array(idx)).to_pylist() for n in present}
    return [{n: cols[n][k] for n in present} for k in range(len(idx))]


class _StdoutWriter:
    """`-o -`: JSONL rows to stdout as soon as they are in order (no checkpoint)."""

    def __init__(self):
        self._writer: OutputWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = OutputWriter(STDOUT, table.schema, None)
        self._writer.schema = table.schema  # JSONL: each chunk keeps its own columns
        self._writer.write(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _finalize(cfg: RunConfig, task: Task, wd: WorkDir, meta: dict, result: RunResult,
              row_col: str) -> int:
    """Merge the parts, in row order, into the output (temporary name, then rename)."""
    parts = wd.parts()
    schemas = [pq.read_schema(p) for p in parts]
    meta["summary"] = result.summary() | {"rows": sum(pq.ParquetFile(p).metadata.num_rows
                                                      for p in parts)}
    last = -1
    for p in parts:  # parts are contiguous and ordered by their first row: check it
        col = pq.read_table(p, columns=[row_col]).column(0)
        if len(col) and col[0].as_py() <= last:
            raise RunError(f"{wd.path}: overlapping checkpoint parts ({p.name}); "
                           "start over with --overwrite")
        if len(col):
            last = col[-1].as_py()

    def tables(path: Path) -> Iterator[pa.Table]:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=16_384):
            yield pa.Table.from_batches([batch])

    schemas = [s.remove_metadata() for s in schemas]
    if not schemas:
        schemas = [pa.schema([pa.field(row_col, pa.int64()),
                              pa.field(cfg.prefix + ERROR, pa.string()),
                              *task.schema(cfg.prefix)])]
    return merge_tables(cfg.output, (tables(p) for p in parts), schemas, meta)
