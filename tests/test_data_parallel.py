"""--data-parallel: N engine replicas in one run (nfb.engines.replicas).

Pure logic (the device plan, the balancer) as unit tests; the replica mechanics (processes,
pipes, balancing, re-queueing, restarts, load failures) with stub engines inside real replica
processes; and real vLLM on the tiny models (CPU, one core per replica): -dp 2 equals -dp 1,
a resume with another -dp is exact, a replica SIGKILLed with and without --engine-restarts,
and kill -9 of nfb leaves no process of either replica.
"""

import os
import re
import signal
import time

import orjson
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl
from stub_engine import StubEngine
from test_faults import engine_procs, parts, start, wait_for

import nfb
from nfb.engines.replicas import Balancer, ReplicaSet, plan_replicas
from nfb.errors import EngineDied, Interrupted, UsageError
from nfb.run.pipeline import Progress

# --- the device plan ------------------------------------------------------------------------


def test_gpus_in_groups_of_tp_and_auto_fills_the_node():
    gpus = [str(i) for i in range(8)]
    assert plan_replicas(None, 4, gpus, [], None) == [
        {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}]
    assert len(plan_replicas(None, 1, gpus, [], None)) == 8
    assert plan_replicas(3, 2, ["GPU-a", "GPU-b", "GPU-c", "GPU-d", "GPU-e", "GPU-f"], [],
                         None)[2] == {"CUDA_VISIBLE_DEVICES": "GPU-e,GPU-f"}
    assert plan_replicas(None, 8, gpus[:4], [], None) == [{}]   # one replica: as without -dp
    with pytest.raises(UsageError, match=r"needs 12 GPUs, but 8 are visible"):
        plan_replicas(3, 4, gpus, [], None)


def test_cpu_cores_split_between_replicas():
    assert plan_replicas(None, 1, None, [0, 1], None) == [{}]        # auto on a CPU: one
    assert plan_replicas(2, 1, None, [0, 1], None) == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0"}, {"VLLM_CPU_OMP_THREADS_BIND": "1"}]
    assert plan_replicas(2, 2, None, list(range(8)), None) == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0-1|2-3"}, {"VLLM_CPU_OMP_THREADS_BIND": "4-5|6-7"}]
    # the user's own binding, one list per worker, is split between the replicas
    assert plan_replicas(2, 1, None, [0, 1], "0|1") == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0"}, {"VLLM_CPU_OMP_THREADS_BIND": "1"}]
    with pytest.raises(UsageError, match=r"names 2 core list\(s\).*needs 3"):
        plan_replicas(3, 1, None, [0, 1, 2], "0|1")
    with pytest.raises(UsageError, match=r"needs 3 CPU cores.*this machine has 2"):
        plan_replicas(3, 1, None, [0, 1], None)


# --- the balancer ---------------------------------------------------------------------------


def test_balancer_fewest_outstanding_tokens_window_and_row_affinity():
    b = Balancer(3, window=2)
    b.sent(0, "r0", 500)
    assert b.pick("r1") in (1, 2)
    b.sent(1, "r1", 100)
    assert b.pick("r2") == 2                     # 0 tokens out
    b.sent(2, "r2", 300)
    assert b.pick("r2") == 2                     # the same row stays on its replica
    assert b.pick("r3") == 1                     # fewest tokens, not next in turn
    b.sent(1, "r3", 100)
    assert b.pick("r4") == 2                     # 1 is at its window (2 requests)
    b.done(0, 500)
    assert b.pick("r5") == 0
    b.down(0)
    assert b.pick("r6") == 2 and b.pick("r3") == 1
    b.sent(2, "r6", 1)
    assert b.pick("r7") is None and not b.has_room()   # all windows full: wait
    b.up(0)
    assert b.pick("r7") == 0


# --- replica mechanics with stub engines in real replica processes --------------------------

FB = dict(max_tokens=64, batch_rows=5, checkpoint_every=0)


def _replicas(spec: str, made: list | None = None):
    """The engine seam: -dp N starts replica processes running `spec`; -dp 1 the stub."""
    def factory(cfg, runner):
        if cfg.data_parallel > 1:
            rs = ReplicaSet(cfg, runner, replica=spec)
            if made is not None:
                made.append(rs)
            return rs
        return StubEngine(cfg, runner)
    return factory


@pytest.fixture
def src(tmp_path):
    rows = sample_rows(60)
    rows[7]["response"] = None
    return write_jsonl(tmp_path / "in.jsonl", rows)


def _rows(path):
    t = pq.read_table(path)
    return t.to_pylist(), orjson.loads(t.schema.metadata[b"nfb"])


@pytest.mark.slow
def test_stub_replicas_same_output_balanced_by_load_and_resumable(
        engines, tiny_tokenizer_model, src, tmp_path, monkeypatch):
    """-dp 2 (replica 0 slow) gives -dp 1's rows and fingerprint; the fast replica serves
    most requests; the run says it ran 2 replicas; a -dp 2 run stopped midway resumes
    with -dp 1 to the same output."""
    made: list = []
    engines("vllm", _replicas("dp_helpers:stub", made))
    monkeypatch.setenv("NFB_TEST_SLOW_REPLICA", "0")
    monkeypatch.setenv("NFB_TEST_ROW_SLEEP", "0.05")
    ref = tmp_path / "ref.parquet"
    nfb.feedback(src, ref, model=tiny_tokenizer_model, data_parallel=1, **FB)
    out = tmp_path / "dp2.parquet"
    result = nfb.feedback(src, out, model=tiny_tokenizer_model, data_parallel=2,
                          max_in_flight=4, response_field=["response", "prompt"], **FB)
    assert result.data_parallel == 2
    served = made[-1].served
    assert sum(served) == 59 * 2 and served[1] > 2 * served[0], served
    rows, meta = _rows(out)
    assert meta["data_parallel"] == 2 and meta["summary"]["data_parallel"] == 2

    out = tmp_path / "dp2b.parquet"
    nfb.feedback(src, out, model=tiny_tokenizer_model, data_parallel=2, max_in_flight=4, **FB)
    a, b = _rows(out), _rows(ref)
    assert a[0] == b[0] and a[1]["fingerprint"] == b[1]["fingerprint"]

    class StopAfter(Progress):
        def advance(self, rows):
            if rows:
                raise KeyboardInterrupt
    part = tmp_path / "part.parquet"
    with pytest.raises(Interrupted):
        nfb.feedback(src, part, model=tiny_tokenizer_model, data_parallel=2,
                     progress=StopAfter(), **FB)
    r = nfb.feedback(src, part, model=tiny_tokenizer_model, data_parallel=1, **FB)
    assert 0 < r.resumed_rows < 60
    assert _rows(part)[0] == b[0]


@pytest.mark.slow
def test_stub_replica_dies_requeued_restarted_or_run_stops(
        engines, tiny_tokenizer_model, src, tmp_path, monkeypatch):
    """A replica dies mid-run: without restarts the run stops (exit 1, one line, rows
    saved); with --engine-restarts its unfinished requests are queued again, it restarts
    and the output is -dp 1's. Also when the replica process itself is SIGKILLed."""
    from typer.testing import CliRunner

    import nfb.cli

    engines("vllm", _replicas("dp_helpers:dying_stub"))
    mark = tmp_path / "marks"
    mark.mkdir()
    monkeypatch.setenv("NFB_TEST_DIE_MARK", str(mark))
    monkeypatch.setenv("NFB_TEST_DIE_REPLICA", "1")
    monkeypatch.setenv("NFB_TEST_DIE_AFTER", "6")
    monkeypatch.setenv("COLUMNS", "200")
    ref = tmp_path / "ref.parquet"
    nfb.feedback(src, ref, model=tiny_tokenizer_model, data_parallel=1, **FB)
    cli = CliRunner()
    args = ["feedback", str(src), "--model", str(tiny_tokenizer_model), "--max-tokens", "64",
            "--batch-rows", "5", "--checkpoint-every", "0", "--max-in-flight", "3"]

    out = tmp_path / "o.parquet"
    r = cli.invoke(nfb.cli.app, [*args, "-o", str(out), "-dp", "2"])
    assert r.exit_code == 1, r.output
    line = " ".join(r.output.split())
    assert re.search(r"error: replica 2 of 2 died: the stub engine died \(test\); [\d,]+ rows "
                     r"are saved in \S+; run the same command again", line), r.output
    assert "Traceback" not in r.output

    (mark / "died-1").unlink()
    r = cli.invoke(nfb.cli.app, [*args, "-o", str(out), "-dp", "2", "--engine-restarts", "1"])
    assert r.exit_code == 0, r.output
    assert "replica 2 of 2 died" in r.output and "restarting the replica" in r.output
    assert _rows(out)[0] == _rows(ref)[0]

    (mark / "died-1").unlink()
    monkeypatch.setenv("NFB_TEST_DIE_HARD", "1")
    out = tmp_path / "hard.parquet"
    r = cli.invoke(nfb.cli.app, [*args, "-o", str(out), "-dp", "2", "--engine-restarts", "1"])
    assert r.exit_code == 0, r.output
    assert "killed by signal 9 (SIGKILL)" in " ".join(r.output.split())
    assert _rows(out)[0] == _rows(ref)[0]


def test_one_replica_that_cannot_load_stops_before_scoring(engines, tiny_tokenizer_model, src,
                                                           tmp_path, monkeypatch):
    engines("vllm", _replicas("dp_helpers:broken"))
    monkeypatch.setenv("NFB_TEST_BROKEN_REPLICA", "1")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = tmp_path / "o.parquet"
    with pytest.raises(nfb.errors.ModelError) as e:
        nfb.feedback(src, out, model=tiny_tokenizer_model, data_parallel=2, **FB)
    assert str(e.value) == ("replica 2 of 2 could not start: not enough free memory for the "
                            "engine (test)")
    assert not parts(out) and not out.exists()
    deadline = time.monotonic() + 10       # stopped, if not yet reaped, on a loaded machine
    while True:
        left = [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"replica processes left running: {left}"


def test_more_replicas_than_cores_refused_before_loading(stub_cli, tiny_tokenizer_model, src,
                                                         tmp_path, engines):
    def no_engine(cfg, runner):
        raise AssertionError("nothing may load")
    engines("vllm", no_engine)
    n = len(os.sched_getaffinity(0)) + 1       # -dp 3 on this 2-core machine
    r = stub_cli("feedback", src, "-o", tmp_path / "o.parquet", "--model",
                 tiny_tokenizer_model, "-dp", n)
    assert r.exit_code == 2, r.output
    line = " ".join(r.output.split())
    assert f"--data-parallel {n} with -tp 1 needs {n} CPU cores" in line
    assert "lower --data-parallel" in line
    r = stub_cli("feedback", src, "-o", tmp_path / "o.parquet", "--model",
                 tiny_tokenizer_model, "-dp", "two")
    assert r.exit_code == 2 and "give a number of replicas, or auto" in r.output


@pytest.mark.slow
def test_replica_set_requeues_a_dead_replicas_requests(tiny_tokenizer_model,
                                                                   tmp_path, monkeypatch):
    """The Engine protocol directly: every request comes back once although a replica
    died (re-queued, restarted); with no restart left a death ends the stream."""
    from nfb.config import EngineConfig, SamplingConfig

    mark = tmp_path / "m"
    mark.mkdir()
    monkeypatch.setenv("NFB_TEST_DIE_MARK", str(mark))
    monkeypatch.setenv("NFB_TEST_DIE_REPLICA", "0")
    monkeypatch.setenv("NFB_TEST_DIE_AFTER", "3")
    cfg = EngineConfig(model=str(tiny_tokenizer_model), data_parallel=2, max_in_flight=2,
                       engine_restarts=1)
    rs = ReplicaSet(cfg, "generate", replica="dp_helpers:dying_stub",
                    envs=[{}, {}])
    try:
        reqs = [((i, 0), [5, 6, i]) for i in range(40)]
        got = dict(rs.generate(iter(reqs), SamplingConfig(samples=2), lambda: True))
        assert sorted(got) == [k for k, _ in reqs] and rs.restarts_used == 1
        assert all(len(v) == 2 for v in got.values())
        rs.restarts_left = 0                    # now a death stops the stream
        with pytest.raises(EngineDied, match=r"replica 2 of 2 died: the replica process "
                                             r"\(pid \d+\) was killed by signal 9"):
            for n, _ in enumerate(rs.generate(iter(reqs), SamplingConfig(), lambda: True)):
                if n == 2:
                    os.kill(rs.replicas[1].proc.pid, signal.SIGKILL)
    finally:
        rs.close()
    assert not [r for r in rs.replicas if r.proc.poll() is None]


# --- real vLLM on the tiny models (CPU: one core per replica) --------------------------------

FAST = ["--max-tokens", "16", "--temperature", "0", "--dtype", "float32", "--batch-rows", "6"]


@pytest.mark.slow
def test_dp2_equals_dp1_feedback_score_and_resume_across_dp(cli, models, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(36))
    outs = {}
    for dp in ("1", "2"):
        out = tmp_path / f"fb{dp}.parquet"
        r = cli("feedback", src, "-o", out, "--model", models["causal"], "-dp", dp, *FAST)
        assert r.exit_code == 0, r.output
        outs[dp] = _rows(out)
    assert "engine replicas (-dp)" in r.output
    assert outs["1"][0] == outs["2"][0]
    assert outs["2"][1]["data_parallel"] == 2
    assert outs["1"][1]["fingerprint"] == outs["2"][1]["fingerprint"]

    class StopAfter(Progress):
        seen = 0

        def advance(self, rows):
            StopAfter.seen += rows
            if StopAfter.seen >= 12:
                raise KeyboardInterrupt
    part = tmp_path / "part.parquet"
    kw = dict(model=models["causal"], max_tokens=16, temperature=0, dtype="float32",
              batch_rows=6, checkpoint_every=0)
    with pytest.raises(Interrupted):
        nfb.feedback(src, part, data_parallel=2, progress=StopAfter(), **kw)
    result = nfb.feedback(src, part, data_parallel=1, **kw)
    assert 12 <= result.resumed_rows < 36
    assert _rows(part)[0] == outs["1"][0]

    scores = {}
    for dp in ("1", "2"):
        out = tmp_path / f"sc{dp}.parquet"
        r = cli("score", src, "-o", out, "--model", models["rm9"], "-dp", dp, "--dtype",
                "float32", "--batch-rows", "6", "--weights", "llama3-70b-steerlm")
        assert r.exit_code == 0, r.output
        scores[dp] = _rows(out)[0]
    for a, b in zip(scores["1"], scores["2"]):
        for k, v in a.items():
            if isinstance(v, float):
                assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
            else:
                assert b[k] == v, k


def _replica_roots(pid):
    """nfb's replica processes (python -m nfb.engines.replicas), each with its own tree."""
    out = []
    for p in psutil.Process(pid).children():
        try:
            if "nfb.engines.replicas" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _engine_cores(root) -> list:
    """A replica's vLLM processes (its EngineCore and workers), not its guardian or
    multiprocessing's resource tracker: the engine itself."""
    out = []
    try:
        kids = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for k in kids:
        try:
            line = " ".join(k.cmdline()) or k.name()
        except psutil.Error:
            continue
        if "VLLM::" in line or ("multiprocessing" in line and "resource_tracker" not in line):
            out.append(k)
    return out


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_dp2_faults_kill_nfb_kill_a_replica_restart(cli, models, tmp_path):
    """One -dp 2 run, three faults (each start costs two engine loads):
    1. nfb alone SIGKILLed: no process of either replica outlives it;
    2. resumed, one replica's engine SIGKILLed: exit 1 in one line, rows saved;
    3. resumed with --engine-restarts 1, one replica process SIGKILLed: it restarts, the
       run finishes, and the output equals a -dp 1 run, each row once."""
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(240))
    ref = tmp_path / "ref.parquet"
    r = cli("feedback", src, "-o", ref, "--model", models["causal"], "--max-tokens", "40",
            "--temperature", "0", "--dtype", "float32", "--batch-rows", "8",
            "--max-in-flight", "4")
    assert r.exit_code == 0, r.output
    # 1) nfb killed alone (an output of its own: however far it got, the faults below,
    #    whose kills need rows still to do, start from nothing)
    out = tmp_path / "alone.parquet"
    p = start(src, out, models["causal"], "-dp", "2")
    wait_for(lambda: len(parts(out)) >= 1, p)
    victims = engine_procs(p.pid)
    assert len(_replica_roots(p.pid)) == 2 and len(victims) >= 4   # 2 x (replica, engine)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(v) for v in victims):
        time.sleep(0.2)
    assert not [v.pid for v in victims if _alive(v)], "orphan replica processes"

    # 2) one replica's engine killed, no restarts: the run stops. The kill comes as the rows
    #    start to flow (nfb records the replicas' processes once every replica has loaded),
    #    not after some checkpoint part: rows are written in input order, so on a loaded
    #    machine one slow replica can hold the first part back until nearly every row is done
    #    (CI: the first part held 208 of 240 rows), and a kill after it may find no work left.
    out = tmp_path / "out.parquet"
    ready = out.with_name(out.name + ".nfb") / "engine.json"
    p = start(src, out, models["causal"], "-dp", "2")
    wait_for(lambda: ready.exists() and all(_engine_cores(r) for r in _replica_roots(p.pid)),
             p)
    killed = []
    for k in _engine_cores(_replica_roots(p.pid)[1]):   # its EngineCore and workers
        try:
            killed.append(f"{k.pid} {k.name()}")
            k.kill()
        except psutil.NoSuchProcess:
            pass
    t0 = time.monotonic()
    _, err = p.communicate(timeout=90)
    err = err.decode()
    assert p.returncode == 1, f"killed {killed}\n" + err[-2000:]
    assert time.monotonic() - t0 < 30
    line = " ".join(err.split())
    assert re.search(r"error: replica \d of 2 died: the vLLM engine process \(pid \d+\) was "
                     r"killed by signal 9 \(SIGKILL\)", line), err[-2000:]
    assert "rows are saved" in line and "Traceback" not in err

    # 3) --engine-restarts 1: a whole replica killed as the rows flow, restarted, the run
    #    finishes
    assert not ready.exists()   # the stopped run forgot its engine
    p = start(src, out, models["causal"], "-dp", "2", "--engine-restarts", "1")
    wait_for(ready.exists, p)
    root = _replica_roots(p.pid)[0]
    root.kill()
    _, err = p.communicate(timeout=400)
    err = err.decode()
    assert p.returncode == 0, err[-2000:]
    assert "restarting the replica" in err
    a, b = pq.read_table(out), pq.read_table(ref)
    assert a.column("nfb_row").to_pylist() == list(range(240))
    for name in ("prompt", "nfb_error", "feedback", "feedback_level"):
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
