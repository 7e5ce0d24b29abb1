import gzip

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nfb.io.arrow import conform, is_json_field, unify_schemas
from nfb.io.readers import InputError, read_chunks, resolve_inputs


def rows_of(files, batch_rows=1024):
    out = []
    for chunk in read_chunks([str(f) for f in files], batch_rows):
        recs = chunk.table.to_pylist()
        for k, (rec, err) in enumerate(zip(recs, chunk.errors)):
            out.append((chunk.first_row + k, {a: b for a, b in rec.items() if b is not None}, err))
    return out


def test_jsonl_rows_numbered_across_files_and_batches(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"".join(orjson.dumps({"i": i}) + b"\n" for i in range(5)))
    b.write_bytes(b"".join(orjson.dumps({"i": i}) + b"\n" for i in range(5, 8)))
    got = rows_of([a, b], batch_rows=2)
    assert [r for r, _, _ in got] == list(range(8))
    assert [d["i"] for _, d, _ in got] == list(range(8))


def test_bad_lines_become_error_rows_in_place(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"i": 0}\r\n'      # BOM + CRLF
                  b'{"i": 1\n'                      # malformed
                  b'\n'                             # blank
                  b'[1, 2]\n'                       # not an object
                  b'"text"\n'
                  b'{"i": 5, "t": "h\xc3\xa9llo \xe6\xbc\xa2\xe5\xad\x97 \xf0\x9f\x98\x80"}\n'
                  b'{"i": 6, "t": "bad \xff byte"}\n'
                  b'{"i": 7}')                      # no final newline
    got = rows_of([f])
    assert [(r, e) for r, _, e in got] == [
        (0, None), (1, "malformed_json"), (2, "blank_line"), (3, "not_an_object"),
        (4, "not_an_object"), (5, None), (6, None), (7, None)]
    assert got[0][1] == {"i": 0}
    assert got[5][1]["t"] == "héllo 漢字 😀"
    assert got[6][1]["t"].startswith("bad ")


def test_type_drift_between_rows_and_batches_keeps_values(tmp_path):
    f = tmp_path / "x.jsonl"
    lines = [{"v": None}, {"v": None}, {"v": "s"}, {"v": 3}, {"v": {"a": 1}}, {"w": 1.5}]
    f.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    chunks = list(read_chunks([str(f)], 2))
    # a string and an int do not share a type: that chunk's column is JSON text
    assert [c.table.schema.field("v").type for c in chunks] == [pa.null(), pa.string(),
                                                                 pa.struct([("a", pa.int64())])]
    assert [is_json_field(c.table.schema.field("v")) for c in chunks] == [False, True, False]
    schema = unify_schemas(c.table.schema for c in chunks)
    assert is_json_field(schema.field("v"))
    got = pa.concat_tables([conform(c.table, schema) for c in chunks]).to_pylist()
    assert [d["v"] for d in got] == [None, None, '"s"', "3", '{"a":1}', None]
    assert [d["w"] for d in got] == [None] * 5 + [1.5]


def test_large_row(tmp_path):
    f = tmp_path / "x.jsonl"
    big = "word " * 400_000
    f.write_bytes(orjson.dumps({"prompt": big}) + b"\n")
    assert rows_of([f])[0][1]["prompt"] == big


def test_gzip_and_truncated_gzip(tmp_path):
    data = b"".join(orjson.dumps({"i": i, "pad": "x" * 200}) + b"\n" for i in range(2000))
    good = tmp_path / "good.jsonl.gz"
    good.write_bytes(gzip.compress(data))
    assert len(rows_of([good])) == 2000
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])
    got = rows_of([bad, good])
    errs = [(r, e) for r, _, e in got if e]
    assert len(errs) == 1 and errs[0][1] == "truncated_file:bad.jsonl.gz"
    assert all(e is None for r, _, e in got if r != errs[0][0])
    # the rows before the break are kept, and the next file goes on after the error row
    assert got[errs[0][0] + 1][1]["i"] == 0
    assert len(got) == errs[0][0] + 1 + 2000


def test_parquet_keeps_types_and_unreadable_parquet_is_an_error_row(tmp_path):
    t = pa.table({"prompt": ["a", "b"], "score": pa.array([1, 2], pa.int16()),
                  "messages": [[{"role": "user", "content": "x"}], None]})
    good = tmp_path / "good.parquet"
    pq.write_table(t, good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    chunks = list(read_chunks([str(good), str(bad)]))
    assert chunks[0].table.schema.field("score").type == pa.int16()
    assert chunks[0].errors == [None, None]
    assert chunks[1].first_row == 2 and chunks[1].errors == ["unreadable_file:bad.parquet"]


def test_resolve_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    for n in ("b.jsonl", "a.parquet", "c.txt"):
        (tmp_path / "d" / n).write_text("")
    assert [p.rsplit("/", 1)[1] for p in resolve_inputs([str(tmp_path / "d")])] == [
        "a.parquet", "b.jsonl"]
    assert len(resolve_inputs([str(tmp_path / "d" / "*.jsonl")])) == 1
    with pytest.raises(InputError, match="no such file"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match="matches no file"):
        resolve_inputs([str(tmp_path / "*.nothing")])
    with pytest.raises(InputError, match="unknown input format"):
        resolve_inputs([str(tmp_path / "d" / "c.txt")])
    assert resolve_inputs(["-"]) == ["-"]
