"""`nfb merge`: join shard outputs (`--shard I/N`) into one output in input order.

Each shard file is sorted by `nfb_row`; a streaming k-way merge interleaves them with one
batch per file in memory. Outputs from different models or settings are refused, as are
missing or repeated shards and repeated rows. The merged file carries the fingerprint of the
unsharded run, so the same command without --shard sees it as complete.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from nfb.errors import MergeError  # noqa: E402
from nfb.io.kway import kway
from nfb.io.writers import OutputWriter
from nfb.verbs.scored import iter_tables, metadata, schema_names, unified_schema


def check_shards(files: list[str]) -> tuple[dict, str]:
    metas = [metadata(f) for f in files]
    for f, m in zip(files, metas):
        if not m.get("settings_fingerprint"):
            raise MergeError(f"{f} has no nfb provenance: not an nfb output")
    first = metas[0]
    for f, m in zip(files[1:], metas[1:]):
        if m["settings_fingerprint"] != first["settings_fingerprint"]:
            diff = [k for k in ("model", "task", "sampling", "weights", "prompt", "fields",
                                "inputs", "limit", "prefix") if m.get(k) != first.get(k)]
            raise MergeError(f"{f} was made with other settings than {files[0]} "
                             f"(differs in: {', '.join(diff) or 'input files'}); nfb merges "
                             "shards of one run only")
    shards = [m.get("shard") for m in metas]
    if any(s is None for s in shards):
        if len(files) > 1:
            raise MergeError("only outputs of --shard I/N runs can be merged "
                             f"({files[shards.index(None)]} is not a shard)")
    else:
        counts = {int(s.split("/")[1]) for s in shards}
        if len(counts) != 1:
            raise MergeError(f"the shards split the input differently: {', '.join(shards)}")
        n = counts.pop()
        seen = Counter(int(s.split("/")[0]) for s in shards)
        twice = [f"{i}/{n}" for i, c in seen.items() if c > 1]
        if twice:
            raise MergeError(f"shard {', '.join(twice)} is given twice")
        missing = [f"{i}/{n}" for i in range(n) if i not in seen]
        if missing:
            raise MergeError(f"missing shard(s) {', '.join(missing)}")
    return first, (first.get("prefix") or "") + "nfb_row"


def merge_outputs(files: list[str], output: str) -> int:
    meta, row_col = check_shards(files)
    for f in files:
        if row_col not in schema_names(f):
            raise MergeError(f"{f} has no {row_col} column")
    out_meta = dict(meta, shard=None, fingerprint=meta["settings_fingerprint"],
                    merged_from=files,
                    verbs=[*(meta.get("verbs") or []), {"verb": "merge", "inputs": files}],
                    summary=merged_summary([metadata(f).get("summary") or {} for f in files]))
    last = -1
    with OutputWriter(output, unified_schema(files), out_meta) as writer:
        for t in kway([iter_tables(f) for f in files], row_col):
            rows = t.column(row_col).to_numpy()
            if rows[0] <= last or (len(rows) > 1 and np.any(np.diff(rows) <= 0)):
                raise MergeError(f"row {int(rows[0])} appears twice or out of order; "
                                 "are these shards of one run?")
            last = int(rows[-1])
            writer.write(t)
    return writer.rows


# the run's own summary entries a merge leaves out (they describe one shard's invocation)
_PER_SHARD = ("notes", "data_parallel", "truncated")


def merged_summary(summaries: list[dict]) -> dict:
    """The shards' summaries added up: rows, error rows, errors by reason, and each of the
    task's counts (`Task.counts`: a number of rows, or rows per value), whatever its name."""
    out: dict = {"rows": 0, "error_rows": 0, "errors": Counter()}
    for s in summaries:
        for name, value in s.items():
            if name in _PER_SHARD:
                continue
            if isinstance(value, dict):
                out.setdefault(name, Counter()).update(value)
            elif isinstance(value, (int, float)):
                out[name] = out.get(name, 0) + value
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in out.items()}


def merge(inputs: list[str] | str, output: str) -> tuple[int, int]:
    """`nfb merge` as one call: join shard outputs into `output`. Returns (files, rows)."""
    from nfb.io.writers import output_format
    from nfb.verbs.scored import resolve

    output = __import__("os").fspath(output)
    try:
        output_format(output)
    except ValueError as e:
        raise MergeError(str(e)) from None
    from nfb.io.outputs import guarded

    files = resolve(inputs, exclude=output)
    from nfb.io.readers import input_format
    from nfb.verbs.scored import _parquet

    for f in files:   # a 0-byte or damaged file: InputError (exit 1), before any check
        if input_format(f) == "parquet":
            _parquet(f)
    with guarded(output, files):   # never over an input; one writer; a failed write one line
        return len(files), merge_outputs(files, output)
