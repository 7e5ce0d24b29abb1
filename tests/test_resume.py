"""Resume: SIGTERM of a real run (vLLM in a subprocess) checkpoints and exits 130, and the
bookkeeping of a resumed run (refusals, a free rerun, --overwrite) on the stub engine.

Kills at random points (also during the final merge and cleanup) are property-tested on the
stub engine in test_kill_property.py; kills of a real engine and of nfb alone, each followed
by a resume equal to an uninterrupted greedy run, are in test_faults.py."""

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
def data(tmp_path):
    rows = sample_rows(120)
    rows[17] = {"id": 17, "prompt": "no response"}
    return write_jsonl(tmp_path / "in.jsonl", rows)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_130(data, models, tmp_path):
    src = data
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


def test_resume_refuses_other_settings_and_rerun_is_free(stub_cli, engines, data,
                                                          tiny_tokenizer_model, tmp_path):
    import functools

    from stub_engine import StubEngine

    src = data
    model = tiny_tokenizer_model
    ref = tmp_path / "ref.parquet"
    engines("vllm", StubEngine)
    assert stub_cli("feedback", src, "-o", ref, "--model", model, *ARGS).exit_code == 0
    out = tmp_path / "out.parquet"
    engines("vllm", functools.partial(StubEngine, die_after=70))
    r = stub_cli("feedback", src, "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 1 and len(parts(out)) >= 1
    engines("vllm", StubEngine)
    # another model setting for the same output is refused, before loading
    r = stub_cli("feedback", src, "-o", out, "--model", model,
                 *ARGS[:2], "--temperature", "0.5", *ARGS[4:])
    assert r.exit_code == 2 and "--overwrite" in r.output
    # the same command finishes it
    r = stub_cli("feedback", src, "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 0, r.output
    compare(out, ref)

    # running the finished command again does nothing and loads nothing
    def boom(*a):
        raise AssertionError("the model must not load")
    engines("vllm", boom)
    r = stub_cli("feedback", src, "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 0 and "already complete" in r.output
    # an existing output from other settings is refused; --overwrite replaces it
    r = stub_cli("feedback", src, "-o", out, "--model", model, *ARGS, "--limit", "5")
    assert r.exit_code == 2 and "--overwrite" in r.output
    engines("vllm", StubEngine)
    r = stub_cli("feedback", src, "-o", out, "--model", model, *ARGS, "--limit", "5",
                 "--overwrite")
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).num_rows == 5
