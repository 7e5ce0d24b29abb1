"""Output: checkpoint parts written atomically, the final ordered merge, JSONL/Parquet.

Parts are Parquet files of finished rows in input order, each made visible by an atomic
rename after an fsync, so a reader (resume) sees whole parts or nothing. The final output is
written to a temporary name and renamed into place: that rename is the moment the run is
done. Its format follows the extension. Parquet keeps the provenance in its footer; JSONL in
`OUT.nfb.json`, written before OUT is renamed into place (an old OUT is removed first), so an
OUT beside a sidecar always belongs to it.

Every table written is conformed to the output's unified schema, so a value never depends on
the part or batch it came in (see `nfb.io.arrow`), and JSONL output writes JSON-text columns
back verbatim.
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import orjson
import pyarrow as pa

from nfb.errors import UsageError
from nfb.io import parquet, storage
from nfb.io.arrow import conform, unify_schemas
from nfb.io.jsonl import jsonl_lines
from nfb.io.outputs import temp_path
from nfb.io.parquet import META_KEY, atomic_parquet, fsync_dir

STDOUT = "-"
OUTPUT_SUFFIXES = (".parquet", ".pq", ".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")

__all__ = ["STDOUT", "META_KEY", "OUTPUT_SUFFIXES", "OutputWriter", "PartWriter", "StdoutWriter",
           "merge_tables", "read_metadata", "output_format", "sidecar_path", "atomic_parquet",
           "jsonl_lines"]


def output_format(path: str) -> str:
    """'parquet', 'jsonl' or 'jsonl.gz' from the output's name ('-' is JSONL on stdout).

    Raises UsageError (a ValueError, exit 2) for any other name."""
    if path == STDOUT:
        return "jsonl"
    name = path.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl.gz", ".ndjson.gz")):
        return "jsonl.gz"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise UsageError(f"{path}: the output name must end in .parquet, .jsonl or .jsonl.gz "
                     "(or be '-' for JSONL on stdout)")


class OutputWriter:
    """Streams tables into one output file (Parquet, JSONL, JSONL.gz or stdout).

    Tables are conformed to `schema` (for JSONL, columns not in it follow; an empty schema
    leaves each table as it is)."""

    def __init__(self, path: str, schema: pa.Schema, metadata: dict | None):
        self.path = path
        self.format = output_format(path)
        self.schema = schema
        self.metadata = metadata
        self.rows = 0
        self._pq = None
        self._remote = storage.is_url(path)
        if path == STDOUT:
            self._tmp = None
            self._fh: io.BufferedIOBase = sys.stdout.buffer
        else:
            p = Path(path)
            # a store URL: written here, uploaded in one step when complete (see storage);
            # a local file: a temporary name unique to this process (two writers never share it)
            self._tmp = storage.staging_file(path) if self._remote else temp_path(p)
            raw = open(self._tmp, "wb")
            self._fh = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) \
                if self.format == "jsonl.gz" else raw
            self._raw = raw
        if self.format == "parquet":
            self._pq = parquet.writer(self._fh, schema, metadata)

    def write(self, table: pa.Table) -> None:
        if self._pq is not None:
            if len(table) == 0:
                return
            self._pq.write_table(conform(table, self.schema), row_group_size=64 * 1024)
        else:
            if len(table) == 0:
                return
            if len(self.schema):
                table = conform(table, self.schema, keep_extra=True)
            for line in jsonl_lines(table):
                self._fh.write(line)
            if self._tmp is None:
                self._fh.flush()
        self.rows += len(table)

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()
        if self._tmp is None:
            self._fh.flush()
            return
        if self._fh is not self._raw:
            self._fh.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        if self._remote:
            try:
                self._upload()
            finally:
                self._tmp.unlink(missing_ok=True)
            return
        out = Path(self.path)
        if self.format != "parquet":
            side = Path(sidecar_path(self.path))
            tmp = None
            if self.metadata is not None:   # written first: a failure leaves OUT as it was
                tmp = temp_path(side)
                try:
                    with open(tmp, "wb") as fh:
                        fh.write(orjson.dumps(self.metadata, option=orjson.OPT_INDENT_2))
                        fh.flush()
                        os.fsync(fh.fileno())
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
            side.unlink(missing_ok=True)        # an old sidecar never describes the new OUT
            if tmp is not None:
                out.unlink(missing_ok=True)     # nor does the new sidecar the old OUT
                os.replace(tmp, side)
        os.replace(self._tmp, self.path)        # the commit point
        fsync_dir(out.parent)

    def _upload(self) -> None:
        """The store's commit point: one PUT of the whole file (JSONL: its sidecar first,
        after removing an old OUT, as for a local output)."""
        if self.format != "parquet":
            side = sidecar_path(self.path)
            storage.remove(side)
            if self.metadata is not None:
                storage.remove(self.path)
                storage.write_bytes(side, orjson.dumps(self.metadata,
                                                       option=orjson.OPT_INDENT_2))
        storage.upload(self._tmp, self.path)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close on success; on any error remove the temporary file (OUT stays untouched)."""
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()

    def abort(self) -> None:
        try:
            if self._pq is not None:
                self._pq.close()
        except Exception:  # noqa: BLE001
            pass
        if self._tmp is not None:
            try:
                self._raw.close()
            except OSError:
                pass
            finally:
                self._tmp.unlink(missing_ok=True)


def sidecar_path(path: str) -> str:
    """Where a JSONL output's provenance goes (Parquet keeps it in its footer)."""
    return f"{path}.nfb.json"


def read_metadata(path: str) -> dict | None:
    """The nfb provenance of an output file, or None if it has none."""
    try:
        fmt = output_format(path)
    except ValueError:
        return None
    if fmt == "parquet":
        return parquet.read_metadata(path)
    if storage.is_url(path):
        raw = storage.read_bytes(sidecar_path(path))
        try:
            return orjson.loads(raw) if raw else None
        except ValueError:
            return None
    try:
        side = Path(sidecar_path(path))
        return orjson.loads(side.read_bytes()) if side.exists() else None
    except (OSError, ValueError):
        return None


def merge_tables(path: str, sources: Iterable[Iterable[pa.Table]] | list[str],
                 schemas: list[pa.Schema], metadata: dict | None) -> int:
    """Write the concatenation of `sources` to `path` under one unified schema.

    The columns nfb added (`metadata["columns"]`, the provenance's list) come last, in
    that order, so the column order never depends on where chunks or parts were cut."""
    schema = unify_schemas(schemas)
    added = [c for c in (metadata or {}).get("columns") or [] if c in schema.names]
    if added:
        schema = pa.schema([*(f for f in schema if f.name not in added),
                            *(schema.field(c) for c in added)])
    with OutputWriter(path, schema, metadata) as writer:
        for src in sources:
            for table in src:
                writer.write(table)
    return writer.rows


class Sink(Protocol):
    """Where a run's finished rows go, in input order (the run is handed one)."""

    checkpoints: bool      # rows written here are kept for a resume

    def add(self, table: pa.Table) -> None: ...
    def maybe_flush(self) -> None: ...     # when a checkpoint is due
    def flush(self) -> None: ...           # keep everything added so far
    def close(self) -> None: ...           # the run is over


class StdoutWriter:
    """`-o -`: JSONL rows to stdout as soon as they are in order (no checkpoint)."""

    checkpoints = False

    def __init__(self):
        self._writer: OutputWriter | None = None

    def add(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = OutputWriter(STDOUT, table.schema, None)
        self._writer.schema = table.schema  # JSONL: each chunk keeps its own columns
        self._writer.write(table)

    def maybe_flush(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class PartWriter:
    """Buffers finished rows and writes them as checkpoint parts.

    A part is flushed when it holds `part_rows` rows or `seconds` have passed since the last
    one, whichever comes first, so a kill loses at most that much work. Where parts are cut
    never changes the final output.
    """

    checkpoints = True

    def __init__(self, directory: Path, part_rows: int, seconds: float, row_column: str):
        self.dir = Path(directory)
        self.row_column = row_column
        self.part_rows = part_rows
        self.seconds = seconds
        self._buf: list[pa.Table] = []
        self._buf_rows = 0
        self._last = time.monotonic()
        self.written_rows = 0
        self.parts = 0

    def add(self, table: pa.Table) -> None:
        if len(table):
            self._buf.append(table)
            self._buf_rows += len(table)
        if self._buf_rows >= self.part_rows:
            self.flush()
        else:
            self.maybe_flush()

    def maybe_flush(self) -> None:
        if self._buf_rows and time.monotonic() - self._last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._buf_rows:
            return
        schema = unify_schemas(t.schema for t in self._buf)
        table = pa.concat_tables([conform(t, schema) for t in self._buf])
        first = table.column(self.row_column)[0].as_py()
        atomic_parquet(table, self.dir / f"part-{first:012d}.parquet")
        self.written_rows += self._buf_rows
        self.parts += 1
        self._buf, self._buf_rows = [], 0

    def close(self) -> None:
        self.flush()
