"""Stream input rows from JSONL(.gz/.zst), Parquet, `datasets` save_to_disk directories
(Arrow), globs, directories, stdin and object stores (s3://..., see `nfb.io.storage`).

Rows come out in chunks of bounded size with a stable, global row number (`nfb_row`): the
n-th row of the n-th file keeps its number between runs and whatever the batch size, which
is what resume relies on. A bad line becomes an error row in place, never an exception: only
a file that cannot be opened at all raises `InputError` (checked up front by
`resolve_inputs`). What each format knows lives in `nfb.io.jsonl` and `nfb.io.parquet`;
this module picks the format and walks the files.

Globs are expanded as `glob.glob(recursive=True)` does (hidden names need a pattern that
starts with '.'), except that `**` never descends into a symbolic link to a directory, so a
link loop cannot make it walk forever; a link named by a plain or `*` segment is followed
(once: the pattern has a fixed depth). A directory input is walked the same way.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from nfb.errors import InputError
from nfb.io import hfdisk, jsonl, parquet, storage
from nfb.io.arrow import unify_schemas
from nfb.io.base import STDIN, Chunk

JSONL_SUFFIXES = jsonl.SUFFIXES
PARQUET_SUFFIXES = parquet.SUFFIXES

__all__ = ["STDIN", "Chunk", "InputError", "JSONL_SUFFIXES", "PARQUET_SUFFIXES",
           "input_format", "resolve_inputs", "read_chunks", "count_rows", "input_columns",
           "input_schema", "empty_input_table"]


def input_format(path: str) -> str:
    if path == STDIN:
        return "jsonl"
    if parquet.detect(path):
        return "parquet"
    if jsonl.detect(path):
        return "jsonl"
    if hfdisk.detect(path):
        return "arrow"
    raise InputError(
        f"{path}: unknown input format; nfb reads .jsonl, .jsonl.gz, .jsonl.zst, .parquet and "
        "datasets' save_to_disk directories (or '-' for JSONL on stdin)")


def _module(path: str):
    return {"parquet": parquet, "arrow": hfdisk}.get(input_format(path), jsonl)


def _dir_files(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*")):   # pathlib's ** follows no directory symlink
        if p.is_file() and p.name.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
            if any(part.endswith(".nfb") for part in p.relative_to(root).parts):
                continue  # an nfb work directory inside the input folder
            out.append(str(p))
    return out


def _without(files: list[str], exclude: str | None) -> list[str]:
    """`files` less the output `exclude` and anything in its work directory."""
    if not exclude or exclude == STDIN:
        return files
    from nfb.io.outputs import inside, same_file
    from nfb.io.storage import is_url
    wd = exclude + ".nfb"
    return [f for f in files if not inside(f, wd)
            and not ((is_url(exclude) or os.path.exists(exclude)) and same_file(f, exclude))]


def _names(d: str, hidden: bool, dirs_only: bool = False) -> list[str]:
    """Entry names of directory `d` ([] when it cannot be listed); `dirs_only`: real
    directories, not symbolic links to them."""
    try:
        with os.scandir(d) as it:
            entries = list(it)
    except OSError:
        return []
    out = []
    for e in entries:
        if not hidden and e.name.startswith("."):
            continue
        try:
            if dirs_only and not e.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        out.append(e.name)
    return out


def _walk(base: str, segs: list[str]) -> Iterator[str]:
    """Paths under `base` matching the pattern segments `segs`."""
    if not segs:
        yield base
        return
    seg, rest = segs[0], segs[1:]
    d = base or os.curdir
    if seg == "**":
        yield from _walk(base, rest)          # zero directories
        if not rest:                          # '**' last: every file below, too
            for name in _names(d, hidden=False):
                yield os.path.join(base, name)
        for name in _names(d, hidden=False, dirs_only=True):
            yield from _walk(os.path.join(base, name), segs)
    elif glob.has_magic(seg):
        for name in _names(d, hidden=seg.startswith(".")):
            if fnmatch.fnmatchcase(name, seg):
                yield from _walk(os.path.join(base, name), rest)
    else:
        p = os.path.join(base, seg)
        if os.path.lexists(p):
            yield from _walk(p, rest)


def glob_files(spec: str) -> list[str]:
    """The files a glob pattern matches, sorted (see the module's note on `**`)."""
    parts = spec.split(os.sep)
    i = 0
    while i < len(parts) and not glob.has_magic(parts[i]):
        i += 1
    root = os.sep.join(parts[:i]) or (os.sep if spec.startswith(os.sep) else "")
    segs = [p for p in parts[i:] if p]
    return sorted({m for m in _walk(root, segs) if os.path.isfile(m)})


def resolve_inputs(specs: list[str], exclude: str | None = None) -> list[str]:
    """Expand globs and directories into a sorted, de-duplicated list of files.

    `exclude`: the run's own output, left out of what globs and directories match (an
    output written into its input folder is never read back as input; named on its own it
    is kept, and the caller refuses it).

    Raises InputError for a path that does not exist, a glob that matches nothing, an
    unreadable file, an unknown extension, or a .zst file without `zstandard`, so that a
    typo fails before any model loads.
    """
    files: list[str] = []
    for spec in specs:
        if spec == STDIN:
            files.append(STDIN)
            continue
        if storage.is_url(spec):   # s3://, gs://, hf://...: globs and prefixes as directories
            files.extend(_without(_url_files(spec), exclude))
            continue
        if any(c in spec for c in "*?["):
            matches = glob_files(spec)
            if not matches:
                raise InputError(f"{spec}: the pattern matches no file")
            files.extend(_without(matches, exclude))
            continue
        p = Path(spec)
        saved = hfdisk.dataset_files(spec, os.path.exists) if p.is_dir() else None
        if saved is not None:   # written by datasets' save_to_disk
            files.extend(saved)
        elif p.is_dir():
            found = _without(_dir_files(p), exclude)
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
        if storage.is_url(f):
            storage.check_file(f)   # denied or unreachable: now, not mid-run
        elif f != STDIN and not os.access(f, os.R_OK):
            raise InputError(f"{f}: permission denied")
        jsonl.check_readable(f)
    return unique


def _url_files(spec: str) -> list[str]:
    """The input files a store URL stands for (a save_to_disk prefix included)."""
    if not any(c in spec for c in "*?[") and not spec.lower().endswith(
            JSONL_SUFFIXES + PARQUET_SUFFIXES + hfdisk.SUFFIXES):
        saved = hfdisk.dataset_files(spec, storage.exists)
        if saved is not None:
            return saved
    return storage.expand(spec, JSONL_SUFFIXES + PARQUET_SUFFIXES)


def read_chunks(files: list[str], batch_rows: int = 1024,
                max_line_bytes: int = jsonl.MAX_LINE_BYTES) -> Iterator[Chunk]:
    """Chunks of at most `batch_rows` rows from each file in turn, numbered from 0.

    The rows and their numbers are the same whatever `batch_rows` is; a chunk never spans
    two files. A JSONL line over `max_line_bytes` is one `line_too_long` error row.
    """
    row = 0
    for path in files:
        if input_format(path) == "jsonl":
            chunks = jsonl.read_chunks(path, row, batch_rows, max_line_bytes)
        else:
            chunks = _module(path).read_chunks(path, row, batch_rows)
        for chunk in chunks:
            row += len(chunk)
            yield chunk


def count_rows(files: list[str]) -> int | None:
    """The number of rows `read_chunks` gives for `files`, or None for stdin.

    Parquet: footers only. Plain JSONL: a scan for newlines (no parsing). .gz/.zst: a
    decompression pass (no parsing; about as long as decompressing the file).
    """
    total = 0
    for f in files:
        n = _module(f).count_rows(f)
        if n is None:
            return None
        total += n
    return total


def input_columns(files: list[str]) -> list[str]:
    """Every top-level column of the inputs, in first-seen order: Parquet footers, and
    every key of every line of each JSONL file (reads those files whole: one orjson parse
    per line). Stdin and unreadable files add nothing."""
    names: dict[str, None] = {}
    for f in files:
        if f == STDIN:
            continue
        try:
            names.update(dict.fromkeys(_module(f).columns(f)))
        except InputError:
            continue
    return list(names)


def input_schema(files: list[str]) -> pa.Schema:
    """The Parquet inputs' unified schema, then any JSONL-only column (type null).

    For outputs of zero rows, which must still carry the input's columns. Reads each JSONL
    file whole (see `input_columns`)."""
    schemas = []
    for f in files:
        if f != STDIN and input_format(f) in ("parquet", "arrow"):
            s = _module(f).schema(f)
            if s is not None:
                schemas.append(s)
    s = unify_schemas(schemas)
    extra = [n for n in input_columns([f for f in files if input_format(f) == "jsonl"])
             if n not in s.names]
    return pa.schema([*s, *(pa.field(n, pa.null()) for n in extra)])


def empty_input_table(files: list[str]) -> pa.Table:
    """A zero-row table with the inputs' columns (see `input_schema`)."""
    return input_schema(files).empty_table()
