"""JSONL: detect, decompress (.gz, .zst), count rows, list columns, read chunks, write lines.

One input line is one row, numbered in file order, whatever the batch size: a blank line,
a line that is not JSON, or not a JSON object, is an error row in its place. Compressed
files are decompressed here, block by block, so what is read never depends on buffering:

- a file that breaks off (truncated, or damaged so that it cannot be decompressed) keeps
  every complete line before the break, then gets **one** error row
  `truncated_file:NAME` for the line that broke off;
- bytes after the end of a complete gzip/zstd stream that are not another stream
  ("trailing garbage", like `gzip -d` reports) add **no** row: every line was read; a
  warning names the file (logger `nfb.io`, and `Chunk.notes` of the file's last chunk);
- the codec is the one the file's first bytes name (gzip `1f 8b`, zstd `28 b5 2f fd`),
  whatever its name says: a `.jsonl.gz` that holds zstd data is read as zstd; a file named
  `.gz`/`.zst` whose bytes are neither is refused with one line (`InputError`);
- a line ends at LF, CRLF or a lone CR (old Mac files): JSON text never holds a raw CR;
- a line longer than `max_line_bytes` (default `MAX_LINE_BYTES`, 64 MiB; `--max-line-bytes`)
  is one error row `line_too_long:N bytes > LIMIT`; the reader skips the rest of it without
  holding it, so memory is bounded by the limit, not by the input;
- bytes that are not UTF-8 are replaced by U+FFFD and the row kept; each file's count of
  such lines is one warning (logger `nfb.io`, and `Chunk.notes`), never silent.
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
MAX_LINE_BYTES = 64 << 20   # the longest input line read (--max-line-bytes)
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


def sniff(head: bytes) -> str | None:
    """The codec the first bytes of a file name: 'gz', 'zst', or None (plain)."""
    if head.startswith(_GZ_MAGIC):
        return "gz"
    if head.startswith(_ZST_MAGIC) or _skippable(head):
        return "zst"
    return None


def _codec(path: str, head: bytes) -> str | None:
    """The codec to read `path` with: its bytes decide; a name that promises a codec the
    bytes do not have is an InputError (one line)."""
    kind = sniff(head)
    named = compression(path) if path != STDIN else None
    if kind is None and named is not None and head:
        want = "gzip" if named == "gz" else "zstd"
        raise InputError(f"{path}: the name says {want} but the file is not {want} data "
                         f"(it starts with {head[:4].hex(' ')}); rename or recompress it")
    if kind != named and head:
        log.info("%s: read as %s data (its first bytes), whatever its name says", path,
                 kind or "plain")
    return kind


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def check_readable(path: str) -> None:
    """Raise InputError now for what would fail later: a file whose name promises a codec
    its bytes do not have, or zstd data without `zstandard`."""
    if path == STDIN or not detect(path):
        return
    if storage.is_url(path):   # not read ahead from a store: its name decides until read
        if compression(path) == "zst" and _zstd() is None:
            raise InputError(f"{path}: reading .zst files needs the `zstandard` package "
                             "(pip install zstandard)")
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise InputError(f"{path}: {e.strerror or e}") from e
    if _codec(path, head) == "zst" and _zstd() is None:
        raise InputError(f"{path}: reading zstd data needs the `zstandard` package "
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
            head = b""
            while len(head) < 4 and (more := fh.read(4 - len(head))):
                head += more
            kind = _codec(self.path, head)
            if kind is None:
                if head:
                    yield head
                read = getattr(fh, "read1", fh.read)
                while block := read(_BLOCK):
                    yield block
                return
            yield from self._decompress(fh, kind, head)
        finally:
            if fh is not sys.stdin.buffer:
                fh.close()

    def _new(self, kind: str):
        if kind == "gz":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        z = _zstd()
        if z is None:
            raise InputError(f"{self.path}: reading zstd data needs the `zstandard` package "
                             "(pip install zstandard)")
        return z.ZstdDecompressor().decompressobj()

    def _decompress(self, fh, kind: str, head: bytes = b"") -> Iterator[bytes]:
        magic = _GZ_MAGIC if kind == "gz" else _ZST_MAGIC
        d = self._new(kind)
        started = False          # bytes of the current member/frame were fed
        pending = head           # compressed bytes not yet fed
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


def _blocks(stream: Stream) -> Iterator[bytes]:
    """The stream's blocks without a BOM, every line end (CRLF, lone CR) made LF: the one
    view of a file's lines that `lines` and `count_rows` share."""
    cr = False   # the previous block ended with CR: it may be the first half of CRLF
    for block in _without_bom(stream):
        if cr:
            block, cr = b"\r" + block, False
        if b"\r" in block:
            if block.endswith(b"\r"):
                block, cr = block[:-1], True
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if block:
            yield block
    if cr:
        yield b"\n"


class LongLine:
    """A line longer than the limit, in place of its bytes (which were not kept)."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size


def lines(stream: Stream, max_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes | LongLine]:
    """The file's lines without their line ends (a last line without one included; the
    partial line of a truncated file left out); a line over `max_bytes` comes as a
    `LongLine` (its size), read past without being held. Check `stream.status` afterwards."""
    pending: list[bytes] = []   # the start of the current line (while within the limit)
    size = 0                    # its bytes so far
    over = False                # the current line is past the limit: its bytes are dropped

    def whole(line: bytes) -> bytes | LongLine:
        return LongLine(len(line)) if len(line) > max_bytes else line

    for block in _blocks(stream):
        parts = block.split(b"\n")
        last = parts.pop()
        if parts:
            first = parts[0]
            if over or size + len(first) > max_bytes:
                yield LongLine(size + len(first))
            elif pending:
                yield b"".join(pending) + first
            else:
                yield first
            for line in parts[1:]:
                yield whole(line)
            pending, size, over = [], 0, False
        if last:
            size += len(last)
            if over:
                continue
            if size > max_bytes:
                pending, over = [], True
            else:
                pending.append(last)
    if size and stream.status != "truncated":
        yield LongLine(size) if over else b"".join(pending)


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
    value, err, _ = _parse(line)
    return value, err


def _parse(line: bytes) -> tuple[dict, str | None, bool]:
    """(row, error code or None, whether bytes that are not UTF-8 were replaced)."""
    if not line.strip():
        return {}, "blank_line", False
    replaced = False
    try:
        value = _loads(line)
    except (ValueError, RecursionError):
        try:  # orjson rejects invalid UTF-8 outright; keep the row if only the bytes are bad
            fixed = line.decode("utf-8", errors="replace").encode()
            value = _loads(fixed)
            replaced = True
        except (ValueError, RecursionError):
            return {}, "malformed_json", False
    if not isinstance(value, dict):
        return {}, "not_an_object", False
    return value, None, replaced


def _end_notes(path: str, stream: Stream, bad_utf8: int = 0, first_bad: int = 0
               ) -> list[str]:
    notes = []
    if bad_utf8:
        notes.append(f"{path}: {bad_utf8:,} line(s) hold bytes that are not UTF-8 (the first: "
                     f"line {first_bad + 1:,}); each bad byte was replaced by U+FFFD and the "
                     "row kept")
    if stream.status == "garbage":
        notes.append(f"{path}: {stream.garbage:,} bytes after the end of the compressed data "
                     "are not compressed data; ignored (every line before them was read)")
    for msg in notes:
        log.warning(msg)
    return notes


def read_chunks(path: str, start: int, batch_rows: int,
                max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Chunk]:
    """Chunks of at most `batch_rows` rows, numbered from `start`."""
    stream = Stream(path)
    name = os.path.basename(path) if path != STDIN else "stdin"
    rows: list[dict] = []
    errors: list[str | None] = []
    row = start
    batch_rows = max(1, batch_rows)
    bad_utf8 = first_bad = n = 0
    for line in lines(stream, max_line_bytes):
        if isinstance(line, LongLine):
            value, err = {}, f"line_too_long:{line.size} bytes > {max_line_bytes}"
        else:
            value, err, replaced = _parse(line)
            if replaced:
                if not bad_utf8:
                    first_bad = n
                bad_utf8 += 1
        n += 1
        rows.append(value)
        errors.append(err)
        if len(errors) >= batch_rows:
            yield Chunk(row, rows_to_table(rows), errors, rows)
            row += len(errors)
            rows, errors = [], []
    if stream.status == "truncated":
        rows.append({})
        errors.append(f"truncated_file:{name}")
    notes = _end_notes(path, stream, bad_utf8, first_bad)
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
    for block in _blocks(stream):
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
        if isinstance(line, LongLine):
            continue
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


__all__ = ["SUFFIXES", "OUTPUT_SUFFIXES", "MAX_LINE_BYTES", "Stream", "LongLine", "lines",
           "parse_line", "read_chunks", "count_rows", "columns", "jsonl_lines", "detect",
           "check_readable", "JSON"]
