"""Stream input rows from JSONL(.gz/.zst), Parquet, globs, directories and stdin.

Rows come out in chunks of bounded size with a stable, global row number (`nfb_row`): the
n-th row of the n-th file keeps its number between runs, which is what resume relies on.
A bad line becomes an error row in place, never an exception: only a file that cannot be
opened at all raises `InputError` (checked up front by `resolve_inputs`).
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from nfb.io.arrow import empty_rows, rows_to_table

STDIN = "-"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz",
                  ".jsonl.zst", ".ndjson.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
_BOM = b"\xef\xbb\xbf"


from nfb.errors import InputError  # noqa: E402,F401


@dataclass
class Chunk:
    """Consecutive input rows: their Arrow table, row numbers, and reader errors."""

    first_row: int
    table: pa.Table            # the input columns, one row per input row (all-null on error)
    errors: list[str | None]   # a reader error per row (malformed_json, ...) or None
    rows: list[dict] | None = None  # the rows as Python dicts, when the reader had them

    def __len__(self) -> int:
        return len(self.errors)


def input_format(path: str) -> str:
    if path == STDIN:
        return "jsonl"
    name = path.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise InputError(
        f"{path}: unknown input format; nfb reads .jsonl, .jsonl.gz, .jsonl.zst and .parquet "
        "(or '-' for JSONL on stdin)")


def _dir_files(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
            if any(part.endswith(".nfb") for part in p.relative_to(root).parts):
                continue  # an nfb work directory inside the input folder
            out.append(str(p))
    return out


def resolve_inputs(specs: list[str]) -> list[str]:
    """Expand globs and directories into a sorted, de-duplicated list of files.

    Raises InputError for a path that does not exist, a glob that matches nothing, an
    unreadable file or an unknown extension, so that a typo fails before any model loads.
    """
    files: list[str] = []
    for spec in specs:
        if spec == STDIN:
            files.append(STDIN)
            continue
        if any(c in spec for c in "*?["):
            matches = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
            if not matches:
                raise InputError(f"{spec}: the pattern matches no file")
            files.extend(matches)
            continue
        p = Path(spec)
        if p.is_dir():
            found = _dir_files(p)
            if not found:
                raise InputError(f"{spec}: the directory holds no .jsonl/.jsonl.gz/.parquet file")
            files.extend(found)
        elif p.exists():
            files.append(spec)
        else:
            raise InputError(f"{spec}: no such file")
    seen: set[str] = set()
    unique = [f for f in files if not (f in seen or seen.add(f))]
    if unique.count(STDIN) and len(unique) > 1:
        raise InputError("'-' (stdin) cannot be combined with other inputs")
    for f in unique:
        input_format(f)
        if f != STDIN and not os.access(f, os.R_OK):
            raise InputError(f"{f}: permission denied")
    return unique


def _open_binary(path: str) -> io.BufferedIOBase:
    if path == STDIN:
        return sys.stdin.buffer
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise InputError(f"{path}: reading .zst needs `pip install zstandard`") from e
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _parse_line(line: bytes) -> tuple[dict, str | None]:
    if not line.strip():
        return {}, "blank_line"
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:  # orjson rejects invalid UTF-8 outright; keep the row if only the bytes are bad
            value = orjson.loads(line.decode("utf-8", errors="replace"))
        except orjson.JSONDecodeError:
            return {}, "malformed_json"
    if not isinstance(value, dict):
        return {}, "not_an_object"
    return value, None


def _jsonl_chunks(path: str, start: int, batch_rows: int) -> Iterator[Chunk]:
    try:
        fh = _open_binary(path)
    except OSError as e:
        raise InputError(f"{path}: {e.strerror or e}") from e
    rows: list[dict] = []
    errors: list[str | None] = []
    row = start
    first = True

    def flush() -> Chunk:
        nonlocal rows, errors, row
        chunk = Chunk(row, rows_to_table(rows), errors, rows)
        row += len(errors)
        rows, errors = [], []
        return chunk

    try:
        while True:
            try:
                line = fh.readline()
            except (EOFError, OSError, zlib.error):
                # a truncated or corrupt compressed stream: keep what was read, then one
                # error row says where the file broke off
                rows.append({})
                errors.append(f"truncated_file:{os.path.basename(path)}")
                break
            if not line:
                break
            if first:
                first = False
                if line.startswith(_BOM):
                    line = line[len(_BOM):]
            if line.endswith(b"\n"):
                line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            value, err = _parse_line(line)
            rows.append(value)
            errors.append(err)
            if len(errors) >= batch_rows:
                yield flush()
        if errors:
            yield flush()
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()


def _parquet_chunks(path: str, start: int, batch_rows: int) -> Iterator[Chunk]:
    row = start
    name = os.path.basename(path)
    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=batch_rows)
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise InputError(f"{path}: {e.strerror or e}") from e
        yield Chunk(row, empty_rows(1), [f"unreadable_file:{name}"])
        return
    except pa.ArrowException:
        yield Chunk(row, empty_rows(1), [f"unreadable_file:{name}"])
        return
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException):
            yield Chunk(row, empty_rows(1), [f"unreadable_file:{name}"])
            return
        table = pa.Table.from_batches([batch])
        yield Chunk(row, table, [None] * len(table))
        row += len(table)


def read_chunks(files: list[str], batch_rows: int = 1024) -> Iterator[Chunk]:
    """Chunks of at most `batch_rows` rows from each file in turn, numbered from 0."""
    row = 0
    for path in files:
        reader = _parquet_chunks if input_format(path) == "parquet" else _jsonl_chunks
        for chunk in reader(path, row, batch_rows):
            row += len(chunk)
            yield chunk
