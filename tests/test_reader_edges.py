"""Inputs that used to hang, lose rows or change them silently: a `**` glob over a symlink
loop, a `.jsonl.gz` that holds zstd data (or no compressed data at all), bytes that are not
UTF-8, CR-only line ends, a line over --max-line-bytes, and one huge line under a memory
limit (in a child process, with the stub engine)."""

import gzip
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import sample_rows

import nfb
from nfb.io.readers import count_rows

ROWS = sample_rows(5)
LINES = [orjson.dumps(r) for r in ROWS]


def scored(out):
    return pq.read_table(out).to_pylist()


@pytest.fixture
def alarm():
    """Fail, instead of hanging, when a call runs past `seconds`."""
    def handler(signum, frame):
        raise TimeoutError("ran past the alarm")
    old = signal.signal(signal.SIGALRM, handler)
    yield lambda seconds: signal.alarm(seconds)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_double_star_glob_over_a_symlink_loop_terminates(stub_cli, tiny_tokenizer_model,
                                                           tmp_path, alarm):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_bytes(LINES[0] + b"\n")
    (d / "sub" / "b.jsonl").write_bytes(LINES[1] + b"\n")
    os.symlink(d, d / "sub" / "loop")            # data/sub/loop -> data
    os.symlink(d / "sub", d / "sub" / "again")   # and a second loop, to a subfolder
    out = tmp_path / "o.jsonl"
    alarm(60)
    r = stub_cli("feedback", f"{d}/**/*.jsonl", "-o", out, "--model", tiny_tokenizer_model,
                 "--max-tokens", "8", "-q")
    assert r.exit_code == 0, r.output
    got = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [g["id"] for g in got] == [0, 1]      # each file once, nothing through the links
    # a directory input holding the loops terminates too
    r = stub_cli("feedback", d, "-o", tmp_path / "o2.jsonl", "--model", tiny_tokenizer_model,
                 "--max-tokens", "8", "-q")
    assert r.exit_code == 0, r.output


def test_a_gz_name_holding_zstd_is_read_as_zstd(stub_cli, tiny_tokenizer_model, tmp_path):
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(LINES) + b"\n"))
    out = tmp_path / "o.parquet"
    r = stub_cli("feedback", src, "-o", out, "--model", tiny_tokenizer_model, "--max-tokens",
                 "8", "-q")
    assert r.exit_code == 0, r.output
    rows = scored(out)
    assert [x["id"] for x in rows] == [0, 1, 2, 3, 4]
    assert all(x["nfb_error"] is None for x in rows)
    # and a .zst name holding gzip
    src2 = tmp_path / "in.jsonl.zst"
    src2.write_bytes(gzip.compress(b"\n".join(LINES)))
    assert count_rows([str(src2)]) == 5


@pytest.mark.parametrize("name", ["in.jsonl.gz", "in.jsonl.zst"])
def test_a_compressed_name_without_compressed_bytes_is_one_line(stub_cli, tiny_tokenizer_model,
                                                                tmp_path, name):
    src = tmp_path / name
    src.write_bytes(b"\n".join(LINES))
    r = stub_cli("feedback", src, "-o", tmp_path / "o.parquet", "--model",
                 tiny_tokenizer_model)
    assert r.exit_code == 1   # an input nfb cannot use (nfb.errors.InputError), before loading
    assert "is not" in r.output and "rename or recompress it" in r.output
    assert "Traceback" not in r.output


def test_invalid_utf8_is_kept_counted_and_warned(stub_cli, tiny_tokenizer_model, tmp_path,
                                                 caplog):
    lines = list(LINES)
    lines[1] = lines[1].replace(b"Tell", b"T\xffll")
    lines[3] = lines[3].replace(b"Tell", b"T\xc3ll")
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "o.parquet"
    with caplog.at_level(logging.WARNING, logger="nfb.io"):
        nfb.feedback(src, out, model=tiny_tokenizer_model, max_tokens=8)
    rows = scored(out)
    assert all(r["nfb_error"] is None for r in rows)
    assert rows[1]["prompt"].startswith("T\ufffdll")
    assert "2 line(s) hold bytes that are not UTF-8 (the first: line 2)" in caplog.text


@pytest.mark.parametrize("end", [b"\r", b"\r\n", b"\n"])
def test_every_line_end_splits_rows(stub_cli, tiny_tokenizer_model, tmp_path, end):
    src = tmp_path / "in.jsonl"
    src.write_bytes(end.join(LINES) + end)
    assert count_rows([str(src)]) == 5
    out = tmp_path / "o.parquet"
    nfb.feedback(src, out, model=tiny_tokenizer_model, max_tokens=8, batch_rows=2)
    rows = scored(out)
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["nfb_error"] is None for r in rows)


def test_a_line_over_max_line_bytes_is_one_error_row(stub_cli, tiny_tokenizer_model, tmp_path):
    lines = list(LINES)
    lines[2] = orjson.dumps({"id": 2, "prompt": "p " * 3000, "response": "r"})
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines))            # and no line end after the last line
    assert count_rows([str(src)]) == 5
    out = tmp_path / "o.parquet"
    nfb.feedback(src, out, model=tiny_tokenizer_model, max_tokens=8, max_line_bytes=1000,
                 batch_rows=2)
    rows = scored(out)
    assert [r["nfb_row"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[2]["nfb_error"] == f"line_too_long:{len(lines[2])} bytes > 1000"
    assert [r["id"] for i, r in enumerate(rows) if i != 2] == [0, 1, 3, 4]
    assert all(r["nfb_error"] is None for i, r in enumerate(rows) if i != 2)


LAUNCH = """
import sys
sys.path.insert(0, {tests!r})
import nfb.engines
import stub_engine
nfb.engines._FACTORIES["vllm"] = stub_engine.StubEngine
from nfb.cli import app
app(prog_name="nfb")
"""
LIMIT = 3 << 30   # the stub-engine run needs about 2 GiB of address space (threads, torch)


# an nfb subprocess under a memory limit, writing 220 MB of input (about 10 s): not in the
# fast subset
@pytest.mark.slow
def test_a_200_mb_line_under_a_memory_limit(tmp_path):
    """Before: rendered and tokenized whole, 90-190 bytes per byte (18.6 GB, OOM-killed).
    Now: the 200 MB line is read past (line_too_long), a 20 MB one under the line limit is
    refused on its characters without being rendered, and the other rows are scored."""
    import tiny_models
    rm = tiny_models.build_reward_model(tmp_path / "rm1", 1)
    src = tmp_path / "big.jsonl"
    with open(src, "wb") as f:
        f.write(orjson.dumps({"prompt": "hello", "response": "a short answer"}) + b"\n")
        f.write(b'{"prompt": "' + b"word " * (40 << 20) + b'", "response": "x"}\n')
        f.write(orjson.dumps({"prompt": "long " * (4 << 20), "response": "y"}) + b"\n")
        f.write(orjson.dumps({"prompt": "bye", "response": "another answer"}) + b"\n")
    assert src.stat().st_size > 220 << 20
    (tmp_path / "launch.py").write_text(LAUNCH.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "o.parquet"

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "launch.py", "score", str(src), "-o", str(out),
                        "--model", str(rm), "-q"], cwd=tmp_path, preexec_fn=limit, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = pq.read_table(out, columns=["nfb_row", "nfb_error", "reward"]).to_pylist()
    assert [x["nfb_row"] for x in rows] == [0, 1, 2, 3]
    assert rows[1]["nfb_error"].startswith("line_too_long:")
    assert rows[2]["nfb_error"].startswith("prompt_too_long:") and "characters" in \
        rows[2]["nfb_error"]
    assert rows[0]["nfb_error"] is None and rows[3]["nfb_error"] is None
    assert rows[0]["reward"] is not None and rows[3]["reward"] is not None
