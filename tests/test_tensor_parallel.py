"""Tensor parallel 2 (on CPU: two worker processes) gives the same greedy output as 1."""

import os

import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl

FAST = ["--max-tokens", "16", "--temperature", "0", "--dtype", "float32"]


@pytest.mark.slow
def test_tp2_equals_tp1(cli, models, tmp_path, request):
    # -tp 2 on a CPU binds each worker to cores through VLLM_CPU_OMP_THREADS_BIND, set in this
    # process's environment; leave it as found for the tests after this one (the -dp core plan)
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        request.addfinalizer(lambda: os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None))
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(24))
    outs = {}
    for tp in ("1", "2"):
        out = tmp_path / f"tp{tp}.parquet"
        r = cli("feedback", src, "-o", out, "--model", models["causal"], "-tp", tp, *FAST)
        assert r.exit_code == 0, r.output
        outs[tp] = pq.read_table(out)
    assert outs["1"].column("feedback").to_pylist() == outs["2"].column("feedback").to_pylist()
    assert outs["2"].column("nfb_error").null_count == 24
