"""The feeder: reads, validates and tokenizes chunks ahead of the engine, and turns them into
the engine's requests."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from nfb.config import RunConfig
from nfb.io.readers import Chunk, read_chunks
from nfb.io.writers import Sink
from nfb.prompts import render
from nfb.records import to_conversation
from nfb.run.collect import Collector, _Pending
from nfb.run.fit import Fitter, prompt_chars
from nfb.tasks.base import Task


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
        row_fields = task.row_fields   # e.g. a per-row principle
        notes = bool(task.note_texts)  # e.g. SteerLM's left-out system turn
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
            if err is None:
                err = task.check_conversation(conv)
            if err is not None:
                failed.append((j, err))
                continue
            if notes:
                codes = task.row_notes(conv)
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


def _requests(feeder: Feeder, collector: Collector, sink: Sink
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
