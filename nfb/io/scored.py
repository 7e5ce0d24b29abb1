"""Reading nfb outputs back (filter, stats, merge): streamed tables and provenance."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nfb.io.readers import InputError, input_format, read_chunks, resolve_inputs
from nfb.io.writers import read_metadata


def scored_files(specs: list[str]) -> list[str]:
    """Resolved files; stdin ('-') is spooled to a temporary file, since filter and stats read
    their input more than once (schema, best-of-n)."""
    files = resolve_inputs(specs)
    if files == ["-"]:
        tmp = tempfile.NamedTemporaryFile(prefix="nfb-stdin-", suffix=".jsonl", delete=False)
        atexit.register(lambda: os.unlink(tmp.name) if os.path.exists(tmp.name) else None)
        with tmp:
            shutil.copyfileobj(sys.stdin.buffer, tmp, 1 << 20)
        files = [tmp.name]
    return files


def iter_tables(path: str, batch_rows: int = 16_384,
                columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows of one scored file in batches (Parquet, or JSONL written by nfb)."""
    if input_format(path) == "parquet":
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            yield pa.Table.from_batches([batch])
        return
    for chunk in read_chunks([path], batch_rows):
        bad = [e for e in chunk.errors if e]
        if bad:
            raise InputError(f"{path}: row {chunk.first_row + chunk.errors.index(bad[0])} is "
                             f"not valid JSON ({bad[0]}); is this an nfb output?")
        t = chunk.table
        if columns:
            t = t.select([c for c in columns if c in t.column_names])
        yield t


def metadata(path: str) -> dict:
    return (read_metadata(path) or {}) if path != "-" else {}


def schema_names(path: str) -> list[str]:
    if input_format(path) == "parquet":
        return pq.read_schema(path).names
    first = next(iter_tables(path, 256), None)
    return first.column_names if first is not None else []


def unified_schema(files: list[str]) -> pa.Schema:
    """One schema for all rows of `files`: Parquet footers, or a full pass over JSONL."""
    from nfb.io.arrow import unify_schemas

    schemas = []
    for f in files:
        if input_format(f) == "parquet":
            schemas.append(pq.read_schema(f).remove_metadata())
        else:
            schemas.extend(t.schema for t in iter_tables(f))
    return unify_schemas(schemas)
