"""Type drift, big integers, deep nesting: never a crash, values kept exactly."""

from __future__ import annotations

import json

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from test_io_helpers import run_io

from nfb.io.arrow import (
    JSON,
    conform,
    is_json_field,
    join,
    rows_to_table,
    unify_schemas,
    value_type,
)
from nfb.io.readers import read_chunks


def _write(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                              for r in rows))
    return path


def test_nested_drift_between_files_and_chunks(stub_cli, tiny_tokenizer_model, tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"meta": {"score": 4}}] * 3)
    b = _write(tmp_path / "b.jsonl", [{"meta": {"score": [4, 5]}}, {"l": [1, 2]},
                                      {"l": [{"x": 1}]}])
    for out in ("o.jsonl", "o.parquet"):
        lines = run_io(tiny_tokenizer_model, [a, b], tmp_path / out, 2)
        got = [orjson.loads(x) for x in lines]
        assert [g["meta"] for g in got][:4] == [{"score": 4}] * 3 + [{"score": [4, 5]}] \
            if out.endswith("jsonl") else True
    schema = pq.read_schema(tmp_path / "o.parquet")
    assert is_json_field(schema.field("meta")) and is_json_field(schema.field("l"))


def test_int_and_float_keep_their_form(stub_cli, tiny_tokenizer_model, tmp_path):
    f = _write(tmp_path / "x.jsonl", [{"v": 5}, {"v": 5.5}, {"v": 7}, {"v": 2.0}])
    outs = {b: run_io(tiny_tokenizer_model, [f], tmp_path / f"o{b}.jsonl", b) for b in (1, 2, 4)}
    assert outs[1] == outs[2] == outs[4]
    assert [orjson.loads(x)["v"] for x in outs[1]] == [5, 5.5, 7, 2.0]
    assert b'"v":5,' in outs[1][0] and b'"v":2.0,' in outs[1][3]


def test_big_integers_are_exact_text_and_other_rows_untouched(stub_cli, tiny_tokenizer_model,
                                                               tmp_path):
    f = _write(tmp_path / "x.jsonl", [b'{"n": 1}', b'{"n": 123456789012345678901234567890}',
                                      b'{"n": 2}', b'{"n": -9223372036854775809}'])
    lines = run_io(tiny_tokenizer_model, [f], tmp_path / "o.jsonl", 1)
    assert [x.split(b",")[0] for x in lines] == [
        b'{"n":1', b'{"n":123456789012345678901234567890', b'{"n":2',
        b'{"n":-9223372036854775809']
    run_io(tiny_tokenizer_model, [f], tmp_path / "o.parquet", 1)
    t = pq.read_table(tmp_path / "o.parquet")
    assert t.column("n").to_pylist() == ["1", "123456789012345678901234567890", "2",
                                         "-9223372036854775809"]
    assert is_json_field(t.schema.field("n"))


def test_deep_nesting_is_json_text_and_mixes_with_scalars(stub_cli, tiny_tokenizer_model,
                                                           tmp_path):
    deep = 1
    for _ in range(300):      # beyond orjson's own limit for writing
        deep = [deep]
    f = _write(tmp_path / "x.jsonl", [{"d": 3}, {"d": deep}, {"d": "s"}])
    for out in ("o.jsonl", "o.parquet"):
        for b in (1, 3):
            run_io(tiny_tokenizer_model, [f], tmp_path / f"{b}{out}", b)
    lines = (tmp_path / "1o.jsonl").read_bytes().splitlines()
    assert lines == (tmp_path / "3o.jsonl").read_bytes().splitlines()
    assert json.loads(lines[1])["d"] == deep and json.loads(lines[0])["d"] == 3
    assert value_type(deep) is JSON


def test_join_is_order_free_for_unions_and_json_on_conflict():
    assert join(pa.int8(), pa.int32()) == pa.int32()
    assert join(pa.uint32(), pa.int8()) == pa.int64()
    assert join(pa.uint64(), pa.int8()) is JSON
    assert join(pa.int64(), pa.float64()) is JSON
    assert join(pa.list_(pa.null()), pa.list_(pa.int64())) == pa.list_(pa.int64())
    assert join(pa.struct([("a", pa.int64())]), pa.struct([("b", pa.int64())])) is JSON
    assert join(pa.dictionary(pa.int32(), pa.string()), pa.string()) == pa.string()


def test_chunk_types_do_not_depend_on_the_cut():
    rows = [{"v": None}, {"v": [1]}, {"v": []}, {"v": [None, 2]}]
    whole = rows_to_table(rows)
    parts = [rows_to_table(rows[:1]), rows_to_table(rows[1:3]), rows_to_table(rows[3:])]
    s = unify_schemas(p.schema for p in parts)
    assert s == whole.schema
    assert pa.concat_tables([conform(p, s) for p in parts]).equals(whole)


def test_reader_rows_are_those_of_the_file(tmp_path):
    f = _write(tmp_path / "x.jsonl", [{"a": 1}, b"{bad", {"a": "t"}])
    got = [(c.first_row, c.errors, c.rows) for c in read_chunks([str(f)], 2)]
    assert got == [(0, [None, "malformed_json"], [{"a": 1}, {}]), (2, [None], [{"a": "t"}])]
