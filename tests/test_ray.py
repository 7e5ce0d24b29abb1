"""--engine ray on a simulated cluster (a head and 2 worker nodes of 1 CPU, CPU vLLM, the tiny
models): one streaming Ray Data pipeline per run gives the in-process rows, loads each
replica once, and survives a killed driver and a lost worker node.

Each Ray run loads its engines (30-70 s on this machine), so the runs are few and each checks
several things. The references are in-process runs of the same command (the shared engines
of the `cli` fixture)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiny_models
from conftest import sample_rows, write_jsonl

pytest.importorskip("ray.data.llm", reason="pip install 'nfb[ray]'")

ROOT = Path(__file__).resolve().parents[1]
F32 = ["--dtype", "float32"]
ENGINE = "vLLMEngineStageUDF"
N_KILL = 4000   # rows of the kill/node-loss run: long enough to be interrupted twice
# what legitimately differs between an in-process and a Ray output's provenance
RUN_ONLY = {"started", "finished", "summary"}


def same_output(local, remote) -> None:
    """The same rows, in the same order, with the same columns, types and provenance."""
    ta, tb = pq.read_table(local), pq.read_table(remote)
    assert ta.schema.remove_metadata() == tb.schema.remove_metadata()
    for name in ta.column_names:
        va, vb = ta.column(name).to_pylist(), tb.column(name).to_pylist()
        if pa_float(ta.schema.field(name).type):
            # lists (e.g. reward_samples): the same shape, then the values
            assert [len(x) if isinstance(x, list) else x is None for x in va] == \
                [len(x) if isinstance(x, list) else x is None for x in vb], name
            assert flat(va) == pytest.approx(flat(vb), abs=1e-4, nan_ok=True), name
        else:
            assert va == vb, name
    from nfb.io.writers import read_metadata
    ma, mb = read_metadata(str(local)), read_metadata(str(remote))
    assert {k: v for k, v in ma.items() if k not in RUN_ONLY} == \
        {k: v for k, v in mb.items() if k not in RUN_ONLY}
    sa, sb = dict(ma["summary"]), dict(mb["summary"])
    sb.pop("cluster")
    sa.pop("data_parallel"), sb.pop("data_parallel")
    assert sa == sb


def flat(values: list) -> list:
    return [v for x in values for v in (x if isinstance(x, list) else [x])]


def pa_float(t) -> bool:
    import pyarrow as pa
    return pa.types.is_floating(t) or (pa.types.is_list(t) and pa.types.is_floating(t.value_type))


def cluster_summary(path) -> dict:
    from nfb.io.writers import read_metadata
    return read_metadata(str(path))["summary"]["cluster"]


def _ray_pids() -> set[int]:
    """This process's descendants that are Ray's (its GCS, raylets, workers and what they
    started), not the shared in-process engines of other tests (their EngineCore is a
    child of this process too, and must outlive this module)."""
    import psutil

    def ray_own(q) -> bool:
        try:
            return "ray" in " ".join(q.cmdline()).lower()
        except psutil.Error:
            return False

    me = psutil.Process()
    out = set()
    for p in me.children(recursive=True):
        try:
            chain = [p]
            for q in p.parents():   # up to this process, not beyond
                if q.pid == me.pid:
                    break
                chain.append(q)
        except psutil.Error:
            continue
        if any(ray_own(q) for q in chain):
            out.add(p.pid)
    return out


@pytest.fixture(scope="module")
def cluster():
    """The one simulated cluster of this module: a head (no CPU: it only coordinates) and two
    worker nodes of 1 CPU each. Shut down at the end, with anything left killed by pid."""
    import ray
    from ray.cluster_utils import Cluster

    before = _ray_pids()
    # the nodes' workers import nfb (this checkout) and, for the stub processor, this module
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    old_path, os.environ["PYTHONPATH"] = os.environ.get("PYTHONPATH"), path
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    try:
        yield c
    finally:
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
        import psutil

        # Ray's processes as they are now: an engine actor whose raylet the shutdown stops
        # first is no longer this process's descendant after it (orphaned, still running)
        left = {}
        for pid in _ray_pids() - before:
            try:
                left[pid] = psutil.Process(pid)
            except psutil.Error:
                continue
        for _ in range(3):   # an abandoned run (the stall test) may connect Ray again
            ray.shutdown()
            try:
                c.shutdown()
                break
            except ValueError:
                continue
        for pid in _ray_pids() - before - set(left):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for proc in left.values():   # psutil checks it is still that process (no pid reuse)
            try:
                proc.kill()
            except psutil.Error:
                pass


def ray_args(cluster, replicas: int = 1) -> list[str]:
    return ["--engine", "ray", "--ray-address", cluster.address, "--replicas", str(replicas)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two files (row numbers continue across them), a bad row, a too-long row, and a chunk
    whose rows all fail (with --batch-rows 4: rows 12-15)."""
    d = tmp_path_factory.mktemp("rayin")
    rows = sample_rows(22)
    for r in rows:
        r["response2"] = r["response"].replace("short", "long and careful")
    rows[6]["response"] = 42
    rows[9]["prompt"] = "word " * 3000   # too long for the 4096-token tiny model
    for i in range(12, 16):
        rows[i]["prompt"] = None
    return [write_jsonl(d / "a.jsonl", rows[:12]), write_jsonl(d / "b.jsonl", rows[12:])]


# --- mechanics: Ray Data's pipeline with a stub in place of the vLLM stage -----------------

class vLLMEngineStageUDF:   # noqa: N801 - the name nfb counts as an engine actor
    """The stub engine's answers (tests/stub_engine.py) as Ray Data's engine actor would
    give them; `stall_from`: rows of that chunk on never answer in time."""

    def __init__(self, model: str, generate: bool, stall_from: int | None,
                 fail_once: str | None = None):
        import json

        conf = json.load(open(os.path.join(model, "config.json")))
        self.heads = int(conf.get("num_labels") or 1)
        self.generate, self.stall_from, self.fail_once = generate, stall_from, fail_once

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        from stub_engine import stub_heads, stub_text

        ids = [[int(x) for x in t] for t in batch["tokenized_prompt"]]
        if self.stall_from is not None and max(batch["nfb_chunk"]) >= self.stall_from:
            if self.fail_once is None:
                time.sleep(120)   # a replica that stops answering (until killed)
            elif not os.path.exists(self.fail_once):   # fails once, then answers
                open(self.fail_once, "w").close()
                raise RuntimeError("a replica failed")
        if self.generate:
            batch["generated_text"] = np.array(
                [stub_text(t, int(s)) for t, s in zip(ids, batch["nfb_s"])], dtype=object)
        else:
            batch["embeddings"] = np.array([stub_heads(t, self.heads) for t in ids],
                                           dtype=np.float32)
        return batch


def stub_processor(config, preprocess=None, postprocess=None, preprocess_map_kwargs=None,
                   postprocess_map_kwargs=None, stall_from: int | None = None,
                   fail_once: str | None = None):
    """`build_processor` with the stub engine in place of vLLM: nfb's preprocess and
    postprocess, run by Ray Data as with vLLM, around `config.concurrency` stub actors."""
    generate = config.task_type == "generate"

    def run(ds):
        ds = ds.map(preprocess, **(preprocess_map_kwargs or {}))
        ds = ds.map_batches(vLLMEngineStageUDF, batch_size=4, concurrency=config.concurrency,
                            num_cpus=0.1, fn_constructor_args=(config.model_source, generate,
                                                               stall_from, fail_once))
        return ds.map(postprocess, **(postprocess_map_kwargs or {}))
    return run


@pytest.mark.slow   # a Ray cluster: about a minute on 2 cores
def test_ray_pipeline_mechanics_equal_in_process(stub_cli, tiny_tokenizer_model, cluster,
                                                 inputs, tmp_path, monkeypatch):
    """The Ray pipeline (read per file, prepare in workers, parse in workers or gathered on
    the driver) gives the in-process rows of the same stub answers: feedback with 3 samples
    over two files and a chunk of error rows only, and two responses per row."""
    import ray.data.llm
    monkeypatch.setattr(ray.data.llm, "build_processor", stub_processor)
    model = str(tiny_tokenizer_model)
    for n, args in enumerate((["feedback", "--samples", "3", "--seed", "1"],
                 ["feedback", "--response-field", "response", "--response-field", "response2"])):
        common = [*inputs, "--model", model, "--batch-rows", "4", "--max-tokens", "8", *args[1:]]
        local = tmp_path / f"local{n}.parquet"
        remote = tmp_path / f"ray{n}.parquet"
        r = stub_cli(args[0], *common, "-o", local)
        assert r.exit_code == 0, r.output
        r = stub_cli(args[0], *common, "-o", remote, *ray_args(cluster, 2))
        assert r.exit_code == 0, r.output
        same_output(local, remote)
        assert pq.read_table(remote).column("nfb_row").to_pylist() == list(range(22))
        assert cluster_summary(remote)["engine_loads"] == 2   # the replicas, loaded once


@pytest.mark.slow   # a Ray cluster: about a minute on 2 cores
def test_ray_stalled_replica_stops_the_run_rows_saved(stub_cli, tiny_tokenizer_model, cluster,
                                                      inputs, tmp_path, monkeypatch):
    """A replica that stops answering: the stall watchdog stops the run (exit 1, one line,
    finished rows saved) and its replica with it. The same command with --engine-restarts 1,
    whose replica fails once, restarts the cluster's pipeline and finishes with the
    in-process rows; its counts are those of both engines (a load each)."""
    import functools

    import ray.data.llm
    common = [*inputs, "--model", str(tiny_tokenizer_model), "--batch-rows", "4",
              "--max-tokens", "8"]
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert stub_cli("feedback", *common, "-o", local).exit_code == 0
    monkeypatch.setattr(ray.data.llm, "build_processor",
                        functools.partial(stub_processor, stall_from=16))
    r = stub_cli("feedback", *common, "-o", remote, *ray_args(cluster), "--stall-timeout", "5")
    assert r.exit_code == 1, r.output
    assert "stalled" in r.output and "rows are saved" in r.output and not remote.exists()
    end = time.monotonic() + 30   # the stalled replica is stopped with the run, not left
    while _engine_actors(set()) and time.monotonic() < end:
        time.sleep(0.5)
    assert not _engine_actors(set())
    monkeypatch.setattr(ray.data.llm, "build_processor", functools.partial(
        stub_processor, stall_from=16, fail_once=str(tmp_path / "failed")))
    r = stub_cli("feedback", *common, "-o", remote, *ray_args(cluster), "--engine-restarts", "1")
    assert r.exit_code == 0, r.output
    assert "the Ray pipeline failed" in r.output and "restarting the engine" in r.output
    # the worker's own exception in one line, not Ray's copy of the worker's traceback
    assert "RuntimeError: a replica failed" in " ".join(r.output.split())
    assert "Traceback" not in r.output and "ray::" not in r.output
    same_output(local, remote)
    assert cluster_summary(remote)["engine_loads"] == 2


@pytest.mark.slow   # the module's Ray cluster
def test_ray_unreadable_input_is_one_line_before_any_engine(stub_cli, tiny_tokenizer_model,
                                                            cluster, inputs, tmp_path):
    """A file the workers cannot read (named .gz, not gzip data): the workers' read before the
    engines load fails, and nfb says what the in-process run says, in one line (exit 1), with
    no engine actor started."""
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b'{"prompt": "p", "response": "r"}\n')
    common = [*inputs, str(bad), "--model", str(tiny_tokenizer_model), "--max-tokens", "8"]
    local = stub_cli("feedback", *common, "-o", tmp_path / "local.parquet")
    before = {a["ActorID"] for a in _engine_actors(set())}
    r = stub_cli("feedback", *common, "-o", tmp_path / "ray.parquet", *ray_args(cluster))
    assert r.exit_code == local.exit_code == 1, r.output
    line = " ".join(r.output.split())
    assert "the name says gzip but the file is not gzip data" in line, r.output
    assert "Traceback" not in r.output and "ray::" not in r.output
    assert not _engine_actors(before)


@pytest.mark.slow
def test_feedback_samples_two_replicas_equal_in_process(cli, models, cluster, inputs, tmp_path):
    """Feedback with --samples 2 (seeded) on 2 replicas: the in-process rows, error rows and
    provenance; the engines load once each (2 loads), over several files and chunks."""
    args = [*inputs, "--model", models["causal"], "--temperature", "0.9", "--seed", "5",
            "--samples", "2", "--max-tokens", "6", "--batch-rows", "4", *F32]
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert cli("feedback", *args, "-o", local).exit_code == 0
    r = cli("feedback", *args, "-o", remote, *ray_args(cluster, 2))
    assert r.exit_code == 0, r.output
    same_output(local, remote)
    t = pq.read_table(remote)
    errs = t.column("nfb_error").to_pylist()
    assert errs[6] == "bad_type:response" and errs[9].startswith("prompt_too_long")
    assert all(e is not None for e in errs[12:16])
    assert t.column("nfb_row").to_pylist() == list(range(22))
    samples = t.column("feedback_samples").to_pylist()
    assert all(len(s) == 2 for s, e in zip(samples, errs) if e is None)
    c = cluster_summary(remote)
    # loads never exceed the replicas, however many chunks (with 22 rows Ray Data may finish
    # on the first replica before it starts the second: counted as it happened)
    assert c["replicas"] == 2 and 1 <= c["engine_loads"] <= 2 and c["rows_per_s_per_replica"] > 0
    assert "engine loads" in r.output and "rows/s per replica" in r.output


@pytest.mark.slow
def test_score_two_responses_steerlm_equal_in_process(cli, models, cluster, inputs, tmp_path):
    """Score with the SteerLM bias, two responses per row (each row is two requests,
    gathered on the driver): the in-process columns and values."""
    args = [*inputs, "--model", models["rm9"], "--weights", "llama3-70b-steerlm",
            "--response-field", "response", "--response-field", "response2",
            "--batch-rows", "4", *F32]
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert cli("score", *args, "-o", local).exit_code == 0
    r = cli("score", *args, "-o", remote, *ray_args(cluster))
    assert r.exit_code == 0, r.output
    same_output(local, remote)
    assert cluster_summary(remote)["engine_loads"] == 1


PRINCIPLES = ("correctness", "brevity")


@pytest.fixture(scope="module")
def genrm(tmp_path_factory):
    """One tiny Qwen3 trained (seconds) both as the Principle GenRM (a `principle` turn, then
    "Final Judgement: Yes/No") and as a GenRM of one response (its boxed helpfulness): one
    model, so the in-process references of both share one engine."""
    convs = []
    for i, r in enumerate(sample_rows(2)):
        user = {"role": "user", "content": r["prompt"]}
        for k, p in enumerate(PRINCIPLES):
            convs.append(([user, {"role": "assistant", "content": r["response"]},
                           {"role": "principle", "content": p}],
                          tiny_models.principle_target((i + k) % 2 == 0)))
        convs.append(([user, {"role": "response_1", "content": r["response"]}],
                       tiny_models.genrm_target([i + 3], None)))
    return tiny_models.build_principle_genrm(tmp_path_factory.mktemp("raygenrm") / "m", convs)


@pytest.mark.slow
def test_judge_and_principle_genrm_equal_in_process(cli, genrm, cluster, tmp_path):
    """`nfb judge` on Ray, row for row the in-process output: the Principle GenRM (its reward
    read from the log-probabilities the Ray engine stage returns; 2 samples gathered on the
    driver) and a GenRM of one response (parsed in the workers), over two files with an error
    row. A column clash is found by the workers' reads: exit 2, no engine started."""
    import ray

    rows = [{**r, "p": p} for r in sample_rows(2) for p in PRINCIPLES]
    rows.append({"prompt": "Q?", "response": 42, "p": None})
    srcs = [write_jsonl(tmp_path / "a.jsonl", rows[:3]),
            write_jsonl(tmp_path / "b.jsonl", rows[3:])]
    principle = ["--recipe", "qwen3-nemotron-32b-genrm-principle", "--principle-field", "p",
                 "--samples", "2", "--temperature", "0.3", "--seed", "3"]
    judge = ["--temperature", "0", "--max-tokens", "80"]
    clash = write_jsonl(tmp_path / "c.jsonl", [{**rows[0], "reward": 1.0}])

    def loads() -> int:
        return sum(ENGINE in str(a.get("ActorClassName"))
                   for a in ray._private.state.actors().values())
    before = loads()
    r = cli("judge", srcs[0], clash, "-o", tmp_path / "x.parquet", "--model", genrm, *principle,
            *F32, *ray_args(cluster))
    assert r.exit_code == 2 and "already has column(s) reward" in r.output, r.output
    assert loads() == before    # refused before any engine started
    for name, args in (("principle", principle), ("judge", judge)):
        common = [*srcs, "--model", genrm, "--batch-rows", "2", *args, *F32]
        local, remote = tmp_path / f"{name}-local.parquet", tmp_path / f"{name}-ray.parquet"
        r = cli("judge", *common, "-o", local)
        assert r.exit_code == 0, r.output
        r = cli("judge", *common, "-o", remote, *ray_args(cluster))
        assert r.exit_code == 0, r.output
        same_output(local, remote)
        got = pq.read_table(remote).to_pylist()
        assert [x["nfb_error"] is None for x in got] == [True] * 4 + [False]
        if name == "principle":   # the trained answers: rewards of both signs, from logprobs
            rewards = [v for x in got[:4] for v in x["reward_samples"]]
            assert any(v is not None and v > 0 for v in rewards)
            assert any(v is not None and v < 0 for v in rewards)
        else:
            assert [x["helpfulness"] for x in got[:4]] == [3, 3, 4, 4]
        assert cluster_summary(remote)["engine_loads"] == 1


def _engine_actors(job_not: set[str]) -> list[dict]:
    import ray
    return [a for a in ray._private.state.actors().values()
            if ENGINE in str(a.get("ActorClassName")) and a.get("State") == "ALIVE"
            and a["ActorID"] not in job_not]


def _wait(pred, proc, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_driver_killed_then_worker_node_lost(cli, models, cluster, tmp_path):
    """kill -9 of the driver mid-run, then the same command resumes; while it runs, the node
    of its engine is removed: Ray restarts the engine on the other node and the run
    finishes by itself. Each row once, the rows of an uninterrupted (in-process) run."""
    rows = sample_rows(N_KILL)
    per = N_KILL // 8   # 8 files: 8 read tasks whose results come back at different times
    srcs = [write_jsonl(tmp_path / f"in{i}.jsonl", rows[i * per:(i + 1) * per]) for i in range(8)]
    args = ["score", *srcs, "--model", models["rm9"], "--weights", "llama3-70b-steerlm",
            "--batch-rows", "16", "--max-in-flight", "16", *F32]
    local, out = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert cli(*args, "-o", local).exit_code == 0
    cmd = [sys.executable, "-m", "nfb", *map(str, args), "-o", str(out), "-q",
           "--checkpoint-every", "0.5", *ray_args(cluster)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    wd = Path(f"{out}.nfb")

    def parts():
        return sorted(wd.glob("part-*.parquet"))

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait(parts, first, 300, "a first checkpoint part")
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert not out.exists()
    kept = len(parts())

    seen = {a["ActorID"] for a in _engine_actors(set())}
    second = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    actor = _wait(lambda: _engine_actors(seen), second, 300, "the resumed run's engine")[0]
    _wait(lambda: len(parts()) > kept, second, 300, "a part of the resumed run")
    node = next(n for n in cluster.worker_nodes
                if n.node_id == actor["Address"]["NodeID"])
    cluster.remove_node(node)
    try:
        log = second.communicate(timeout=600)[0].decode()
        assert second.returncode == 0, log
    finally:
        cluster.add_node(num_cpus=1)   # the module's cluster keeps two worker nodes
        if second.poll() is None:
            second.kill()
    rows = pq.read_table(out).column("nfb_row").to_pylist()
    assert rows == list(range(N_KILL))    # each row once, in order
    same_output(local, out)
    c = cluster_summary(out)
    assert c["replicas"] == 1 and c["engine_loads"] == 2   # the restart after the node loss


def test_cluster_counts_cover_every_engine_of_the_run():
    """After an engine restart the run's counts are those of both engines: loads and seconds
    added up, rows per second per replica over both."""
    from types import SimpleNamespace

    from nfb.engines.ray import merged_counts

    def engine(loads, rows, seconds):
        return SimpleNamespace(rows_scored=rows, run_counts={
            "engine": "ray", "replicas": 2, "engine_loads": loads, "scoring_seconds": seconds,
            "load_seconds": 4.0, "driver_cpu_seconds": 1.5, "bookkeeping_cpu_seconds": 0.5,
            "rows_per_s_per_replica": rows / seconds / 2 if seconds else 0.0})
    got = merged_counts([engine(2, 100, 10.0), engine(3, 300, 30.0)])
    assert got == {"engine": "ray", "replicas": 2, "engine_loads": 5, "scoring_seconds": 40.0,
                   "load_seconds": 8.0, "driver_cpu_seconds": 3.0,
                   "bookkeeping_cpu_seconds": 1.0, "rows_per_s_per_replica": 5.0}
    assert merged_counts([engine(1, 0, 0.0)])["rows_per_s_per_replica"] == 0.0


def test_ray_usage_errors(cli, models, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(2))
    r = cli("feedback", src, "-o", tmp_path / "o.parquet", "--model", models["causal"],
            "--replicas", "2")
    assert r.exit_code == 2 and "--engine ray" in r.output
    r = cli("feedback", src, "-o", tmp_path / "o.parquet", "--model", models["causal"],
            "--engine", "ray", "--ray-block-rows", "10")
    assert r.exit_code == 2 and "--ray-block-rows is gone" in r.output
