"""read -> skip done -> conversation -> tokens -> engine -> parse -> ordered checkpoint parts.

`nfb.api` builds the config and the task and calls `run`; the pipeline drives the engine
(tasks never do) and knows nothing of the CLI.

Rows flow in chunks. Every row of a chunk ends as a result or an error; chunks leave in
input order once all their rows are finished, so checkpoint parts are contiguous and the
final output is their concatenation. The engine is fed continuously: requests from the next
chunks are added while earlier ones are still generating.
"""

from __future__ import annotations

import functools
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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nfb.config import RunConfig, provenance, what_changed
from nfb.engines.base import Engine
from nfb.errors import EngineDied, UsageError
from nfb.fit import Fitter, prompt_chars
from nfb.io.outputs import OutputLock, clean_stale_temps, write_error
from nfb.io.readers import STDIN, Chunk, count_rows, input_columns, input_schema, read_chunks
from nfb.io.storage import is_url
from nfb.io.writers import STDOUT, OutputWriter, PartWriter, merge_tables, read_metadata
from nfb.prompts import render
from nfb.records import to_conversation
from nfb.tasks.base import Task
from nfb.workdir import ResumeError, WorkDir

ROW, ERROR, TRUNCATED = "nfb_row", "nfb_error", "nfb_truncated"


from nfb.errors import Interrupted, RunError  # noqa: E402,F401


@dataclass
class RunResult:
    output: str
    rows: int = 0                     # rows in the output
    new_rows: int = 0                 # rows processed by this invocation
    resumed_rows: int = 0             # rows found done in the work directory
    errors: Counter = field(default_factory=Counter)   # error code -> rows
    levels: Counter = field(default_factory=Counter)   # feedback level -> rows
    unreadable: int = 0               # judge: rows with no readable judgement (judge_error)
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

    def summary(self) -> dict:
        return {"rows": self.rows, "error_rows": self.error_rows,
                "errors": dict(self.errors.most_common()),
                "levels": {str(k): v for k, v in sorted(self.levels.items())},
                "unreadable": self.unreadable, "notes": dict(self.notes.most_common()),
                "data_parallel": self.data_parallel} | (
                    {} if self.truncated is None else {"truncated": self.truncated}) | (
                    {} if self.cluster is None else {"cluster": dict(self.cluster)})


def error_code(reason: str) -> str:
    return reason.split(":", 1)[0]


# --- column names ---------------------------------------------------------------------------

def added_columns(task: Task, prefix: str, too_long: str = "error") -> list[str]:
    extra = [] if too_long == "error" else [prefix + TRUNCATED]
    return [prefix + ROW, prefix + ERROR, *task.schema(prefix).names, *extra]


def check_clash(task: Task, prefix: str, columns: list[str], too_long: str = "error") -> None:
    clash = [c for c in added_columns(task, prefix, too_long) if c in columns]
    if clash:
        raise UsageError(
            f"the input already has column(s) {', '.join(clash)}, which nfb would add; "
            "pass --prefix (e.g. --prefix nfb2_) to name the new columns differently")


# --- row selection --------------------------------------------------------------------------

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
        for v in p.values:
            for key, value in v.items():
                if key == "judge_error" and value is not None:
                    self.result.unreadable += 1
                elif key.endswith("feedback_level"):
                    _tally_levels(self.result.levels, value)
        return t


def note_text(task: Task, code: str) -> str:
    """The one line that names a note code (the task's `note_texts`, else the code)."""
    return f"note: {getattr(task, 'note_texts', {}).get(code, code)}"


def _tally_levels(levels: Counter, value) -> None:
    """Count a feedback level, or each level of a list column (one per response)."""
    if isinstance(value, list):
        levels.update(x for x in value if x is not None)
    elif value is not None:
        levels[value] += 1


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
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def prepare(cfg: RunConfig, task: Task) -> tuple[str, dict]:
    """Checks that need no model: column clashes. Returns (fingerprint, provenance)."""
    check_clash(task, cfg.prefix, input_columns(list(cfg.inputs)), cfg.too_long)
    settings = task.settings()
    meta = provenance(cfg, task.name, settings,
                      {"columns": added_columns(task, cfg.prefix, cfg.too_long)})
    return meta["fingerprint"], meta


def output_exists(path: str) -> bool:
    if is_url(path):
        from nfb.io import storage
        return storage.exists(path)
    return os.path.exists(path)


def finished_result(cfg: RunConfig, fp: str, meta_now: dict | None = None
                    ) -> RunResult | None:
    """The result of an earlier, finished run of the same command, if OUT holds one
    (`meta_now`: this run's provenance, to say what changed)."""
    if cfg.output == STDOUT or cfg.overwrite or not output_exists(cfg.output):
        return None
    wd = WorkDir(cfg.output)
    if STDIN in cfg.inputs:
        raise ResumeError(f"{cfg.output} already exists, and input from stdin cannot be checked "
                          "against it; add --overwrite to replace it")
    meta = read_metadata(cfg.output)
    # a merge of shards carries the unsharded run's settings fingerprint (weights by name
    # and size, not time: the shards' nodes may each hold a copy of the model)
    merged = (cfg.shard is None and meta_now is not None and meta is not None
              and meta.get("fingerprint") == meta_now.get("settings_fingerprint"))
    if meta and (meta.get("fingerprint") == fp or merged):
        wd.remove()  # killed after the output was complete, while cleaning up: tidy it
        s = meta.get("summary", {})
        return RunResult(cfg.output, rows=s.get("rows", 0), errors=Counter(s.get("errors", {})),
                         levels=Counter({int(k): v for k, v in s.get("levels", {}).items()}),
                         unreadable=s.get("unreadable", 0), truncated=s.get("truncated"),
                         notes=Counter(s.get("notes", {})),
                         already_done=True)
    if wd.exists:
        return None  # an unfinished run: its work directory decides
    why = what_changed((meta or {}).get("identity"), (meta_now or {}).get("identity") or {})
    if why and why.startswith("on inputs"):
        raise ResumeError(f"{cfg.output} was written by this command, but on inputs that have "
                          "changed since (size, time or contents); add --overwrite to score "
                          "them again, or choose another output.")
    if why:
        raise ResumeError(f"{cfg.output} was written by this command, but {why}; add "
                          "--overwrite to score again, or choose another output.")
    raise ResumeError(
        f"{cfg.output} already exists and was not written by this command "
        f"({'another nfb run' if meta else 'not an nfb output'}). Choose another output, "
        "or add --overwrite to replace it.")


def run(cfg: RunConfig, task: Task, engine_factory: Callable[[], Engine] | None = None,
        progress: Progress | None = None, log: Callable[[str], None] | None = None
        ) -> RunResult:
    """Run `task` over the inputs of `cfg` and write the output. Resumes when it can.

    `engine_factory` starts the engine (default: `nfb.engines.make_engine` for
    `cfg.engine.backend` and the task's runner); it is called only when rows need it.
    """
    t0 = time.monotonic()
    progress = progress or Progress()
    log = log or (lambda _m: None)
    if engine_factory is None:
        from nfb.engines import make_engine

        def engine_factory() -> Engine:
            return make_engine(cfg.engine, task.runner)
    fp, meta = prepare(cfg, task)
    if cfg.output == STDOUT:
        return _run(cfg, task, engine_factory, progress, log, fp, meta, t0)
    with OutputLock(cfg.output):   # one process per output: a second is refused (exit 2)
        clean_stale_temps(cfg.output)
        return _run(cfg, task, engine_factory, progress, log, fp, meta, t0)


def _run(cfg: RunConfig, task: Task, engine_factory: Callable[[], Engine], progress: Progress,
         log: Callable[[str], None], fp: str, meta: dict, t0: float) -> RunResult:
    done_before = finished_result(cfg, fp, meta)
    if done_before is not None:
        return done_before
    result = RunResult(cfg.output, truncated=None if cfg.too_long == "error" else 0)
    row_col = cfg.prefix + ROW
    to_stdout = cfg.output == STDOUT

    wd: WorkDir | None = None
    done = np.zeros(0, dtype=bool)
    if not to_stdout:
        wd = WorkDir(cfg.output)
        stdin = STDIN in cfg.inputs
        ident = meta.get("identity")
        try:
            wd.open(fp, {"model": cfg.engine.model, "started": _now(), "command": meta},
                    overwrite=cfg.overwrite or stdin,  # stdin cannot be replayed: never resume
                    describe=lambda old: what_changed(
                        (old.get("command") or {}).get("identity"), ident))
        except OSError as e:
            raise write_error(e, str(wd.path)) from None
        wd.clean_temporaries()
        stop_leftover_engine(wd, log)
        for name in wd.drop_damaged_parts(row_col):
            log(f"a damaged checkpoint part ({name}) was dropped; its rows are done again")
        done = wd.done_rows(row_col)
        result.resumed_rows = int(done.sum())
        if result.resumed_rows:
            log(f"resuming: {result.resumed_rows:,} rows already done in {wd.path}")
        _restore_counts(wd, cfg.prefix, result, cfg, task)

    def count() -> int | None:
        return selected_total(count_rows(list(cfg.inputs)), cfg)

    with _sigterm_as_interrupt():
        try:
            if result.resumed_rows:  # the count decides whether the model is needed at all
                total: int | None | Future = count()
            else:  # a fresh run: count beside the engine start, for the progress bar only
                total = _in_daemon_thread(count)
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
        except KeyboardInterrupt:
            saved = result.resumed_rows + result.new_rows
            raise Interrupted(
                f"interrupted: {saved:,} rows are saved in "
                f"{wd.path if wd else 'the output'}; {_again(cfg)}"
            ) from None
        except OSError as e:   # disk full, a folder made read-only: one line, rows kept
            if to_stdout:
                raise
            saved = _saved_rows(wd)
            raise write_error(e, cfg.output, f" ({saved:,} rows are saved in {wd.path})"
                              if saved else "") from None
    result.seconds = time.monotonic() - t0
    return result


def _saved_rows(wd: WorkDir | None) -> int:
    """Rows in the work directory's finished parts (footers only; 0 if unreadable)."""
    total = 0
    for p in wd.parts() if wd is not None and wd.path.exists() else []:
        try:
            total += pq.ParquetFile(p).metadata.num_rows
        except (OSError, ValueError, pa.ArrowException):
            continue
    return total


def _again(cfg: RunConfig) -> str:
    if cfg.overwrite:
        return "run the same command again without --overwrite to go on"
    return "run the same command again to go on"


def _in_daemon_thread(fn: Callable[[], int | None]) -> Future:
    """Run `fn` beside the engine start; a daemon thread, so an early exit never waits for
    it (counting a large compressed input takes a while)."""
    import threading

    fut: Future = Future()

    def target() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)
    threading.Thread(target=target, name="nfb-count", daemon=True).start()
    return fut


def _restore_counts(wd: WorkDir, prefix: str, result: RunResult, cfg: RunConfig | None = None,
                    task: Task | None = None) -> None:
    """Error, level and note counts of rows finished by earlier invocations (the summary)."""
    row_notes = getattr(task, "row_notes", None)
    for p in wd.parts():
        if row_notes is not None and cfg is not None:
            _restore_notes(p, cfg, row_notes, result)
        names = pq.read_schema(p).names
        levels = [n for n in names if n.startswith(prefix) and n.endswith("feedback_level")]
        judged = [n for n in names if n == prefix + "judge_error"]
        cut = [n for n in names if n == prefix + TRUNCATED]
        t = pq.read_table(p, columns=[prefix + ERROR, *levels, *judged, *cut])
        for name in cut:
            result.truncated = (result.truncated or 0) + t.column(name).length() - \
                t.column(name).null_count
        for name in judged:
            result.unreadable += t.column(name).length() - t.column(name).null_count
        for e in t.column(0).to_pylist():
            if e is not None:
                result.errors[error_code(e)] += 1
        for name in levels:   # one column per response field, or a list column
            for lv in t.column(name).to_pylist():
                _tally_levels(result.levels, lv)


def _restore_notes(part: Path, cfg: RunConfig, row_notes, result: RunResult) -> None:
    """Note counts of a finished part, recomputed from its input columns (a part keeps them)."""
    names = pq.read_schema(part).names
    needed = [n for n in cfg.fields.needed if n in names]
    t = pq.read_table(part, columns=[*needed, cfg.prefix + ERROR])
    errors = t.column(cfg.prefix + ERROR).to_pylist()
    for d, e in zip(t.select(needed).to_pylist(), errors):
        if e is None:
            conv, err = to_conversation(d, cfg.fields)
            if err is None:
                result.notes.update(row_notes(conv))


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

    t_load = time.monotonic()
    engine = _start(engine_factory, wd, progress)
    result.load_seconds = time.monotonic() - t_load
    result.data_parallel = getattr(engine, "data_parallel", 1)
    if hasattr(engine, "run_counts"):   # Ray: engine loads, replicas (the summary, provenance)
        result.cluster = engine.run_counts
    restarts = cfg.engine.engine_restarts
    pending_total = total if isinstance(total, Future) else None
    progress.start(None if pending_total else total, result.resumed_rows)

    def poll_total() -> None:
        nonlocal pending_total
        if pending_total is not None and pending_total.done():
            if pending_total.exception() is None and pending_total.result() is not None:
                progress.set_total(pending_total.result())
            pending_total = None

    try:
        while True:
            collector = Collector(task, cfg.prefix, emit_and_report, result,
                                  truncated_column=cfg.too_long != "error", note=progress.note)
            try:
                # an engine that runs the whole row pipeline itself (Ray Data: nfb.engines.ray)
                stream_rows = getattr(engine, "stream_rows", None)
                if stream_rows is not None:
                    stream_rows(cfg, task, collector, done, sink, poll_total)
                else:
                    _stream_rows(cfg, task, engine, collector, done, sink, poll_total)
                break
            except EngineDied as e:
                if sink is not None:
                    sink.flush()
                saved = result.resumed_rows + result.new_rows
                restarts -= getattr(engine, "restarts_used", 0)   # replicas restart themselves
                engine.close()
                engine = None
                if restarts <= 0:
                    where = f" in {wd.path}" if wd is not None else ""
                    raise EngineDied(f"{e}; {saved:,} rows are saved{where}; "
                                     f"{_again(cfg)}") from None
                restarts -= 1
                progress.note(f"{e}; restarting the engine ({restarts} restart(s) left)")
                done = _union(done, collector.emitted)
                t_load = time.monotonic()
                engine = _start(engine_factory, wd, progress)
                result.load_seconds += time.monotonic() - t_load
        if sink is not None:
            sink.flush()
        if out_writer is not None:
            out_writer.close()
    finally:
        progress.stop()
        if engine is not None:
            engine.close()
        if wd is not None:
            wd.forget_engine()


def _start(engine_factory: Callable[[], Engine], wd: WorkDir | None,
           progress: Progress | None = None) -> Engine:
    """Start the engine; record its processes in the work directory (for leftovers)."""
    engine = engine_factory()
    set_note = getattr(engine, "set_note", None)   # replicas say when one restarts
    if callable(set_note) and progress is not None:
        set_note(progress.note)
    pids = getattr(engine, "pids", None)
    if wd is not None and callable(pids):
        wd.record_engine(pids())
    return engine


def stop_leftover_engine(wd: WorkDir, log: Callable[[str], None]) -> None:
    """A killed run may have left its engine running (its pids are in the work directory):
    stop it before this run loads the model, checking each pid is still that process."""
    pids = wd.engine_pids()
    if pids:
        from nfb.engines.guard import kill_processes
        n = kill_processes(pids)
        if n:
            log(f"stopped {n} leftover engine process(es) of an earlier, killed run")
    wd.forget_engine()


def _union(done: np.ndarray, emitted: list[np.ndarray]) -> np.ndarray:
    if not emitted:
        return done
    rows = np.concatenate(emitted)
    size = max(len(done), int(rows.max()) + 1)
    out = np.zeros(size, dtype=bool)
    out[: len(done)] = done
    out[rows] = True
    return out


def check_budget(task: Task, engine: Engine) -> int:
    """The prompt budget of `task` on `engine` (exit 2 when none is left), after the task's
    own tokenizer check."""
    budget = task.prompt_budget(engine.max_model_len)
    if budget <= 0:
        raise UsageError(
            f"the model allows {engine.max_model_len} tokens in all, which leaves no room "
            f"for a prompt: lower --max-tokens or raise --max-model-len")
    check = getattr(task, "check_tokenizer", None)
    if check is not None:   # e.g. a GenRM's chat template must render the judged responses
        check(engine.tokenizer)
    return budget


def _stream_rows(cfg: RunConfig, task: Task, engine: Engine, collector: Collector,
                 done: np.ndarray, sink: PartWriter | None, poll_total: Callable[[], None]
                 ) -> None:
    """Feed every row not yet done through the engine; emit finished chunks in order."""
    budget = check_budget(task, engine)
    window = max(1, cfg.engine.max_in_flight)
    max_held = 8 * window + cfg.batch_rows
    feeder = Feeder(cfg, task, engine.tokenizer, done, budget)
    try:
        requests = _requests(feeder, collector, sink)

        def can_feed() -> bool:
            return collector.held < max_held

        if task.runner == "generate":
            stream = engine.generate(requests, task.sampling, can_feed)
        else:
            stream = engine.classify(requests, can_feed)
        try:
            for key, value in stream:
                collector.output(key, value)
                if sink is not None:
                    sink.maybe_flush()
                poll_total()
        except BaseException:
            if sink is not None:  # keep every finished row, whatever stopped the run
                collector.drain()
                sink.flush()
            raise
        collector.drain()
        if collector.queue:  # every request came back, so nothing may be left waiting
            raise RunError("internal error: rows left unfinished")
    finally:
        feeder.close()


@dataclass
class _Prepared:
    """A chunk read, validated and rendered to token ids, ready for the engine."""

    pending: _Pending
    failed: list[tuple[int, str]]                       # (row in chunk, reason)
    requests: list[tuple[int, list[list[int]]]]         # (row in chunk, ids per request)
    truncated: dict[int, int] = field(default_factory=dict)   # row in chunk -> tokens removed


class Feeder:
    """Reads, validates and tokenizes chunks ahead of the engine, in worker threads.

    Rendering (chat template) and tokenization are the main cost per row before the engine;
    a reader thread pulls chunks and hands each to a pool of workers (the Rust tokenizer
    releases the GIL), so stepping the engine never waits on them. Chunks come out in input
    order; memory is bounded by `ahead` chunks.
    """

    def __init__(self, cfg: RunConfig, task: Task, tokenizer, done: np.ndarray, budget: int,
                 workers: int | None = None, ahead: int | None = None):
        import queue
        import threading

        self.cfg, self.task, self.tokenizer = cfg, task, tokenizer
        self.done, self.budget = done, budget
        self.fit = Fitter(tokenizer, budget, cfg.too_long)
        self.workers = workers or max(1, min(4, (os.cpu_count() or 1)))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="nfb-tokenize")
        self._queue: queue.Queue = queue.Queue(maxsize=ahead or 2 * self.workers + 2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="nfb-read", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        cfg = self.cfg
        try:
            for chunk in read_chunks(list(cfg.inputs), cfg.batch_rows, cfg.max_line_bytes):
                if cfg.limit is not None and chunk.first_row >= cfg.limit:
                    break
                if not self._put(self._pool.submit(self._prepare, chunk)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)
            return
        self._put(None)

    def __iter__(self) -> Iterator[_Prepared]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            prepared = item.result()
            if prepared is not None:
                yield prepared

    def _prepare(self, chunk: Chunk) -> _Prepared | None:
        cfg, task = self.cfg, self.task
        rows = np.arange(chunk.first_row, chunk.first_row + len(chunk), dtype=np.int64)
        keep = np.ones(len(rows), dtype=bool)
        if cfg.limit is not None:
            keep &= rows < cfg.limit
        if cfg.shard:
            keep &= rows % cfg.shard.count == cfg.shard.index
        done = self.done
        if len(done):
            in_range = rows < len(done)
            keep[in_range] &= ~done[rows[in_range]]
        idx = np.flatnonzero(keep)
        if len(idx) == 0:
            return None
        table = chunk.table if len(idx) == len(rows) else chunk.table.take(pa.array(idx))
        p = _Pending(table, rows[idx])
        row_fields = tuple(getattr(task, "row_fields", ()))   # e.g. a per-row principle
        check_conversation = getattr(task, "check_conversation", None)   # e.g. judge's
        row_notes = getattr(task, "row_notes", None)      # e.g. SteerLM's left-out system turn
        dicts = _row_dicts(chunk, idx, cfg.fields.needed + row_fields)
        failed: list[tuple[int, str]] = []
        prompts, owners = [], []
        fit = self.fit
        convs: dict[int, tuple] = {}    # row in chunk -> (conversation, its prompts' maker)
        slow: list[tuple[int, int | None]] = []   # rows to shorten: (row, tokens or None)
        for j, (i, d) in enumerate(zip(idx, dicts)):
            err = chunk.errors[i]
            if err is None:
                conv, err = to_conversation(d, cfg.fields)
            if err is None and row_fields:
                err = task.check_row(d)
            if err is None and check_conversation is not None:
                err = check_conversation(conv)
            if err is not None:
                failed.append((j, err))
                continue
            if row_notes is not None:
                codes = row_notes(conv)
                if codes:
                    p.notes[j] = tuple(codes)
            make = functools.partial(task.prompts, row=d) if row_fields else task.prompts
            made = make(conv)
            convs[j] = (conv, make)
            chars = prompt_chars(made)
            if fit.over_chars(chars):   # cannot fit whatever the template: never rendered
                if fit.policy == "error":
                    failed.append((j, fit.char_reason(chars)))
                else:
                    slow.append((j, None))
                continue
            for pr in made:
                prompts.append(pr)
                owners.append(j)
        try:
            ids = render(self.tokenizer, prompts)
        except Exception:  # noqa: BLE001 - a chat template that refuses some row
            ids, bad = [], {}
            for j, pr in zip(owners, prompts):
                try:
                    ids.append(render(self.tokenizer, [pr])[0])
                except Exception as e:  # noqa: BLE001
                    ids.append(None)
                    bad.setdefault(j, f"template_error:{' '.join(str(e).split())[:200]}")
            failed.extend(bad.items())
            owners = [j for j, t in zip(owners, ids) if j not in bad]
            ids = [t for t in ids if t is not None]
        by_row: dict[int, list[list[int]]] = {}
        for j, toks in zip(owners, ids):
            by_row.setdefault(j, []).append(toks)
        requests = []
        for j, toks in by_row.items():
            longest = max(len(t) for t in toks)
            if longest <= self.budget:
                requests.append((j, toks))
            elif fit.policy == "error":
                failed.append((j, fit.token_reason(longest)))
            else:
                slow.append((j, longest))
        truncated: dict[int, int] = {}
        for j, longest in slow:   # --too-long drop-context / truncate
            conv, make = convs[j]
            try:
                got = fit.shorten(conv, make, longest)
            except Exception as e:  # noqa: BLE001 - a chat template that refuses the row
                got = f"template_error:{' '.join(str(e).split())[:200]}"
            if isinstance(got, str):
                failed.append((j, got))
            else:
                requests.append((j, got[0]))
                truncated[j] = got[1]
        return _Prepared(p, failed, requests, truncated)

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


class ChunkPreparer(Feeder):
    """The Feeder's preparation of one chunk (`prepare`), without its threads: what Ray's
    CPU workers run (nfb.engines.ray)."""

    def __init__(self, cfg: RunConfig, task: Task, tokenizer, done: np.ndarray, budget: int):
        self.cfg, self.task, self.tokenizer = cfg, task, tokenizer
        self.done, self.budget = done, budget
        self.fit = Fitter(tokenizer, budget, cfg.too_long)

    def prepare(self, chunk: Chunk) -> _Prepared | None:
        return self._prepare(chunk)

    def close(self) -> None:
        pass


def _requests(feeder: Feeder, collector: Collector, sink: PartWriter | None
              ) -> Iterator[tuple[tuple[_Pending, int, int], list[int]]]:
    """Register prepared chunks with the collector and yield their engine requests."""
    for prep in feeder:
        p = prep.pending
        p.truncated = prep.truncated
        for j, reason in prep.failed:
            collector.fail(p, j, reason)
        for j, toks in prep.requests:
            collector.expect(p, j, len(toks))
        collector.add(p)
        if sink is not None:
            sink.maybe_flush()
        for j, toks in prep.requests:
            for k, ids in enumerate(toks):
                yield (p, j, k), ids


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
    try:
        part_rows = wd.part_rows(row_col)
        schemas = [pq.read_schema(p) for p, _ in part_rows]
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise RunError(f"{wd.path}: a checkpoint part cannot be read ({e}); run the same "
                       "command again (damaged parts are dropped and their rows done again)"
                       ) from None
    parts = [p for p, _ in part_rows]
    rows = [r for _, r in part_rows]
    every = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    meta["summary"] = result.summary() | {"rows": int(len(np.unique(every)))}
    # parts are usually contiguous runs in row order; when one was lost and its rows done
    # again, a later part can hold rows from before and after others: merge by row number
    ordered = all(len(r) == 0 or bool(np.all(np.diff(r) > 0)) for r in rows)
    last = -1
    for r in rows:
        if len(r):
            ordered = ordered and int(r[0]) > last
            last = int(r[-1])

    def tables(path: Path) -> Iterator[pa.Table]:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=16_384):
            yield pa.Table.from_batches([batch])

    def sorted_tables(path: Path, r: np.ndarray) -> Iterator[pa.Table]:
        if len(r) and bool(np.all(np.diff(r) > 0)):
            yield from tables(path)
        else:
            t = pq.read_table(path)
            yield t.take(pc.sort_indices(t, [(row_col, "ascending")]))

    def by_row() -> Iterator[pa.Table]:
        from nfb.merge import _kway

        last = -1
        for t in _kway([sorted_tables(p, r) for p, r in part_rows], row_col):
            r = t.column(row_col).to_numpy()
            keep = np.empty(len(r), dtype=bool)   # a row found twice is written once
            keep[0] = r[0] > last
            keep[1:] = r[1:] > r[:-1]
            last = max(last, int(r[-1]))
            yield t if keep.all() else t.filter(pa.array(keep))

    schemas = [s.remove_metadata() for s in schemas]
    if not schemas:  # no row at all: the output still has the input's columns
        schemas = [pa.schema([*input_schema(list(cfg.inputs)),
                              pa.field(row_col, pa.int64()),
                              pa.field(cfg.prefix + ERROR, pa.string()),
                              *task.schema(cfg.prefix),
                              *([] if cfg.too_long == "error" else
                                [pa.field(cfg.prefix + TRUNCATED, pa.int64())])])]
    sources = (tables(p) for p in parts) if ordered else [by_row()]
    return merge_tables(cfg.output, sources, schemas, meta)
