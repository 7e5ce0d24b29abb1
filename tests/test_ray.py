"""--engine ray: Ray Data LLM on a local Ray (CPU, one replica) gives the in-process rows."""

import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl

pytest.importorskip("ray.data.llm", reason="pip install 'nfb[ray]'")

F32 = ["--dtype", "float32"]


def same_rows(a, b):
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.column_names == tb.column_names
    for name in ta.column_names:
        va, vb = ta.column(name).to_pylist(), tb.column(name).to_pylist()
        if name in ("feedback", "nfb_error", "nfb_row", "id", "prompt", "feedback_level"):
            assert va == vb, name
        elif isinstance(va[0], float):
            assert va == pytest.approx(vb, abs=1e-4), name


@pytest.fixture
def src(tmp_path):
    rows = sample_rows(20)
    rows[6]["response"] = 42
    rows[11]["prompt"] = "word " * 3000   # too long for the 4096-token tiny model
    return write_jsonl(tmp_path / "in.jsonl", rows)


def test_feedback_on_ray_equals_in_process(cli, models, src, tmp_path):
    args = ["--model", models["causal"], "--temperature", "0", "--max-tokens", "12", *F32]
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert cli("feedback", src, "-o", local, *args).exit_code == 0
    r = cli("feedback", src, "-o", remote, *args, "--engine", "ray", "--replicas", "1",
            "--ray-block-rows", "10")
    assert r.exit_code == 0, r.output
    same_rows(local, remote)
    errs = pq.read_table(remote).column("nfb_error").to_pylist()
    assert errs[6] == "bad_type:response" and errs[11].startswith("prompt_too_long")


def test_score_on_ray_equals_in_process(cli, models, src, tmp_path):
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    args = ["--model", models["rm9"], "--weights", "llama3-70b-steerlm", *F32]
    assert cli("score", src, "-o", local, *args).exit_code == 0
    r = cli("score", src, "-o", remote, *args, "--engine", "ray")
    assert r.exit_code == 0, r.output
    same_rows(local, remote)


def test_ray_usage_errors(cli, models, src, tmp_path):
    r = cli("feedback", src, "-o", tmp_path / "o.parquet", "--model", models["causal"],
            "--engine", "ray", "--samples", "2")
    assert r.exit_code == 2 and "one sample per request" in r.output
    r = cli("feedback", src, "-o", tmp_path / "o.parquet", "--model", models["causal"],
            "--replicas", "2")
    assert r.exit_code == 2 and "--engine ray" in r.output
