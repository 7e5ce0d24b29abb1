"""read -> skip done -> conversation -> tokens -> engine -> parse -> ordered checkpoint parts.

`nfb.api` builds the config and the task and calls `run`; the pipeline drives the engine
(tasks never do) and knows nothing of the CLI. This module holds the run itself: the output
lock, resume, the engine and its restarts, the final merge of the parts; the feeder
(`nfb.run.feed`) prepares the engine's requests and the collector (`nfb.run.collect`) turns
its outputs back into ordered rows.

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
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nfb.config import RunConfig, provenance, what_changed
from nfb.engines.base import Engine, Plugged
from nfb.errors import EngineDied, Interrupted, RunError, UsageError
from nfb.io.kway import parts_by_row
from nfb.io.outputs import OutputLock, clean_stale_temps, write_error
from nfb.io.readers import STDIN, count_rows, input_columns, input_schema
from nfb.io.storage import is_url
from nfb.io.writers import STDOUT, PartWriter, Sink, StdoutWriter, merge_tables, read_metadata
from nfb.records import to_conversation
from nfb.run.collect import ERROR, ROW, TRUNCATED, Collector, RunResult, error_code
from nfb.run.feed import ChunkPreparer, Feeder, _requests
from nfb.run.workdir import ResumeError, WorkDir
from nfb.tasks.base import Task

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


def prepare(cfg: RunConfig, task: Task, columns: bool = True) -> tuple[str, dict]:
    """Checks that need no model: column clashes (unless `columns` is False: --engine ray
    checks them from its workers' reads, before the model loads). Returns (fingerprint,
    provenance)."""
    if columns:
        check_clash(task, cfg.prefix, input_columns(list(cfg.inputs)), cfg.too_long)
    settings = task.settings()
    meta = provenance(cfg, task.name, settings,
                      {"columns": added_columns(task, cfg.prefix, cfg.too_long)})
    return meta["fingerprint"], meta


def workers_read(cfg: RunConfig) -> bool:
    """The inputs are read on a cluster's workers (--engine ray), never by this process."""
    return cfg.engine.backend == "ray"


def output_exists(path: str) -> bool:
    if is_url(path):
        from nfb.io import storage
        return storage.exists(path)
    return os.path.exists(path)


def finished_result(cfg: RunConfig, fp: str, meta_now: dict | None = None,
                    counts: dict[str, str] | None = None) -> RunResult | None:
    """The result of an earlier, finished run of the same command, if OUT holds one
    (`meta_now`: this run's provenance, to say what changed; `counts`: the task's)."""
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
        return RunResult.from_summary(cfg.output, s, counts or Task.counts,
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
    fp, meta = prepare(cfg, task, columns=not workers_read(cfg))
    if cfg.output == STDOUT:
        return _run(cfg, task, engine_factory, progress, log, fp, meta, t0)
    with OutputLock(cfg.output):   # one process per output: a second is refused (exit 2)
        clean_stale_temps(cfg.output)
        return _run(cfg, task, engine_factory, progress, log, fp, meta, t0)


def _run(cfg: RunConfig, task: Task, engine_factory: Callable[[], Engine], progress: Progress,
         log: Callable[[str], None], fp: str, meta: dict, t0: float) -> RunResult:
    done_before = finished_result(cfg, fp, meta, task.counts)
    if done_before is not None:
        return done_before
    result = RunResult(cfg.output, truncated=None if cfg.too_long == "error" else 0,
                       count_kinds=dict(task.counts))
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
            if workers_read(cfg):   # the cluster's workers count the rows (set_total)
                total = None
            elif result.resumed_rows:  # the count decides whether the model is needed at all
                total: int | None | Future = count()
            else:  # a fresh run: count beside the engine start, for the progress bar only
                total = _in_daemon_thread(count)
            if total is not None and total == result.resumed_rows and wd is not None:
                log("all rows were already done; merging")
            else:
                _process(cfg, task, engine_factory, progress, result, done, wd, total,
                         _sink(cfg, wd, row_col))
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


def _restore_counts(wd: WorkDir, prefix: str, result: RunResult, cfg: RunConfig,
                    task: Task) -> None:
    """Error, note and the task's counts of rows finished by earlier invocations (the
    summary): the task tallies the values it names (`Task.tallied`), read back from the parts."""
    for p in wd.parts():
        if task.note_texts:   # a task that notes rows says what its notes mean
            _restore_notes(p, cfg, task.row_notes, result)
        names = pq.read_schema(p).names
        tallied = [k for k in task.tallied if prefix + k in names]
        cut = [n for n in names if n == prefix + TRUNCATED]
        t = pq.read_table(p, columns=[prefix + ERROR, *(prefix + k for k in tallied), *cut])
        for name in cut:
            result.truncated = (result.truncated or 0) + t.column(name).length() - \
                t.column(name).null_count
        for e in t.column(0).to_pylist():
            if e is not None:
                result.errors[error_code(e)] += 1
        if tallied:
            columns = [t.column(prefix + k).to_pylist() for k in tallied]
            for row in zip(*columns):
                result.add(task.tally(dict(zip(tallied, row))))


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


def _sink(cfg: RunConfig, wd: WorkDir | None, row_col: str) -> Sink:
    """Checkpoint parts in the work directory, or JSONL on stdout for `-o -`."""
    if wd is None:
        return StdoutWriter()
    return PartWriter(wd.path, cfg.part_rows, cfg.checkpoint_seconds, row_col)


def _process(cfg: RunConfig, task: Task, engine_factory: Callable[[], Engine],
             progress: Progress, result: RunResult, done: np.ndarray, wd: WorkDir | None,
             total: int | None | Future, sink: Sink) -> None:
    def emit_and_report(table: pa.Table) -> None:
        sink.add(table)
        progress.advance(len(table))

    t_load = time.monotonic()
    engine = _start(engine_factory, wd, progress)
    result.load_seconds = time.monotonic() - t_load
    result.data_parallel = engine.data_parallel
    # engines with run counts (Ray): every one the run started (a restarted one's too), whose
    # loads, replicas and rates go into the summary and provenance when the run ends
    ran: list[Engine] = [engine] if engine.run_counts is not None else []
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
                if engine.streams_rows:
                    engine.stream_rows(cfg, task, collector, done, sink, poll_total,
                                       budget=check_budget(task, engine), preparer=ChunkPreparer,
                                       check_columns=functools.partial(
                                           check_clash, task, cfg.prefix, too_long=cfg.too_long),
                                       set_total=lambda n: progress.set_total(
                                           selected_total(n, cfg)))
                else:
                    _stream_rows(cfg, task, engine, collector, done, sink, poll_total)
                break
            except EngineDied as e:
                sink.flush()
                saved = result.resumed_rows + result.new_rows
                restarts -= engine.restarts_used   # replicas restart themselves
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
                if engine.run_counts is not None and all(e is not engine for e in ran):
                    ran.append(engine)   # (a factory may hand back the same engine)
        sink.close()
    finally:
        if ran:
            result.cluster = ran[0].merge_counts(ran)
        progress.stop()
        if engine is not None:
            engine.close()
        if wd is not None:
            wd.forget_engine()


def _start(engine_factory: Callable[[], Engine], wd: WorkDir | None,
           progress: Progress | None = None) -> Engine:
    """Start the engine; record its processes in the work directory (for leftovers)."""
    engine = engine_factory()
    if not isinstance(engine, Engine):      # a factory handed to `run` directly
        engine = Plugged(engine)
    try:
        if progress is not None:
            engine.set_note(progress.note)  # replicas say when one restarts
        if wd is not None:
            wd.record_engine(engine.pids())
    except BaseException:                   # e.g. a full disk: the engine is not left running
        engine.close()
        raise
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
    task.check_tokenizer(engine.tokenizer)   # e.g. a GenRM's template must show the responses
    return budget


def _stream_rows(cfg: RunConfig, task: Task, engine: Engine, collector: Collector,
                 done: np.ndarray, sink: Sink, poll_total: Callable[[], None]
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
                sink.maybe_flush()
                poll_total()
        except BaseException:
            collector.save_finished(sink)
            raise
        collector.drain()
        if collector.queue:  # every request came back, so nothing may be left waiting
            raise RunError("internal error: rows left unfinished")
    finally:
        feeder.close()


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
    rows = [r for _, r in part_rows]
    every = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    meta["summary"] = result.summary() | {"rows": int(len(np.unique(every)))}
    schemas = [s.remove_metadata() for s in schemas]
    if not schemas:  # no row at all: the output still has the input's columns
        schemas = [pa.schema([*input_schema(list(cfg.inputs)),
                              pa.field(row_col, pa.int64()),
                              pa.field(cfg.prefix + ERROR, pa.string()),
                              *task.schema(cfg.prefix),
                              *([] if cfg.too_long == "error" else
                                [pa.field(cfg.prefix + TRUNCATED, pa.int64())])])]
    return merge_tables(cfg.output, parts_by_row(part_rows, row_col), schemas, meta)
