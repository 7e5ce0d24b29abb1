"""Shared helpers for the I/O tests: the pipeline's path from input to output, minus the engine."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from nfb.io.readers import read_chunks
from nfb.io.writers import PartWriter, merge_tables


def run_io(files, out: Path, batch_rows: int, part_rows: int, cuts=None) -> list[bytes]:
    """read -> (nfb columns) -> checkpoint parts -> final merge, as the pipeline does.

    `cuts`: row counts after which a part is forced (random checkpoint moments)."""
    wd = out.with_name(out.name + ".parts")
    wd.mkdir()
    sink = PartWriter(wd, part_rows, 1e9, "nfb_row")
    cuts = set(cuts or ())
    seen = 0
    for chunk in read_chunks([str(f) for f in files], batch_rows):
        t = chunk.table
        t = t.append_column("nfb_row", pa.array(range(chunk.first_row,
                                                      chunk.first_row + len(chunk)), pa.int64()))
        t = t.append_column("nfb_error", pa.array(chunk.errors, pa.string()))
        sink.add(t)
        seen += len(chunk)
        if seen in cuts:
            sink.flush()
    sink.flush()
    parts = sorted(wd.glob("part-*.parquet"))
    schemas = [pq.read_schema(p).remove_metadata() for p in parts]

    def tables(p):
        for b in pq.ParquetFile(p).iter_batches(batch_size=16_384):
            yield pa.Table.from_batches([b])

    meta = {"fingerprint": "x", "columns": ["nfb_row", "nfb_error"]}
    merge_tables(str(out), (tables(p) for p in parts), schemas, meta)
    if out.suffix == ".jsonl":
        return out.read_bytes().splitlines()
    return [orjson.dumps(r, default=str) for r in pq.read_table(out).to_pylist()]
