"""Parquet: detect, count rows, schema, read chunks by row group, write atomically, footer
metadata.

Rows are read one row group at a time, and numbered from the footer's row counts, so the
numbering never depends on the batch size or on damage:

- a file whose footer cannot be read is one error row `unreadable_file:NAME`;
- a row group that cannot be decoded gives one error row per row the footer gives it,
  `unreadable_row_group:NAME:I` (I counts from 0); the other groups come through.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from nfb.errors import InputError
from nfb.io import storage
from nfb.io.arrow import empty_rows
from nfb.io.base import Chunk, slice_chunks

SUFFIXES = (".parquet", ".pq")
META_KEY = b"nfb"
_GROUP_BATCH = 64 * 1024          # rows decoded at a time inside a row group
_GROUP_BUFFER = 512 << 20         # a row group is all-or-nothing up to this many bytes


def detect(path: str) -> bool:
    return path.lower().endswith(SUFFIXES)


def _open(path: str) -> pq.ParquetFile | None:
    """The file, or None when its footer cannot be read (raises InputError if it cannot be
    opened at all)."""
    try:
        return pq.ParquetFile(storage.source(path))
    except (FileNotFoundError, PermissionError) as e:
        raise InputError(f"{path}: {e.strerror or e}") from e
    except (OSError, pa.ArrowException, ValueError, TypeError):
        return None


def count_rows(path: str) -> int:
    """The rows `read_chunks` gives for `path`: the footer's count (1 if unreadable)."""
    pf = _open(path)
    if pf is None:
        return 1
    try:
        return sum(pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups))
    except (OSError, pa.ArrowException, ValueError):  # pragma: no cover - checked on open
        return 1


def schema(path: str) -> pa.Schema | None:
    """The file's Arrow schema without metadata, or None when the footer is unreadable."""
    pf = _open(path)
    if pf is None:
        return None
    try:
        return pf.schema_arrow.remove_metadata()
    except (pa.ArrowException, ValueError):  # pragma: no cover
        return None


def columns(path: str) -> list[str]:
    s = schema(path)
    return s.names if s is not None else []


def _group_tables(pf: pq.ParquetFile, i: int, name: str, schema: pa.Schema
                  ) -> Iterator[tuple[pa.Table, list[str | None]]]:
    """Row group `i` as (table, errors) runs: all of it, or error rows where it failed."""
    expected = pf.metadata.row_group(i).num_rows
    buf: list[pa.Table] = []
    buffered = done = 0
    reason = f"unreadable_row_group:{name}:{i}"
    if len(schema) == 0:   # rows without columns (Arrow cannot decode them: nothing to)
        if expected:
            yield empty_rows(expected), [None] * expected
        return
    try:
        for batch in pf.iter_batches(batch_size=_GROUP_BATCH, row_groups=[i],
                                     use_threads=False):
            t = pa.Table.from_batches([batch]).replace_schema_metadata(None)
            buf.append(t)
            buffered += t.nbytes
            if buffered > _GROUP_BUFFER:   # a huge group: pass on what decoded so far
                for t in buf:
                    if done + len(t) > expected:
                        raise ValueError("more rows than the footer says")
                    yield t, [None] * len(t)
                    done += len(t)
                buf, buffered = [], 0
        got = sum(len(t) for t in buf)
        if done + got != expected:
            raise ValueError("row count differs from the footer")
    except (OSError, pa.ArrowException, ValueError, TypeError, IndexError, MemoryError):
        left = expected - done
        if left > 0:
            yield _null_table(schema, left), [reason] * left
        return
    for t in buf:
        yield t, [None] * len(t)
        done += len(t)


def _null_table(schema: pa.Schema, n: int) -> pa.Table:
    try:
        return pa.Table.from_arrays([pa.nulls(n, f.type) for f in schema], schema=schema)
    except (pa.ArrowException, ValueError, TypeError):  # pragma: no cover
        return empty_rows(n)


def read_chunks(path: str, start: int, batch_rows: int) -> Iterator[Chunk]:
    name = os.path.basename(path)
    pf = _open(path)
    sch = None
    if pf is not None:
        try:
            sch = pf.schema_arrow.remove_metadata()
            groups = pf.num_row_groups
        except (pa.ArrowException, ValueError, OSError):
            pf = None
    if pf is None:
        yield Chunk(start, empty_rows(1), [f"unreadable_file:{name}"])
        return
    row = start
    pending: list[pa.Table] = []
    errors: list[str | None] = []
    batch_rows = max(1, batch_rows)

    def flush(upto: int) -> Iterator[Chunk]:
        """Emit whole batches of the pending rows (all of them with upto=0)."""
        nonlocal row, pending, errors
        n = len(errors)
        cut = n - n % batch_rows if upto else n
        if cut == 0:
            return
        table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
        yield from slice_chunks(row, table.slice(0, cut), errors[:cut], batch_rows)
        row += cut
        rest = table.slice(cut)
        pending = [rest] if len(rest) else []
        errors = errors[cut:]

    for i in range(groups):
        for table, errs in _group_tables(pf, i, name, sch):
            pending.append(table)
            errors.extend(errs)
            if errs and errs[0] is not None:   # reopen: a failed read may leave state behind
                pf = _open(path) or pf
            if len(errors) >= batch_rows:
                yield from flush(1)
    if errors:
        yield from flush(0)


# --- writing -------------------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_parquet(table: pa.Table, path: Path, metadata: dict | None = None) -> None:
    """Write `table` to `path` so that the file appears whole or not at all."""
    from nfb.io.outputs import temp_path

    path = Path(path)
    tmp = temp_path(path)
    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               META_KEY: orjson.dumps(metadata)})
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_metadata(path: str) -> dict | None:
    """The nfb provenance in a Parquet file's footer, or None."""
    try:
        raw = (pq.read_schema(storage.source(path)).metadata or {}).get(META_KEY)
        return orjson.loads(raw) if raw else None
    except (OSError, ValueError, pa.ArrowException):
        return None


def writer(fh, schema: pa.Schema, metadata: dict | None) -> pq.ParquetWriter:
    full = schema.with_metadata({**(schema.metadata or {}),
                                 META_KEY: orjson.dumps(metadata or {})})
    return pq.ParquetWriter(fh, full, compression="zstd")
