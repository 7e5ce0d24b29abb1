"""What every input format hands the pipeline: numbered chunks of rows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

STDIN = "-"


@dataclass
class Chunk:
    """Consecutive input rows: their Arrow table, row numbers, and reader errors."""

    first_row: int
    table: pa.Table            # the input columns, one row per input row (all-null on error)
    errors: list[str | None]   # a reader error per row (malformed_json, ...) or None
    rows: list[dict] | None = None  # the rows as Python dicts, when the reader had them
    notes: list[str] = field(default_factory=list)  # warnings about the file (not rows)

    def __len__(self) -> int:
        return len(self.errors)


def slice_chunks(first_row: int, table: pa.Table, errors: list[str | None],
                 batch_rows: int, rows: list[dict] | None = None) -> Iterator[Chunk]:
    """Cut one run of rows into chunks of at most `batch_rows` (numbering is unaffected)."""
    n = len(errors)
    for s in range(0, n, max(1, batch_rows)):
        e = min(n, s + max(1, batch_rows))
        yield Chunk(first_row + s, table.slice(s, e - s), errors[s:e],
                    rows[s:e] if rows is not None else None)
