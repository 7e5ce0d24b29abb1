"""Engine faults with real vLLM on the tiny model, run as a user runs nfb (a subprocess):
the engine killed mid-run, nfb killed alone, a start that cannot fit in memory, and a
default run's stderr holding only nfb's own lines."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl

# real engines in nfb subprocesses: not in the fast subset (-m 'not slow')
pytestmark = pytest.mark.slow

ARGS = ["--max-tokens", "40", "--temperature", "0", "--dtype", "float32", "--batch-rows", "8",
        "--max-in-flight", "4", "--checkpoint-every", "0"]


def start(src, out, model, *extra, env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("VLLM_LOGGING_LEVEL", None)   # nfb's own default: the user's view
    return subprocess.Popen(
        [sys.executable, "-m", "nfb", "feedback", str(src), "-o", str(out), "--model",
         str(model), *ARGS, *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)


def engine_procs(pid):
    """The engine's processes: nfb's descendants except its guardian."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if "nfb.engines.guard" not in " ".join(k.cmdline()):
                out.append(k)
        except psutil.Error:
            pass
    return out


def parts(out):
    wd = out.with_name(out.name + ".nfb")
    return sorted(wd.glob("part-*.parquet")) if wd.exists() else []


def wait_for(cond, proc, timeout=480):
    # generous: a -dp 2 start under a loaded CI (six processes importing vLLM) once took
    # more than 240 s to its first part; the wait ends as soon as cond() holds
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError("the run ended early:\n" + proc.stderr.read().decode()[-3000:])
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def data(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("faults")
    rows = sample_rows(240)     # 30 parts of 8 rows: the last fault still finds rows to do
    src = write_jsonl(d / "in.jsonl", rows)
    ref = d / "ref.parquet"
    p = start(src, ref, models["causal"])
    _, err = p.communicate(timeout=400)
    assert p.returncode == 0, err.decode()[-3000:]
    return src, ref, err.decode()


def same(out, ref):
    a, b = pq.read_table(out), pq.read_table(ref)
    assert a.column("nfb_row").to_pylist() == list(range(b.num_rows))
    for name in ("prompt", "nfb_error", "feedback", "feedback_level"):
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name


def test_default_stderr_holds_only_nfb_lines(data):
    """A new user's first run: progress, summary, level table; no vLLM/torch/Triton noise."""
    _, _, err = data
    allowed = re.compile(r"^\s*$|[│┃┏┡└┌├╇━─┓┩┘┐┤]|^nfb feedback|^feedback levels|rows|"
                         r"^\S+\.parquet\s*$")
    noise = [ln for ln in err.splitlines() if not allowed.search(ln)]
    assert not noise, "\n".join(noise[:20])
    for word in ("WARNING", "INFO", "Triton", "FutureWarning", "Traceback", "NUMA",
                 "force killing", "tcmalloc"):
        assert word not in err, word


def test_kill_nfb_alone_then_the_engine_then_restart(data, models, tmp_path):
    """One run, three faults (each engine start costs ~30 s on a CPU, so they are chained):
    1. nfb's pid alone is SIGKILLed: no engine process outlives it;
    2. the resumed run's engine is SIGKILLed: nfb exits 1 within 30 s with one line;
    3. with --engine-restarts 1 the engine is SIGKILLed again: the run finishes by itself,
    and the output equals an uninterrupted run, each row once."""
    src, ref, _ = data
    # 1) nfb killed alone (an output of its own: how far it got must not shorten the
    #    faults below, whose kills need rows still to do however loaded the machine is)
    out = tmp_path / "alone.parquet"
    p = start(src, out, models["causal"])
    wait_for(lambda: len(parts(out)) >= 1, p)
    victims = engine_procs(p.pid)
    assert victims
    os.kill(p.pid, signal.SIGKILL)      # nfb's pid only, not its group
    p.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(v) for v in victims):
        time.sleep(0.2)
    assert not [v.pid for v in victims if _alive(v)], "orphan engine processes"

    # 2) the engine killed mid-run: exit 1, one line, rows kept
    out = tmp_path / "out.parquet"
    p = start(src, out, models["causal"])
    wait_for(lambda: len(parts(out)) >= 2, p)
    victims = engine_procs(p.pid)
    assert victims
    t0 = time.monotonic()
    for v in victims:
        v.kill()
    _, err = p.communicate(timeout=60)
    took = time.monotonic() - t0
    err = err.decode()
    assert p.returncode == 1, err[-2000:]
    assert took < 30
    line = " ".join(err.split())
    assert "killed by signal 9 (SIGKILL)" in line and "possibly out of memory" in line
    assert "rows are saved" in line and "run the same command again" in line
    assert "Traceback" not in err
    n2 = len(parts(out))

    # 3) --engine-restarts 1: the engine dies once more, is restarted, the run finishes
    p = start(src, out, models["causal"], "--engine-restarts", "1")
    wait_for(lambda: len(parts(out)) >= n2 + 2, p)
    for v in engine_procs(p.pid):
        v.kill()
    _, err = p.communicate(timeout=400)
    assert p.returncode == 0, err.decode()[-2000:]
    assert "restarting the engine" in err.decode()
    same(out, ref)


def _alive(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_model_too_big_for_memory_is_one_line(models, tmp_path):
    """A KV cache larger than the machine: nfb says so in one line before vLLM spawns its
    processes (~1 s instead of a ~35 s start that fails in vLLM's worker)."""
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(8))
    env = {"VLLM_CPU_KVCACHE_SPACE": "100000"}   # ask for 100 TB of KV cache
    p = start(src, tmp_path / "o.parquet", models["causal"], env=env)
    _, err = p.communicate(timeout=300)
    err = err.decode()
    assert p.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) <= 3 and lines[0].startswith("error:"), err[-2000:]
    assert "memory" in err
    assert "lower VLLM_CPU_KVCACHE_SPACE" in " ".join(err.split())   # what to do next
