"""Hugging Face `datasets` directories (`Dataset.save_to_disk`) and their Arrow files.

Such a directory holds `state.json` (its `_data_files` list the shards in order),
`dataset_info.json` and the shards, `data-00000-of-0000N.arrow`: Arrow IPC *stream* files
(the IPC file format is read too). A `DatasetDict` saved the same way holds
`dataset_dict.json` and one such directory per split; nfb reads one split at a time.

Rows are numbered in shard order. A shard that breaks off keeps the rows of every complete
record batch before the break, then one error row `truncated_file:NAME`, like a truncated
compressed JSONL file. Read with pyarrow only (the `datasets` package is not needed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import orjson
import pyarrow as pa

from nfb.errors import InputError
from nfb.io import storage
from nfb.io.arrow import empty_rows
from nfb.io.base import Chunk, slice_chunks

SUFFIXES = (".arrow",)
STATE, DICT = "state.json", "dataset_dict.json"


def detect(path: str) -> bool:
    return path.lower().endswith(SUFFIXES)


def _read_json(path: str) -> dict | None:
    try:
        raw = storage.read_bytes(path) if storage.is_url(path) else open(path, "rb").read()
        value = orjson.loads(raw) if raw else None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if storage.is_url(directory) \
        else os.path.join(directory, name)


def dataset_files(directory: str, exists) -> list[str] | None:
    """The shards of a `save_to_disk` directory in order, or None if it is not one.

    `exists(path)` tells whether a file exists (local or on a store). Raises InputError for
    a DatasetDict (name a split) or a state.json that lists no shard."""
    if exists(_join(directory, DICT)) and not exists(_join(directory, STATE)):
        splits = (_read_json(_join(directory, DICT)) or {}).get("splits") or []
        names = ", ".join(map(str, splits)) or "?"
        first = _join(directory, str(splits[0])) if splits else _join(directory, "train")
        raise InputError(f"{directory}: a saved DatasetDict (splits {names}); give one "
                         f"split's directory, e.g. {first}")
    if not exists(_join(directory, STATE)):
        return None
    state = _read_json(_join(directory, STATE)) or {}
    files = [f.get("filename") for f in state.get("_data_files") or [] if isinstance(f, dict)]
    files = [_join(directory, f) for f in files if isinstance(f, str) and f]
    if not files:
        raise InputError(f"{directory}: its {STATE} lists no data file (_data_files); is it "
                         "a directory written by datasets' save_to_disk?")
    for f in files:
        if not exists(f):
            raise InputError(f"{f}: no such file (listed in {_join(directory, STATE)})")
    return files


def _batches(path: str) -> Iterator[pa.RecordBatch]:
    """The file's record batches (stream format, or the IPC file format)."""
    src = storage.open_input(path) if storage.is_url(path) else None
    try:
        if src is None:
            try:
                src = pa.memory_map(path)
            except FileNotFoundError as e:
                raise InputError(f"{path}: no such file") from e
            except OSError as e:
                raise InputError(f"{path}: {e.strerror or e}") from e
        head = src.read(6)
        src.seek(0)
        if head == b"ARROW1":
            reader = pa.ipc.open_file(src)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            yield from pa.ipc.open_stream(src)
    finally:
        if src is not None:
            src.close()


def _runs(path: str) -> Iterator[tuple[pa.Table | None, int]]:
    """(table, rows) per record batch; (None, 1) for the error row of a damaged file."""
    try:
        for batch in _batches(path):
            t = pa.Table.from_batches([batch]).replace_schema_metadata(None)
            yield t, len(t)
    except (pa.ArrowException, OSError, ValueError, EOFError):
        yield None, 1


def count_rows(path: str) -> int:
    return sum(n for _, n in _runs(path))


def schema(path: str) -> pa.Schema | None:
    try:
        src = storage.open_input(path) if storage.is_url(path) else pa.memory_map(path)
    except OSError:
        return None
    try:
        head = src.read(6)
        src.seek(0)
        reader = pa.ipc.open_file(src) if head == b"ARROW1" else pa.ipc.open_stream(src)
        return reader.schema.remove_metadata()
    except (pa.ArrowException, OSError, ValueError):
        return None
    finally:
        src.close()


def columns(path: str) -> list[str]:
    s = schema(path)
    return s.names if s is not None else []


def read_chunks(path: str, start: int, batch_rows: int) -> Iterator[Chunk]:
    """Chunks of at most `batch_rows` rows, numbered from `start`."""
    name = os.path.basename(path)
    row = start
    pending: list[pa.Table] = []
    held = 0
    batch_rows = max(1, batch_rows)

    def flush(all_rows: bool) -> Iterator[Chunk]:
        nonlocal row, pending, held
        cut = held if all_rows else held - held % batch_rows
        if cut == 0:
            return
        table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
        yield from slice_chunks(row, table.slice(0, cut), [None] * cut, batch_rows)
        row += cut
        rest = table.slice(cut)
        pending, held = ([rest] if len(rest) else []), len(rest)

    for table, n in _runs(path):
        if table is None:
            yield from flush(True)
            yield Chunk(row, empty_rows(1), [f"truncated_file:{name}"])
            row += 1
            return
        if n:
            pending.append(table)
            held += n
        if held >= batch_rows:
            yield from flush(False)
    yield from flush(True)
