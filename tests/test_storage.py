"""Object storage through the CLI, against a real S3 API server on localhost (moto's server
mode): input from S3 (a file, a prefix, a glob), output to S3 (Parquet, JSONL with its
sidecar), kill -9 and resume, a verb reading from S3, and one-line errors for a missing
bucket, a missing key and an unreachable store. The stub engine stands in for vLLM.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

TESTS = Path(__file__).parent
FAST = ["--max-tokens", "8", "--temperature", "0"]
SECRET = "nfb-test-secret-key-0123456789"


@pytest.fixture(scope="module")
def server():
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv._server.server_address[:2]
    yield f"http://{host}:{port}"
    srv.stop()


def _env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "nfb-test-key-id",
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(server, monkeypatch, tmp_path):
    """A fresh bucket; the environment points at the server; a private NFB_CACHE."""
    for k, v in _env(server).items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NFB_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3", endpoint_url=server, aws_access_key_id="nfb-test-key-id",
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    bucket = f"nfb-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)

    class S3:
        name = bucket
        endpoint = server
        cache = tmp_path / "cache"

        def put(self, key: str, body: bytes) -> str:
            client.put_object(Bucket=bucket, Key=key, Body=body)
            return f"s3://{bucket}/{key}"

        def get(self, key: str) -> bytes:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()

        def keys(self) -> list[str]:
            return sorted(o["Key"] for o in
                          client.list_objects_v2(Bucket=bucket).get("Contents", []))
    return S3()


def _jsonl(rows) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def _parquet_bytes(rows) -> bytes:
    import pyarrow as pa
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=3)
    return buf.getvalue()


def _one_line_error(r, code: int) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert SECRET not in r.output
    return lines[0]


def _values(table):
    return table.drop_columns([c for c in table.column_names if c == "__x"]).to_pylist()


def test_input_prefix_and_output_on_s3_equal_a_local_run(stub_cli, tiny_tokenizer_model, s3,
                                                         tmp_path):
    rows = sample_rows(14)
    s3.put("data/a.jsonl", _jsonl(rows[:6]) + b"{broken\n")
    s3.put("data/b.parquet", _parquet_bytes(rows[6:]))
    s3.put("data/notes.txt", b"not an input")
    write_jsonl(tmp_path / "a.jsonl", rows[:6])
    with open(tmp_path / "a.jsonl", "ab") as fh:
        fh.write(b"{broken\n")
    (tmp_path / "b.parquet").write_bytes(_parquet_bytes(rows[6:]))
    model = ["--model", tiny_tokenizer_model, *FAST]

    local = tmp_path / "local.parquet"
    r = stub_cli("feedback", tmp_path / "a.jsonl", tmp_path / "b.parquet", "-o", local, *model)
    assert r.exit_code == 0, r.output
    out = f"s3://{s3.name}/out/scored.parquet"
    r = stub_cli("feedback", f"s3://{s3.name}/data/", "-o", out, *model)
    assert r.exit_code == 0, r.output
    got = pq.read_table(io.BytesIO(s3.get("out/scored.parquet")))
    want = pq.read_table(local)
    assert got.num_rows == 15
    assert got.column("nfb_error").to_pylist()[6] == "malformed_json"
    assert got.to_pylist() == want.to_pylist()
    meta = orjson.loads(got.schema.metadata[b"nfb"])
    assert meta["inputs"] == [f"s3://{s3.name}/data/a.jsonl", f"s3://{s3.name}/data/b.parquet"]
    # only the output was written to the store; the local work directory is gone
    assert s3.keys() == ["data/a.jsonl", "data/b.parquet", "data/notes.txt",
                         "out/scored.parquet"]
    assert not any(p.is_file() for p in (s3.cache / "outputs").rglob("*")) \
        if (s3.cache / "outputs").exists() else True
    # the same command again: already done, nothing rewritten
    r = stub_cli("feedback", f"s3://{s3.name}/data/", "-o", out, *model)
    assert r.exit_code == 0, r.output
    # a glob over the store, JSONL output with its sidecar
    r = stub_cli("feedback", f"s3://{s3.name}/data/*.jsonl", "-o",
                 f"s3://{s3.name}/out/s.jsonl", *model)
    assert r.exit_code == 0, r.output
    lines = s3.get("out/s.jsonl").splitlines()
    assert [orjson.loads(x)["nfb_row"] for x in lines] == list(range(7))
    side = orjson.loads(s3.get("out/s.jsonl.nfb.json"))
    assert side["task"] == "feedback" and side["summary"]["rows"] == 7


def test_verbs_read_from_s3(stub_cli, models, s3, tmp_path):
    s3.put("in.jsonl", _jsonl(sample_rows(9)))
    out = f"s3://{s3.name}/scored.parquet"
    r = stub_cli("score", f"s3://{s3.name}/in.jsonl", "-o", out, "--model", models["rm9"],
                 "--weights", "llama3-70b-steerlm", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert orjson.loads(r.stdout)["requests"] == 9 and s3.keys() == ["in.jsonl"]
    r = stub_cli("score", f"s3://{s3.name}/in.jsonl", "-o", out, "--model", models["rm9"],
                 "--weights", "llama3-70b-steerlm", "--card")
    assert r.exit_code == 0, r.output
    assert s3.keys() == ["README.md", "in.jsonl", "scored.parquet"]
    import yaml
    card = yaml.safe_load(s3.get("README.md").decode().split("\n---\n")[0][4:])
    assert card["nfb"]["counts"]["rows"] == 9
    local = tmp_path / "scored.parquet"
    local.write_bytes(s3.get("scored.parquet"))
    r_s3, r_local = stub_cli("stats", out, "--json"), stub_cli("stats", local, "--json")
    assert r_s3.exit_code == 0, r_s3.output
    got, want = orjson.loads(r_s3.stdout), orjson.loads(r_local.stdout)
    assert got.pop("files") == [out] and want.pop("files") == [str(local)]
    assert got == want and got["rows"] == 9
    kept = tmp_path / "kept.jsonl"
    r = stub_cli("filter", out, "-o", kept, "--min-reward", "-1000")
    assert r.exit_code == 0, r.output
    assert len(kept.read_bytes().splitlines()) == 9


def test_missing_bucket_key_and_unreachable_store_are_one_line_errors(
        stub_cli, tiny_tokenizer_model, s3, tmp_path, monkeypatch):
    model = ["--model", tiny_tokenizer_model, *FAST]
    src = s3.put("in.jsonl", _jsonl(sample_rows(3)))
    line = _one_line_error(stub_cli("feedback", "s3://nfb-no-such-bucket/in.jsonl", "-o",
                                    tmp_path / "o.parquet", *model), 1)
    assert "no such bucket" in line
    line = _one_line_error(stub_cli("feedback", f"s3://{s3.name}/nope.jsonl", "-o",
                                    tmp_path / "o.parquet", *model), 1)
    assert "no such file" in line
    line = _one_line_error(stub_cli("feedback", src, "-o",
                                    "s3://nfb-no-such-bucket/out.parquet", *model), 2)
    assert "no such bucket" in line
    line = _one_line_error(stub_cli("stats", "s3://nfb-no-such-bucket/x.parquet"), 1)
    assert "no such bucket" in line
    assert not (tmp_path / "o.parquet").exists()
    # nothing listens on this port: the store cannot be reached
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    line = _one_line_error(stub_cli("feedback", src, "-o", tmp_path / "o.parquet", *model), 1)
    assert "connection" in line
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.slow
def test_kill_9_then_resume_with_output_on_s3(server, tiny_tokenizer_model, tmp_path):
    """`python -m nfb` from S3 to S3, killed with SIGKILL once checkpoint parts exist, then
    killed again just before the upload: the same command finishes it, and the output equals
    an uninterrupted run's (the store never holds a partial output)."""
    import kill_helpers

    cache = tmp_path / "cache"
    client = boto3.client("s3", endpoint_url=server, aws_access_key_id="nfb-test-key-id",
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    bucket = f"nfb-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    rows = sample_rows(40)
    client.put_object(Bucket=bucket, Key="in.jsonl", Body=_jsonl(rows))
    site = kill_helpers.write_sitecustomize(tmp_path / "site")
    env = {**os.environ, **_env(server), "NFB_CACHE": str(cache),
           "NFB_ENGINES": "slowstub=kill_helpers:slow_stub",
           "PYTHONPATH": os.pathsep.join([site, str(TESTS), str(TESTS.parent)]),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("NFB_TEST_KILL", "NFB_TEST_LOAD_SLEEP", "NFB_TEST_MARK", "AWS_PROFILE"):
        env.pop(k, None)
    out = f"s3://{bucket}/out/scored.parquet"
    args = [sys.executable, "-m", "nfb", "feedback", f"s3://{bucket}/in.jsonl", "-o", out,
            "--model", str(tiny_tokenizer_model), "--engine", "slowstub", *FAST,
            "--batch-rows", "4", "--checkpoint-every", "0", "--max-in-flight", "2"]

    def keys():
        return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents",
                                                                                  []))

    # 1. killed mid-run, once two parts are saved in the local work directory
    proc = subprocess.Popen(args, env={**env, "NFB_TEST_ROW_SLEEP": "0.05"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while len(list(cache.rglob("part-*.parquet"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() - t0 < 90
            time.sleep(0.01)
        os.killpg(proc.pid, 9)
    finally:
        proc.wait(timeout=30)
    assert keys() == ["in.jsonl"]
    # 2. the same command, killed just before it uploads (3rd open of the staging file:
    # mkstemp, write, the upload's read)
    r = subprocess.run(args, env={**env, "NFB_TEST_KILL": "open|-scored.parquet|3|0|KILL",
                                  "NFB_TEST_KILL_DIR": str(cache)},
                       capture_output=True, timeout=120, start_new_session=True)
    assert r.returncode == -9, r.stderr.decode()
    assert keys() == ["in.jsonl"]
    assert list(cache.rglob("part-*.parquet"))
    # 3. the same command finishes: merges the saved parts (all rows are done) and uploads
    r = subprocess.run(args, env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert b"Traceback" not in r.stderr
    assert keys() == ["in.jsonl", "out/scored.parquet"]
    assert not list(cache.rglob("*.parquet")) and not list(cache.rglob("*.nfb"))
    got = pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key="out/scored.parquet")
                                   ["Body"].read()))
    # the reference: the same job uninterrupted, to a local file
    ref = tmp_path / "ref.parquet"
    write_jsonl(tmp_path / "in.jsonl", rows)
    r = subprocess.run([*args[:4], str(tmp_path / "in.jsonl"), "-o", str(ref), *args[7:]],
                       env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    want = pq.read_table(ref)
    assert got.column("nfb_row").to_pylist() == list(range(40))
    assert got.drop_columns([]).to_pylist() == want.to_pylist()


def test_connection_dropped_mid_run_saves_rows_and_the_rerun_finishes(
        stub_cli, engines, tiny_tokenizer_model, s3, tmp_path, monkeypatch):
    """The store goes away while the input streams (a second server on its own port, stopped
    by the engine after a few rows): one line, exit 1, rows saved, nothing on the store;
    with the store back (same data, new port) the same command finishes."""
    from stub_engine import StubEngine

    pad = "x" * 100_000
    rows = [{**r, "pad": pad} for r in sample_rows(150)]      # 15 MB: past the read-ahead
    src = s3.put("big.jsonl", _jsonl(rows))
    out = f"s3://{s3.name}/out.parquet"
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:%d" % srv._server.server_port)

    class Dropping(StubEngine):
        def generate(self, requests, sampling, can_feed):
            for i, item in enumerate(super().generate(requests, sampling, can_feed)):
                if i == 5:
                    srv.stop()
                yield item

    engines("vllm", Dropping)
    args = ["feedback", src, "-o", out, "--model", tiny_tokenizer_model, *FAST,
            "--batch-rows", "1", "--max-in-flight", "1", "--checkpoint-every", "0"]
    line = _one_line_error(stub_cli(*args), 1)
    assert "connection to the store failed" in line and "rows are saved" in line
    parts = list(s3.cache.rglob("part-*.parquet"))
    assert parts
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    engines("vllm", StubEngine)
    r = stub_cli(*args)
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    t = pq.read_table(io.BytesIO(s3.get("out.parquet")))
    assert t.column("nfb_row").to_pylist() == list(range(150))
    assert t.column("pad").to_pylist() == [pad] * 150


def test_a_scheme_without_its_package_is_a_usage_error(stub_cli, tiny_tokenizer_model,
                                                       tmp_path):
    import importlib.util

    r = stub_cli("feedback", "nfbnosuch://b/x.jsonl", "-o", tmp_path / "o.parquet",
                 "--model", tiny_tokenizer_model)
    assert "unknown storage scheme nfbnosuch://" in _one_line_error(r, 2)
    if importlib.util.find_spec("gcsfs") is None:
        r = stub_cli("stats", "gs://b/x.parquet")
        assert "needs gcsfs" in _one_line_error(r, 2)


def test_rerun_with_the_output_in_its_input_prefix_is_complete(stub_cli, tiny_tokenizer_model,
                                                               s3):
    """An output written under the input prefix (or glob) is not read back as input: the
    same command again reports it complete instead of refusing an output that is an input."""
    s3.put("data/a.jsonl", _jsonl(sample_rows(5)))
    out = f"s3://{s3.name}/data/out.parquet"
    for spec in (f"s3://{s3.name}/data/", f"s3://{s3.name}/data/*"):
        args = (spec, "-o", out, "--model", tiny_tokenizer_model, *FAST)
        r = stub_cli("feedback", *args)
        assert r.exit_code == 0, r.output
        assert pq.read_table(io.BytesIO(s3.get("data/out.parquet"))).num_rows == 5
        r = stub_cli("feedback", *args)
        assert r.exit_code == 0 and "already complete" in " ".join(r.output.split()), r.output
