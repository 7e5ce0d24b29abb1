"""Property: whatever the data, batch size and checkpoint parts, a run (`nfb.feedback` on the
stub engine: reading -> conforming -> checkpoint parts -> final merge) gives every input line
once, in order, with the values of the input (as JSON), identical to a run with one big batch.

What each line must come back as is computed independently of nfb's reader: the stdlib's
`json` for the rows, and the documented error codes (nfb/io/jsonl.py, the README's input
section) for the broken lines."""

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
TEXTS = st.sampled_from(["Hi.", "Tell me about the sea.", "é ü 文字 🙂", "a\nb"])
# rows with the fields feedback reads, so the stub engine answers the good ones
ROWS = st.builds(lambda r, p, a: {**r, "prompt": p, "response": a},
                 st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4), TEXTS, TEXTS)
# broken lines and what the reader's contract says each becomes: (row, nfb_error)
BROKEN = {
    b"": ({}, "blank_line"),
    b"   ": ({}, "blank_line"),
    b"{bad": ({}, "malformed_json"),
    b"[1, 2]": ({}, "not_an_object"),
    b'"text"': ({}, "not_an_object"),
    b"1e400x": ({}, "malformed_json"),
    b'{"a": NaN}': ({}, "malformed_json"),                  # NaN is not JSON
    # a byte that is not UTF-8 becomes U+FFFD and the row is kept
    b'{"a": "bad \xff byte", "prompt": "Hi.", "response": "Yes."}':
        ({"a": "bad \ufffd byte", "prompt": "Hi.", "response": "Yes."}, None),
}
BAD = st.sampled_from(list(BROKEN))
LINES = st.lists(st.one_of(ROWS.map(lambda r: json.dumps(r, ensure_ascii=False).encode()),
                           BAD), min_size=1, max_size=25)
# --checkpoint-every: 0 = a part whenever rows are finished (cut wherever the out-of-order stub
# finishes them), or one part at the end
EVERY = st.sampled_from([0.0, 10.0 ** 9])
TASK_COLUMNS = ["feedback", "feedback_level", "feedback_label"]


def _expect(line: bytes):
    """What a line must come back as: (row dict, error or None), without nfb's reader."""
    if line in BROKEN:
        return BROKEN[line]
    value = json.loads(line)          # a JSON object (exact integers, like the input)
    assert isinstance(value, dict)
    return value, None


def _check(model, lines, files, out_dir, batch, every):
    expected = [_expect(x) for x in lines]
    keys: dict[str, None] = {}
    for v, _ in expected:
        keys.update(dict.fromkeys(v))
    ref = run_io(model, files, out_dir / "ref.jsonl", 10 ** 6, 10 ** 9)
    got = run_io(model, files, out_dir / "got.jsonl", batch, every)
    assert got == ref
    assert len(got) == len(lines)
    for i, (raw, (value, err)) in enumerate(zip(got, expected)):
        row = json.loads(raw)
        assert row.pop("nfb_row") == i
        assert row.pop("nfb_error") == err
        task = [row.pop(c) for c in TASK_COLUMNS]
        answered = err is None and isinstance(value.get("prompt"), str)
        assert (task[0] is not None) == answered        # the stub answered exactly these
        assert list(row) == list(keys)
        assert row == {k: value.get(k) for k in keys}
    ref_pq = run_io(model, files, out_dir / "ref.parquet", 10 ** 6, 10 ** 9)
    got_pq = run_io(model, files, out_dir / "got.parquet", batch, every)
    assert got_pq == ref_pq
    assert pq.read_schema(out_dir / "ref.parquet") == pq.read_schema(out_dir / "got.parquet")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=LINES, batch=st.integers(1, 9), every=EVERY, split=st.integers(0, 25))
def test_jsonl_every_line_once_identical_whatever_the_cuts(stub_cli, tiny_tokenizer_model,
                                                            tmp_path_factory, lines, batch,
                                                            every, split):
    d = tmp_path_factory.mktemp("p")
    files = []
    for k, chunk in enumerate((lines[:split], lines[split:])):
        if chunk:
            f = d / f"in{k}.jsonl"
            f.write_bytes(b"\n".join(chunk) + b"\n")
            files.append(f)
    _check(tiny_tokenizer_model, lines, files, d, batch, every)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=st.lists(ROWS, min_size=1, max_size=25), group=st.integers(1, 10),
       batch=st.integers(1, 9), every=EVERY, split=st.integers(0, 25))
def test_parquet_and_jsonl_inputs_identical_whatever_the_cuts(stub_cli, tiny_tokenizer_model,
                                                              tmp_path_factory, rows, group,
                                                              batch, every, split):
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
    _check(tiny_tokenizer_model, lines, files, d, batch, every)
