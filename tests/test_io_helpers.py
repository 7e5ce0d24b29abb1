"""Shared helper for the I/O tests: a real run (`nfb.feedback`, the pipeline from input to
output) on the stub engine, so what these tests check is what a user's run writes."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow.parquet as pq

import nfb


def run_io(model: Path, files, out: Path, batch_rows: int, every: float = 0.0) -> list[bytes]:
    """`nfb.feedback` of `files` into `out` with the stub engine (the test's `stub_cli`
    fixture registers it): read -> nfb columns -> checkpoint parts -> final merge.

    `batch_rows` cuts the input into chunks; `every` is --checkpoint-every: 0 writes a
    checkpoint part as soon as rows are finished (many parts, cut wherever the out-of-order
    stub finishes them), a large value one part at the end. Returns the output's rows, each as
    one line of JSON."""
    nfb.feedback([str(f) for f in files], out, model=str(model), max_tokens=64,
                 batch_rows=batch_rows, max_in_flight=3, checkpoint_every=every,
                 overwrite=True)
    if out.suffix == ".jsonl":
        return out.read_bytes().splitlines()
    return [orjson.dumps(r, default=str) for r in pq.read_table(out).to_pylist()]
