"""Every input row ends in the output, scored or with nfb_error saying why (end to end, on the
stub engine: the mechanics do not depend on the model)."""

import gzip

import orjson
import pyarrow.parquet as pq
from conftest import write_jsonl

FAST = ["--max-tokens", "8", "--temperature", "0", "--dtype", "float32"]

CASES = [  # (raw line, expected nfb_error: None = scored)
    (b'\xef\xbb\xbf{"prompt": "BOM first line", "response": "ok"}\r', None),
    (b'{"prompt": "crlf", "response": "ok"}\r', None),
    (b'{"prompt": "broken", "response": ', "malformed_json"),
    (b"", "blank_line"),
    (b"   ", "blank_line"),
    (b"[1, 2, 3]", "not_an_object"),
    (b"42", "not_an_object"),
    (b'{"response": "no prompt"}', "missing_field:prompt"),
    (b'{"prompt": null, "response": "x"}', "null_field:prompt"),
    (b'{"prompt": 7, "response": "x"}', "bad_type:prompt"),
    (b'{"prompt": "p", "response": ["x"]}', "bad_type:response"),
    (b'{"prompt": "", "response": "x"}', "empty_field:prompt"),
    (b'{"prompt": "p", "response": "   "}', "empty_field:response"),
    ('{"prompt": "h\u00e9llo \u6f22\u5b57 \U0001f600", "response": "\u00fcml\u00e4ut"}'.encode(),
     None),
    (orjson.dumps({"prompt": "long " * 5000, "response": "x"}), "prompt_too_long"),
    (b'{"prompt": "drift", "response": "x", "extra": 5}', None),
    (b'{"prompt": "drift", "response": "x", "extra": "five"}', None),
    (b'{"prompt": "bad utf8 \xff here", "response": "x"}', None),
]


def test_every_bad_case_in_one_file(stub_cli, models, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(line for line, _ in CASES) + b"\n")
    out = tmp_path / "out.parquet"
    r = stub_cli("feedback", src, "-o", out, "--model", models["causal"], *FAST)
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.num_rows == len(CASES)
    assert t.column("nfb_row").to_pylist() == list(range(len(CASES)))
    errs = t.column("nfb_error").to_pylist()
    for i, ((_, want), got) in enumerate(zip(CASES, errs)):
        if want is None:
            assert got is None, (i, got)
            assert isinstance(t.column("feedback")[i].as_py(), str)
        else:
            assert got is not None and got.split(":")[0] == want.split(":")[0], (i, got)
            if ":" in want:
                assert got == want
    # a column whose values do not share a type is kept as exact JSON text (marked nfb.json)
    assert t.column("extra").to_pylist()[-3:-1] == ["5", '"five"']
    assert t.schema.field("extra").metadata == {b"nfb.json": b"1"}
    # --strict turns "finished with row errors" into exit 3
    r = stub_cli("feedback", src, "-o", tmp_path / "o2.parquet", "--model", models["causal"],
            *FAST, "--strict")
    assert r.exit_code == 3


def test_truncated_gzip_and_unreadable_parquet_among_good_files(stub_cli, models, tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "response": "r"}
                                             for i in range(3)])
    data = b"".join(orjson.dumps({"prompt": f"z{i}", "response": "r" * 300}) + b"\n"
                    for i in range(400))
    packed = gzip.compress(data)
    trunc = tmp_path / "b.jsonl.gz"
    trunc.write_bytes(packed[: len(packed) // 2])
    bad = tmp_path / "c.parquet"
    bad.write_bytes(b"PAR1 garbage")
    out = tmp_path / "out.parquet"
    r = stub_cli("feedback", good, trunc, bad, "-o", out, "--model", models["causal"], *FAST)
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    errs = t.column("nfb_error").to_pylist()
    assert errs[:3] == [None] * 3
    assert errs[-2:] == ["truncated_file:b.jsonl.gz", "unreadable_file:c.parquet"]
    assert all(e is None for e in errs[3:-2]) and len(errs) > 5
    assert t.column("nfb_row").to_pylist() == list(range(t.num_rows))
