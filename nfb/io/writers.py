"""Output: checkpoint parts written atomically, the final ordered merge, JSONL/Parquet.

Parts are Parquet files of finished rows in input order, each made visible by an atomic
rename after an fsync, so a reader (resume) sees whole parts or nothing. The final output is
written to a temporary name and renamed into place; its format follows the extension.
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from nfb.io.arrow import conform, unify_schemas

META_KEY = b"nfb"
STDOUT = "-"
OUTPUT_SUFFIXES = (".parquet", ".pq", ".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


def output_format(path: str) -> str:
    """'parquet', 'jsonl' or 'jsonl.gz' from the output's name ('-' is JSONL on stdout)."""
    if path == STDOUT:
        return "jsonl"
    name = path.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl.gz", ".ndjson.gz")):
        return "jsonl.gz"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise ValueError(f"{path}: the output name must end in .parquet, .jsonl or .jsonl.gz "
                     "(or be '-' for JSONL on stdout)")


def _fsync_dir(path: Path) -> None:
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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               META_KEY: orjson.dumps(metadata)})
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_default(v: object) -> object:
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, tuple):  # map<k, v> entries
        return list(v)
    return str(v)


def jsonl_lines(table: pa.Table) -> Iterator[bytes]:
    """One JSON line per row; all nulls are kept, keys in column order."""
    for batch in table.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            yield orjson.dumps(row, default=_json_default,
                               option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)


class OutputWriter:
    """Streams tables into one output file (Parquet, JSONL, JSONL.gz or stdout)."""

    def __init__(self, path: str, schema: pa.Schema, metadata: dict | None):
        self.path = path
        self.format = output_format(path)
        self.schema = schema
        self.metadata = metadata
        self.rows = 0
        if path == STDOUT:
            self._tmp = None
            self._fh: io.BufferedIOBase = sys.stdout.buffer
        else:
            p = Path(path)
            self._tmp = p.with_name(f".{p.name}.tmp")
            raw = open(self._tmp, "wb")
            self._fh = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) \
                if self.format == "jsonl.gz" else raw
            self._raw = raw
        self._pq: pq.ParquetWriter | None = None
        if self.format == "parquet":
            full = schema.with_metadata({**(schema.metadata or {}),
                                         META_KEY: orjson.dumps(metadata or {})})
            self._pq = pq.ParquetWriter(self._fh, full, compression="zstd")

    def write(self, table: pa.Table) -> None:
        if len(table) == 0:
            return
        if self._pq is not None:
            table = conform(table, self.schema)
            self._pq.write_table(table, row_group_size=64 * 1024)
        else:  # JSONL has no schema to hold: each row keeps its own values
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
        os.replace(self._tmp, self.path)
        _fsync_dir(Path(self.path).parent)
        if self.format != "parquet" and self.metadata is not None:
            side = Path(sidecar_path(self.path))
            tmp = side.with_name(f".{side.name}.tmp")
            tmp.write_bytes(orjson.dumps(self.metadata, option=orjson.OPT_INDENT_2))
            os.replace(tmp, side)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close on success; on any error remove the temporary file (OUT stays untouched)."""
        if exc_type is None:
            self.close()
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
            finally:
                self._tmp.unlink(missing_ok=True)


def sidecar_path(path: str) -> str:
    """Where a JSONL output's provenance goes (Parquet keeps it in its footer)."""
    return f"{path}.nfb.json"


def read_metadata(path: str) -> dict | None:
    """The nfb provenance of an output file, or None if it has none."""
    try:
        if output_format(path) == "parquet":
            meta = pq.read_schema(path).metadata or {}
            raw = meta.get(META_KEY)
            return orjson.loads(raw) if raw else None
        side = Path(sidecar_path(path))
        return orjson.loads(side.read_bytes()) if side.exists() else None
    except (OSError, ValueError, pa.ArrowException):
        return None


def merge_tables(path: str, sources: Iterable[Iterable[pa.Table]] | list[str],
                 schemas: list[pa.Schema], metadata: dict | None) -> int:
    """Write the concatenation of `sources` to `path` under one unified schema."""
    with OutputWriter(path, unify_schemas(schemas), metadata) as writer:
        for src in sources:
            for table in src:
                writer.write(table)
    return writer.rows


class PartWriter:
    """Buffers finished rows and writes them as checkpoint parts.

    A part is flushed when it holds `part_rows` rows or `seconds` have passed since the last
    one, whichever comes first, so a kill loses at most that much work.
    """

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
