"""Damaged, truncated, compressed and zero-row inputs: rows and numbers never depend on the
batch size, and count_rows agrees with what read_chunks gives."""

from __future__ import annotations

import base64
import gzip

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from nfb.io.readers import (
    count_rows,
    empty_input_table,
    input_columns,
    input_schema,
    read_chunks,
    resolve_inputs,
)
from nfb.io.writers import OutputWriter, read_metadata, sidecar_path

BATCHES = (1, 7, 64, 100_000)


def rows_of(files, batch_rows):
    out = []
    for c in read_chunks([str(f) for f in files], batch_rows):
        for k, (rec, err) in enumerate(zip(c.table.to_pylist(), c.errors)):
            out.append((c.first_row + k, {a: v for a, v in rec.items() if v is not None}, err))
    return out


def same_for_every_batch(files):
    ref = rows_of(files, BATCHES[-1])
    for b in BATCHES[:-1]:
        assert rows_of(files, b) == ref
    assert count_rows([str(f) for f in files]) == len(ref)
    assert [r for r, _, _ in ref] == list(range(len(ref)))
    return ref


def _damage_row_group(path, group):
    md = pq.ParquetFile(path).metadata
    col = md.row_group(group).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    for k in range(start + 8, start + col.total_compressed_size - 2):
        data[k] = 0x5A
    path.write_bytes(bytes(data))


def test_damaged_row_group_keeps_the_other_groups(tmp_path):
    f = tmp_path / "f.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(300)]}), f,
                   row_group_size=100, compression="zstd")
    _damage_row_group(f, 1)
    got = same_for_every_batch([f])
    assert len(got) == 300
    assert all(e is None and rec["text"] == f"row {r} " * 20 for r, rec, e in got
               if r < 100 or r >= 200)
    assert all(e == "unreadable_row_group:f.parquet:1" and rec == {}
               for r, rec, e in got if 100 <= r < 200)


def test_unreadable_parquet_is_one_row_and_next_file_goes_on(tmp_path):
    bad, good = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"x": list(range(50))}), good, row_group_size=20)
    bad.write_bytes(good.read_bytes()[:-30])      # footer cut off
    got = same_for_every_batch([bad, good])
    assert got[0][2] == "unreadable_file:a.parquet"
    assert [rec["x"] for _, rec, _ in got[1:]] == list(range(50))


def _lines(n):
    return b"".join(orjson.dumps({"i": i, "pad": "x" * 50}) + b"\n" for i in range(n))


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.99])
def test_truncated_gzip_and_zstd_same_for_every_batch(tmp_path, cut):
    data = _lines(3000)
    for name, comp in (("t.jsonl.gz", gzip.compress(data)),
                       ("t.jsonl.zst", zstandard.ZstdCompressor().compress(data))):
        f = tmp_path / name
        f.write_bytes(comp[: int(len(comp) * cut)])
        got = same_for_every_batch([f])
        assert got[-1][2] == f"truncated_file:{name}"
        assert all(e is None and rec["i"] == r for r, rec, e in got[:-1])


def test_gzip_trailing_garbage_adds_no_row_but_a_note(tmp_path, caplog):
    data = _lines(500)
    f = tmp_path / "g.jsonl.gz"
    f.write_bytes(gzip.compress(data) + b"this is not gzip")
    got = same_for_every_batch([f])
    assert len(got) == 500 and all(e is None for _, _, e in got)
    chunks = list(read_chunks([str(f)], 64))
    assert "16 bytes after the end of the compressed data" in chunks[-1].notes[0]
    assert "not compressed data" in caplog.text


def test_multi_member_gzip_zero_padding_and_multi_frame_zstd(tmp_path):
    a, b = _lines(10), b'{"i": 10}'          # the last line has no newline
    gz = tmp_path / "m.jsonl.gz"
    gz.write_bytes(gzip.compress(a) + gzip.compress(b) + b"\0" * 100)
    zs = tmp_path / "m.jsonl.zst"
    c = zstandard.ZstdCompressor()
    zs.write_bytes(c.compress(a) + c.compress(b))
    for f in (gz, zs):
        got = same_for_every_batch([f])
        assert [rec["i"] for _, rec, _ in got] == list(range(11))
        assert list(read_chunks([str(f)], 64))[-1].notes == []


def test_zst_is_read_and_resolved(tmp_path):
    f = tmp_path / "z.jsonl.zst"
    f.write_bytes(zstandard.ZstdCompressor().compress(_lines(5)))
    assert resolve_inputs([str(f)]) == [str(f)]
    assert [rec["i"] for _, rec, _ in rows_of([f], 2)] == list(range(5))


def test_plain_jsonl_count_matches_reader(tmp_path):
    f = tmp_path / "p.jsonl"
    for body in (b"", b"\n", b"{}", b"{}\n\n{bad\n", b"\xef\xbb\xbf{}\r\n{}", b"\n\n\n"):
        f.write_bytes(body)
        same_for_every_batch([f])


def test_input_columns_sees_a_key_that_first_appears_late(tmp_path):
    f = tmp_path / "late.jsonl.gz"
    rows = [{"prompt": "p", "response": "r"}] * 5000 + [{"prompt": "p", "feedback": "x"}]
    f.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in rows) + b"{bad\n"))
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"extra": [1]}), p)
    assert input_columns([str(f), str(p)]) == ["prompt", "response", "feedback", "extra"]


def test_zero_row_parquet_gives_its_columns(tmp_path):
    f = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()),
                             "score": pa.array([], pa.int16())}), f)
    assert count_rows([str(f)]) == 0 and list(read_chunks([str(f)])) == []
    assert input_schema([str(f)]) == pa.schema([("prompt", pa.string()), ("score", pa.int16())])
    t = empty_input_table([str(f)])
    assert len(t) == 0 and t.column_names == ["prompt", "score"]


def test_binary_columns_are_base64_in_jsonl(tmp_path):
    out = tmp_path / "o.jsonl"
    t = pa.table({"b": pa.array([b"\x00\xff", None], pa.binary())})
    with OutputWriter(str(out), t.schema, {"fingerprint": "f"}) as w:
        w.write(t)
    rows = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert rows == [{"b": base64.b64encode(b"\x00\xff").decode()}, {"b": None}]
    assert read_metadata(str(out)) == {"fingerprint": "f"}


def test_jsonl_output_replacing_an_old_one_never_pairs_old_data_with_new_metadata(
        tmp_path, monkeypatch):
    import os

    out = tmp_path / "o.jsonl"
    out.write_text('{"old": 1}\n')
    (tmp_path / "o.jsonl.nfb.json").write_text('{"fingerprint": "old"}')
    real = os.replace

    def crash_on_commit(src, dst):
        if str(dst) == str(out):
            raise KeyboardInterrupt   # killed just before OUT is renamed into place
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_commit)
    t = pa.table({"x": [1]})
    with pytest.raises(KeyboardInterrupt):
        w = OutputWriter(str(out), t.schema, {"fingerprint": "new"})
        w.write(t)
        w.close()
    # no OUT at all: the rerun resumes from the work directory, never trusts the old data
    assert not out.exists()
    monkeypatch.setattr(os, "replace", real)
    with OutputWriter(str(out), t.schema, {"fingerprint": "new"}) as w:
        w.write(t)
    assert out.read_text() == '{"x":1}\n' and read_metadata(str(out))["fingerprint"] == "new"
    assert os.path.exists(sidecar_path(str(out)))
