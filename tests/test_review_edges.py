"""Edges found by reviewing the security round: shards from nodes holding their own copies of
a model, a symlinked output name, the dataset card's writes, a pickle that would change a
class, and the rows a dry run says --too-long would shorten (stub engine; no vLLM)."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
import time

import orjson
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl

W = ("--weights", "llama3-70b-steerlm")


def test_shards_scored_with_copies_of_the_model_merge(stub_cli, models, tmp_path):
    """Each node of a sharded job has its own copy of the model (same files, other times):
    the shards merge, and the unsharded command sees the merge as complete."""
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(12))
    model = tmp_path / "models" / "rm9"          # the same path on every node
    shutil.copytree(models["rm9"], model)
    outs = []
    for i in range(2):
        if i:   # the second node's copy: the same files, written at another time
            later = time.time() + 100
            for f in model.iterdir():
                os.utime(f, (later, later))
        out = tmp_path / f"s{i}.parquet"
        r = stub_cli("score", src, "-o", out, "--model", model, *W, "--shard", f"{i}/2")
        assert r.exit_code == 0, r.output
        outs.append(out)
    merged = tmp_path / "all.parquet"
    r = stub_cli("merge", *outs, "-o", merged)
    assert r.exit_code == 0, r.output
    assert pq.read_table(merged).column("nfb_row").to_pylist() == list(range(12))
    r = stub_cli("score", src, "-o", merged, "--model", model, *W)
    assert r.exit_code == 0 and "already complete" in " ".join(r.output.split()), r.output


@pytest.mark.slow
def test_a_symlinked_output_name_is_the_same_output(tmp_path, models):
    """Two runs on one output reached by two names: the second is refused while the first
    holds the output (one lock and one work directory per file, whatever its name)."""
    from pathlib import Path

    tests = Path(__file__).parent
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(20))
    out = tmp_path / "out.parquet"
    alias = tmp_path / "alias.parquet"
    alias.symlink_to(out)
    mark, go = tmp_path / "loading", tmp_path / "go"
    env = {**os.environ, "NFB_ENGINES": "slowstub=kill_helpers:slow_stub",
           "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "NFB_TEST_MARK": str(mark),
           "NFB_TEST_LOAD_UNTIL": str(go)}
    for k in ("NFB_TEST_KILL", "NFB_TEST_LOAD_SLEEP", "NFB_TEST_ROW_SLEEP"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "nfb", "score", str(src), "--model", str(models["rm9"]), *W,
           "--engine", "slowstub", "-q"]
    first = subprocess.Popen([*cmd, "-o", str(out)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not mark.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert mark.exists(), "the first run never started its engine"
        env2 = {k: v for k, v in env.items() if k not in ("NFB_TEST_MARK", "NFB_TEST_LOAD_UNTIL")}
        second = subprocess.run([*cmd, "-o", str(alias)], env=env2, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2 and "is being written by nfb process" in second.stderr, \
            second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        go.write_text("go")
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()
    assert pq.read_table(out).num_rows == 20


def test_card_errors_are_one_line(stub_cli, tiny_tokenizer_model, tmp_path):
    """A README.md that is a folder: one line before the run (exit 2), never a traceback."""
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(3))
    d = tmp_path / "cdir"
    (d / "README.md").mkdir(parents=True)
    r = stub_cli("feedback", src, "-o", d / "o.parquet", "--model", tiny_tokenizer_model,
                 "--max-tokens", "16", "--card")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "README.md" in r.output
    assert not (d / "o.parquet").exists()


def test_card_is_written_through_a_unique_temporary(stub_cli, tiny_tokenizer_model, tmp_path):
    """A stale `README.md.tmp` (another writer's fixed name before) does not stop the card."""
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(3))
    d = tmp_path / "c2"
    (d / "README.md.tmp").mkdir(parents=True)
    r = stub_cli("feedback", src, "-o", d / "o.parquet", "--model", tiny_tokenizer_model,
                 "--max-tokens", "16", "--card")
    assert r.exit_code == 0, r.output
    assert (d / "README.md").read_text().startswith("---")
    assert not [p for p in d.iterdir() if ".tmp-" in p.name]


def test_a_pickle_that_sets_a_class_state_is_refused():
    """BUILD on an allowed class would set attributes of that class for the whole process
    (here PurePath.__fspath__): refused, and the class is unchanged."""
    import pathlib

    from nfb.models.nemo import _SafeUnpickler

    payload = (b"cpathlib\nPurePath\nN}X\x0a\x00\x00\x00__fspath__"
               b"ctorch.serialization\n_get_layout\ns\x86b.")
    with pytest.raises(pickle.UnpicklingError, match="state of a class"):
        _SafeUnpickler(io.BytesIO(payload)).load()
    assert os.fspath(pathlib.Path("/tmp")) == "/tmp"


def test_dry_run_counts_the_rows_too_long_would_shorten(stub_cli, tiny_tokenizer_model,
                                                        engines, tmp_path):
    """The dry run's count of shortened rows equals the real run's."""
    long_history = [{"role": r, "content": "word " * 60}
                    for r in ("user", "assistant") * 6]
    rows = [{"messages": [*long_history, {"role": "user", "content": f"Q{i}?"},
                          {"role": "assistant", "content": f"A{i}."}]} for i in range(6)]
    rows += [{"messages": [{"role": "user", "content": "short?"},
                           {"role": "assistant", "content": "yes"}]}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ("--model", tiny_tokenizer_model, "--messages-field", "messages",
            "--max-model-len", "320", "--max-tokens", "16", "--too-long", "drop-context")
    r = stub_cli("feedback", src, "-o", tmp_path / "plan.parquet", *args, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = orjson.loads(r.stdout)
    out = tmp_path / "o.parquet"
    r = stub_cli("feedback", src, "-o", out, *args)
    assert r.exit_code == 0, r.output
    meta = orjson.loads(pq.read_schema(out).metadata[b"nfb"])
    assert meta["summary"]["truncated"] == plan["truncated"] == 6
