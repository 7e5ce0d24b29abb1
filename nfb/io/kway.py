"""Streaming k-way merges by row number: shard outputs (`nfb merge`) and a run's checkpoint
parts (the final output). One batch per source is in memory at a time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nfb.io.arrow import conform, unify_schemas


def kway(sources: list[Iterator[pa.Table]], row_col: str) -> Iterator[pa.Table]:
    """Interleave sources that are each sorted by `row_col` into one stream sorted by it."""
    heads: list[pa.Table | None] = [next(s, None) for s in sources]
    while True:
        live = [i for i, h in enumerate(heads) if h is not None]
        if not live:
            return
        cutoff = min(heads[i].column(row_col)[-1].as_py() for i in live)
        taken = []
        for i in live:
            t = heads[i]
            rows = t.column(row_col).to_numpy()
            k = int(np.searchsorted(rows, cutoff, side="right"))
            if k:
                taken.append(t.slice(0, k))
            rest = t.slice(k)
            while rest is not None and len(rest) == 0:
                rest = next(sources[i], None)
            heads[i] = rest
        schema = unify_schemas(t.schema for t in taken)
        merged = pa.concat_tables([conform(t, schema) for t in taken])
        yield merged.take(pc.sort_indices(merged, [(row_col, "ascending")]))


def parts_by_row(part_rows: list[tuple[Path, np.ndarray]], row_col: str
                 ) -> Iterable[Iterator[pa.Table]]:
    """The checkpoint parts (path, row numbers) as sources that read in row order.

    Parts are usually contiguous runs in row order and are read one after the other; when one
    was lost and its rows done again, a later part can hold rows from before and after others:
    then they are merged by row number, and a row found twice is written once."""
    rows = [r for _, r in part_rows]
    ordered = all(len(r) == 0 or bool(np.all(np.diff(r) > 0)) for r in rows)
    last = -1
    for r in rows:
        if len(r):
            ordered = ordered and int(r[0]) > last
            last = int(r[-1])

    def tables(path: Path) -> Iterator[pa.Table]:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=16_384):
            yield pa.Table.from_batches([batch])

    def sorted_tables(path: Path, r: np.ndarray) -> Iterator[pa.Table]:
        if len(r) and bool(np.all(np.diff(r) > 0)):
            yield from tables(path)
        else:
            t = pq.read_table(path)
            yield t.take(pc.sort_indices(t, [(row_col, "ascending")]))

    def by_row() -> Iterator[pa.Table]:
        last = -1
        for t in kway([sorted_tables(p, r) for p, r in part_rows], row_col):
            r = t.column(row_col).to_numpy()
            keep = np.empty(len(r), dtype=bool)   # a row found twice is written once
            keep[0] = r[0] > last
            keep[1:] = r[1:] > r[:-1]
            last = max(last, int(r[-1]))
            yield t if keep.all() else t.filter(pa.array(keep))

    return (tables(p) for p, _ in part_rows) if ordered else [by_row()]
