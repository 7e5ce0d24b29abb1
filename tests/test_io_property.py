"""Property: whatever the data, batch size and part cut points, reading -> conforming ->
checkpoint parts -> final merge gives every input line once, in order, with the values of
the input (as JSON), identical to a run with one big batch."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nasty import values
from test_io_helpers import run_io

from nfb.io.arrow import rows_to_table

KEYS = ["a", "b", "meta", "é", ""]
VALUES = values(KEYS, max_leaves=8)
ROWS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4)
BAD = st.sampled_from([b"", b"   ", b"{bad", b"[1, 2]", b'"text"', b"1e400x", b'{"a": NaN}',
                       b'{"a": "bad \xff byte"}'])
LINES = st.lists(st.one_of(ROWS.map(lambda r: json.dumps(r, ensure_ascii=False).encode()),
                           BAD), min_size=1, max_size=25)


def _expect(line: bytes):
    """What a line must come back as: (row dict, error or None)."""
    from nfb.io.jsonl import parse_line
    value, err = parse_line(line)
    return value, err


def _check(lines, files, out_dir, batch, part, cuts):
    expected = [_expect(x) for x in lines]
    keys: dict[str, None] = {}
    for v, _ in expected:
        keys.update(dict.fromkeys(v))
    ref = run_io(files, out_dir / "ref.jsonl", 10 ** 6, 10 ** 6)
    got = run_io(files, out_dir / "got.jsonl", batch, part, cuts)
    assert got == ref
    assert len(got) == len(lines)
    for i, (raw, (value, err)) in enumerate(zip(got, expected)):
        row = json.loads(raw)
        assert row.pop("nfb_row") == i
        assert row.pop("nfb_error") == err
        assert list(row) == list(keys)
        assert row == {k: value.get(k) for k in keys}
    ref_pq = run_io(files, out_dir / "ref.parquet", 10 ** 6, 10 ** 6)
    got_pq = run_io(files, out_dir / "got.parquet", batch, part, cuts)
    assert got_pq == ref_pq
    assert pq.read_schema(out_dir / "ref.parquet") == pq.read_schema(out_dir / "got.parquet")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=LINES, batch=st.integers(1, 9), part=st.integers(1, 12),
       cuts=st.lists(st.integers(1, 25), max_size=4), split=st.integers(0, 25))
def test_jsonl_every_line_once_identical_whatever_the_cuts(tmp_path_factory, lines, batch,
                                                            part, cuts, split):
    d = tmp_path_factory.mktemp("p")
    files = []
    for k, chunk in enumerate((lines[:split], lines[split:])):
        if chunk:
            f = d / f"in{k}.jsonl"
            f.write_bytes(b"\n".join(chunk) + b"\n")
            files.append(f)
    _check(lines, files, d, batch, part, cuts)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=st.lists(ROWS, min_size=1, max_size=25), group=st.integers(1, 10),
       batch=st.integers(1, 9), part=st.integers(1, 12),
       cuts=st.lists(st.integers(1, 25), max_size=4), split=st.integers(0, 25))
def test_parquet_and_jsonl_inputs_identical_whatever_the_cuts(tmp_path_factory, rows, group,
                                                              batch, part, cuts, split):
    """Parquet files (written from nasty rows, random row groups) next to a JSONL file."""
    d = tmp_path_factory.mktemp("q")
    files, lines = [], []
    rows = [{"id": i, **r} for i, r in enumerate(rows)]
    head, tail = rows[:split], rows[split:]
    if head:
        f = d / "in0.parquet"
        pq.write_table(rows_to_table(head), f, row_group_size=group)
        files.append(f)
        lines += [json.dumps(r).encode() for r in head]
    if tail:
        f = d / "in1.jsonl"
        body = [json.dumps(r, ensure_ascii=False).encode() for r in tail]
        f.write_bytes(b"\n".join(body) + b"\n")
        files.append(f)
        lines += body
    _check(lines, files, d, batch, part, cuts)
