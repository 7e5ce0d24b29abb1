"""JSONL: detect, decompress (.gz, .zst), count rows, list columns, read chunks, write lines.

One input line is one row, numbered in file order, whatever the batch size: a blank line,
a line that is not JSON, or not a JSON object, is an error row in its place. Compressed
files are decompressed here, block by block, so what is read never depends on buffering:

- a file that breaks off (truncated, or damaged so that it cannot be decompressed) keeps
  every complete line before the break, then gets **one** error row
  `truncated_file:NAME` for the line that broke off;
- bytes after the end of a complete gzip/zstd stream that are not another stream
  ("trailing garbage", like `gzip -d` reports) add **no** row: every line was read; a
  warning names the file (logger `nfb.io`, and `Chunk.notes` of the file's last chunk).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import zlib
from collections.abc import Iterator

import orjson
import pyarrow as pa

from nfb.errors import InputError
from nfb.io import storage
from nfb.io.arrow import JSON, is_json_field, json_default, json_text, rows_to_table
from nfb.io.base import STDIN, Chunk

SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz",
            ".jsonl.zst", ".ndjson.zst", ".json.zst")
OUTPUT_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
_BOM = b"\xef\xbb\xbf"
_BLOCK = 1 << 20
_ZBLOCK = 1 << 16      # compressed input per step: bounds the output of one step
_GZ_MAGIC = b"\x1f\x8b"
_ZST_MAGIC = b"\x28\xb5\x2f\xfd"
# an integer that may not fit in 64 bits: 19 digits in a row (found with two C passes)
_DIGITS = bytes.maketrans(b"0123456789", b"1111111111")
_DIGITS = bytes(b if b == ord("1") and i in range(48, 58) else 0x30
                for i, b in enumerate(_DIGITS))
_RUN = b"1" * 19
log = logging.getLogger("nfb.io")


def detect(path: str) -> bool:
    return path == STDIN or path.lower().endswith(SUFFIXES)


def compression(path: str) -> str | None:
    name = path.lower()
    if name.endswith(".gz"):
        return "gz"
    if name.endswith(".zst"):
        return "zst"
    return None


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def check_readable(path: str) -> None:
    """Raise InputError now for what would fail later (a .zst without `zstandard`)."""
    if compression(path) == "zst" and _zstd() is None:
        raise InputError(f"{path}: reading .zst files needs the `zstandard` package "
                         "(pip install zstandard)")


# --- decompressed bytes ------------------------------------------------------------------

class Stream:
    """The decompressed bytes of a file, in blocks; afterwards `status` says how it ended:
    'ok', 'truncated' (broke off or damaged) or 'garbage' (`garbage` bytes after the end)."""

    def __init__(self, path: str):
        self.path = path
        self.status = "ok"
        self.garbage = 0

    def _raw(self):
        if self.path == STDIN:
            return sys.stdin.buffer
        if storage.is_url(self.path):
            return storage.open_input(self.path)   # streamed from the store
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise InputError(f"{self.path}: {e.strerror or e}") from e

    def blocks(self) -> Iterator[bytes]:
        fh = self._raw()
        try:
            kind = compression(self.path) if self.path != STDIN else None
            if kind is None:
                read = getattr(fh, "read1", fh.read)
                while block := read(_BLOCK):
                    yield block
                return
            yield from self._decompress(fh, kind)
        finally:
            if fh is not sys.stdin.buffer:
                fh.close()

    def _new(self, kind: str):
        if kind == "gz":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        z = _zstd()
        if z is None:
            raise InputError(f"{self.path}: reading .zst files needs the `zstandard` package "
                             "(pip install zstandard)")
        return z.ZstdDecompressor().decompressobj()

    def _decompress(self, fh, kind: str) -> Iterator[bytes]:
        magic = _GZ_MAGIC if kind == "gz" else _ZST_MAGIC
        d = self._new(kind)
        started = False          # bytes of the current member/frame were fed
        pending = b""            # compressed bytes not yet fed
        eof = False
        errors = (zlib.error,) if kind == "gz" else (zlib.error, _zstd().ZstdError)
        while True:
            if not pending and not eof:
                pending = fh.read(_ZBLOCK)
                eof = not pending
            if d.eof:
                # one member/frame is complete: what follows is another one, padding, or
                # garbage
                rest = d.unused_data + pending
                while len(rest) < len(magic) and not eof:
                    more = fh.read(_ZBLOCK)
                    eof = not more
                    rest += more
                if not rest:
                    return
                if rest.startswith(magic) or (kind == "zst" and _skippable(rest)):
                    d, started, pending = self._new(kind), False, rest
                    continue
                tail = rest + b"".join(iter(lambda: fh.read(_BLOCK), b""))
                if kind == "gz" and not tail.strip(b"\x00"):
                    return   # gzip tolerates zero padding at the end
                self.status, self.garbage = "garbage", len(tail)
                return
            if not pending:
                if started:
                    self.status = "truncated"
                return
            try:
                out = d.decompress(pending)
            except errors:
                self.status = "truncated"
                return
            started = True
            pending = b""
            if out:
                yield out


def _skippable(b: bytes) -> bool:
    return len(b) >= 4 and b[1:4] == b"\x2a\x4d\x18" and 0x50 <= b[0] <= 0x5F


def _without_bom(stream: Stream) -> Iterator[bytes]:
    """The stream's blocks with a leading UTF-8 BOM removed (also one split across blocks)."""
    head = b""
    blocks = stream.blocks()
    for block in blocks:
        head += block
        if len(head) >= len(_BOM) or not _BOM.startswith(head):
            break
    if head.startswith(_BOM):
        head = head[len(_BOM):]
    if head:
        yield head
    yield from blocks


def lines(stream: Stream) -> Iterator[bytes]:
    """The file's lines without their line ends (a last line without one included; the
    partial line of a truncated file left out). Check `stream.status` afterwards."""
    rest = b""
    for block in _without_bom(stream):
        if rest:
            block = rest + block
        parts = block.split(b"\n")
        rest = parts.pop()
        for line in parts:
            yield line[:-1] if line.endswith(b"\r") else line
    if rest and stream.status != "truncated":
        yield rest[:-1] if rest.endswith(b"\r") else rest


def _loads(line: bytes):
    value = orjson.loads(line)
    if _RUN in line.translate(_DIGITS):
        # orjson turns integers beyond 64 bits into floats: parse exactly instead
        value = json.loads(line, parse_constant=_no_constant)
    return value


def _no_constant(name: str):
    raise ValueError(f"not JSON: {name}")


def parse_line(line: bytes) -> tuple[dict, str | None]:
    """(row, None), or ({}, error code)."""
    if not line.strip():
        return {}, "blank_line"
    try:
        value = _loads(line)
    except (ValueError, RecursionError):
        try:  # orjson rejects invalid UTF-8 outright; keep the row if only the bytes are bad
            value = _loads(line.decode("utf-8", errors="replace").encode())
        except (ValueError, RecursionError):
            return {}, "malformed_json"
    if not isinstance(value, dict):
        return {}, "not_an_object"
    return value, None


def _end_notes(path: str, stream: Stream) -> list[str]:
    if stream.status != "garbage":
        return []
    msg = (f"{path}: {stream.garbage:,} bytes after the end of the compressed data are not "
           "compressed data; ignored (every line before them was read)")
    log.warning(msg)
    return [msg]


def read_chunks(path: str, start: int, batch_rows: int) -> Iterator[Chunk]:
    """Chunks of at most `batch_rows` rows, numbered from `start`."""
    stream = Stream(path)
    name = os.path.basename(path) if path != STDIN else "stdin"
    rows: list[dict] = []
    errors: list[str | None] = []
    row = start
    batch_rows = max(1, batch_rows)
    for line in lines(stream):
        value, err = parse_line(line)
        rows.append(value)
        errors.append(err)
        if len(errors) >= batch_rows:
            yield Chunk(row, rows_to_table(rows), errors, rows)
            row += len(errors)
            rows, errors = [], []
    if stream.status == "truncated":
        rows.append({})
        errors.append(f"truncated_file:{name}")
    notes = _end_notes(path, stream)
    if errors or notes:
        chunk = Chunk(row, rows_to_table(rows), errors, rows)
        chunk.notes = notes
        yield chunk


def count_rows(path: str) -> int | None:
    """The rows `read_chunks` gives for `path` (None for stdin). Plain files are counted by
    their newlines; compressed ones are decompressed (no JSON parsing)."""
    if path == STDIN:
        return None
    stream = Stream(path)
    n, last = 0, b""
    for block in _without_bom(stream):
        if block:
            n += block.count(b"\n")
            last = block[-1:]
    if stream.status == "truncated":
        return n + 1
    return n + (1 if last and last != b"\n" else 0)


def columns(path: str) -> list[str]:
    """Every top-level key of every row, in first-seen order. Reads the whole file (one
    orjson parse per line); lines that are not JSON objects are skipped."""
    if path == STDIN:
        return []
    keys: dict[str, None] = {}
    loads = orjson.loads
    for line in lines(Stream(path)):
        try:
            v = loads(line)
        except orjson.JSONDecodeError:
            try:
                v = loads(line.decode("utf-8", errors="replace"))
            except orjson.JSONDecodeError:
                continue
        if type(v) is dict:
            for k in v:
                if k not in keys:
                    keys[k] = None
    return list(keys)


# --- writing ---------------------------------------------------------------------------------

def jsonl_lines(table: pa.Table) -> Iterator[bytes]:
    """One JSON line per row, keys in column order, nulls kept. JSON-text columns are written
    back verbatim; binary values as base64 strings; decimals as numbers."""
    json_cols = [f.name for f in table.schema if is_json_field(f)]
    frag = orjson.Fragment
    opts = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
    for batch in table.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            for c in json_cols:
                v = row[c]
                if v is not None:
                    row[c] = frag(v)
            try:
                yield orjson.dumps(row, default=json_default, option=opts)
            except (orjson.JSONEncodeError, TypeError):
                # nesting beyond orjson's limit: encode value by value
                yield orjson.dumps({k: v if isinstance(v, frag) else _fragment(v)
                                    for k, v in row.items()},
                                   default=json_default, option=opts)


def _fragment(v: object):
    return orjson.Fragment(json_text(v) or "null")


__all__ = ["SUFFIXES", "OUTPUT_SUFFIXES", "Stream", "lines", "parse_line", "read_chunks",
           "count_rows", "columns", "jsonl_lines", "detect", "check_readable", "JSON"]
