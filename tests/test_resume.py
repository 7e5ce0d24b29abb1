"""Kill a real run (SIGKILL to its whole process group) at several points, resume it, and
compare with an uninterrupted greedy run: every row exactly once, in order, same text."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl

ARGS = ["--max-tokens", "40", "--temperature", "0", "--dtype", "float32", "--batch-rows", "8",
        "--max-in-flight", "4", "--checkpoint-every", "0"]


def start(src, out, model, *extra):
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "nfb", "feedback", str(src), "-o", str(out), "--model",
         str(model), *ARGS, *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)


def parts(out):
    wd = out.with_name(out.name + ".nfb")
    return sorted(wd.glob("part-*.parquet")) if wd.exists() else []


def kill_when(proc, cond, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError("the run ended before the kill point:\n"
                                 + proc.stderr.read().decode()[-3000:])
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the run never reached the kill point")


def compare(out, ref):
    a, b = pq.read_table(out), pq.read_table(ref)
    assert a.num_rows == b.num_rows
    assert a.column("nfb_row").to_pylist() == list(range(b.num_rows))
    for name in ("id", "prompt", "nfb_error", "feedback", "feedback_level"):
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name


@pytest.fixture
def data(tmp_path, cli, models):
    rows = sample_rows(120)
    rows[17] = {"id": 17, "prompt": "no response"}
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    ref = tmp_path / "ref.parquet"
    r = cli("feedback", src, "-o", ref, "--model", models["causal"], *ARGS)
    assert r.exit_code == 0, r.output
    return src, ref


def test_kill_9_at_several_points_then_resume(data, models, tmp_path):
    src, ref = data
    out = tmp_path / "out.parquet"
    wd = tmp_path / "out.parquet.nfb"
    # 1) killed while the engine starts: the work directory exists, no part yet
    p = start(src, out, models["causal"])
    kill_when(p, lambda: (wd / "state.json").exists())
    # 2) killed right after the first checkpoint part
    p = start(src, out, models["causal"])
    kill_when(p, lambda: len(parts(out)) >= 1)
    n1 = len(parts(out))
    # 3) killed a few parts later
    p = start(src, out, models["causal"])
    kill_when(p, lambda: len(parts(out)) >= n1 + 3)
    done = sum(pq.ParquetFile(x).metadata.num_rows for x in parts(out))
    assert 0 < done < 120
    # 4) finishes
    p = start(src, out, models["causal"])
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr.decode()[-2000:]
    assert f"{done:,} rows already done" in stderr.decode()
    assert not wd.exists()
    compare(out, ref)


def test_sigterm_checkpoints_and_exits_130(data, models, tmp_path):
    src, ref = data
    out = tmp_path / "out.parquet"
    p = start(src, out, models["causal"])
    t0 = time.monotonic()
    while len(parts(out)) < 2 and p.poll() is None and time.monotonic() - t0 < 240:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGTERM)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr.decode()[-2000:]
    assert "run the same command again" in stderr.decode()
    assert len(parts(out)) >= 2


def test_resume_in_process_refuses_other_settings_and_rerun_is_free(cli, engines, data, models,
                                                                     tmp_path):
    src, ref = data
    out = tmp_path / "out.parquet"
    p = start(src, out, models["causal"])
    kill_when(p, lambda: len(parts(out)) >= 1)
    # another model setting for the same output is refused, before loading
    r = cli("feedback", src, "-o", out, "--model", models["causal"],
            *ARGS[:2], "--temperature", "0.5", *ARGS[4:])
    assert r.exit_code == 2 and "--overwrite" in r.output
    # the same command finishes it (shared engine)
    r = cli("feedback", src, "-o", out, "--model", models["causal"], *ARGS)
    assert r.exit_code == 0, r.output
    compare(out, ref)

    # running the finished command again does nothing and loads nothing
    def boom(*a):
        raise AssertionError("the model must not load")
    engines("vllm", boom)
    r = cli("feedback", src, "-o", out, "--model", models["causal"], *ARGS)
    assert r.exit_code == 0 and "already complete" in r.output
    # an existing output from other settings is refused; --overwrite replaces it
    r = cli("feedback", src, "-o", out, "--model", models["causal"], *ARGS, "--limit", "5")
    assert r.exit_code == 2 and "--overwrite" in r.output
    import conftest
    engines("vllm", conftest.shared_engine)
    r = cli("feedback", src, "-o", out, "--model", models["causal"], *ARGS, "--limit", "5",
            "--overwrite")
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).num_rows == 5
