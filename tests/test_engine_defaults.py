"""Engine defaults that depend on the machine: eager on a CPU (vLLM 0.32's CPU build compiles
the model again on every start, which costs more than it saves), unless the user says."""

import pytest
from conftest import sample_rows, write_jsonl

from nfb.config import EngineConfig
from nfb.engines.vllm import engine_kwargs, on_cpu


@pytest.mark.skipif(not on_cpu(), reason="the CPU default")
def test_eager_by_default_on_cpu_and_the_flag_wins():
    assert engine_kwargs(EngineConfig(model="m"), "generate")["enforce_eager"] is True
    assert engine_kwargs(EngineConfig(model="m", enforce_eager=False), "generate"
                         )["enforce_eager"] is False
    assert engine_kwargs(EngineConfig(model="m", enforce_eager=True), "pooling"
                         )["enforce_eager"] is True


@pytest.mark.parametrize("flag,expected", [([], None), (["--enforce-eager"], True),
                                           (["--no-enforce-eager"], False)])
def test_enforce_eager_flag_reaches_the_engine(stub_cli, engines, models, tmp_path, flag,
                                               expected):
    from stub_engine import StubEngine

    seen = []

    def factory(cfg, runner):
        seen.append(cfg.enforce_eager)
        return StubEngine(cfg, runner)
    engines("vllm", factory)
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(2))
    r = stub_cli("feedback", src, "-o", tmp_path / "o.parquet", "--model", models["causal"],
                 "--max-tokens", "16", *flag)
    assert r.exit_code == 0, r.output
    assert seen == [expected]


def test_a_plugged_engine_that_is_not_an_engine_subclass_runs(engines, tiny_tokenizer_model,
                                                             tmp_path):
    """`register_engine` takes anything with the required methods (README): what it lacks
    (replicas, processes, notes) comes from the contract's defaults, and a restart it does
    not count itself is nfb's."""
    import pyarrow.parquet as pq
    from stub_engine import StubEngine

    import nfb
    from nfb.errors import EngineDied

    made = []

    class Bare:          # generate, tokenizer, max_model_len, close: nothing else
        def __init__(self, cfg, runner):
            inner = StubEngine(cfg, runner, die_after=5 if not made else None)
            made.append(self)
            self.tokenizer, self.max_model_len = inner.tokenizer, inner.max_model_len
            self._inner = inner

        def generate(self, requests, sampling, can_feed):
            return self._inner.generate(requests, sampling, can_feed)

        def close(self):
            pass

    engines("vllm", Bare)
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(20))
    out = tmp_path / "o.parquet"
    with pytest.raises(EngineDied, match="rows are saved"):
        nfb.feedback(src, out, model=tiny_tokenizer_model, max_tokens=16, batch_rows=2,
                     checkpoint_every=0)
    r = nfb.feedback(src, out, model=tiny_tokenizer_model, max_tokens=16, engine_restarts=1)
    assert len(made) == 2 and r.data_parallel == 1
    assert pq.read_table(out).column("nfb_row").to_pylist() == list(range(20))


def test_cpu_kv_cache_over_free_memory_is_named_with_what_to_lower():
    """vLLM 0.32's CPU worker refuses a fixed KV cache over its NUMA node's free memory with
    this text (vllm/v1/worker/cpu_worker.py), in the engine's log; nfb's one line names the
    setting to lower (raising --gpu-memory-utilization, the GPU advice, would not help)."""
    from nfb.engines.diagnose import load_failure

    log = ("(Worker pid=8590) ERROR [multiproc_executor.py:1063] ValueError: Available memory "
           "on node 0 (21.94/23.54 GiB) on kv cache allocation is less than requested memory "
           "for kv (30.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or "
           "reduce CPU memory used by other processes.\n")
    line = load_failure(RuntimeError("Engine core initialization failed. See root cause "
                                     "above. Failed core proc(s): {}"), log)
    assert line.startswith("not enough free memory for the KV cache: Available memory on "
                           "node 0 (21.94/23.54 GiB)")
    assert "(30.0 GiB); lower VLLM_CPU_KVCACHE_SPACE" in line
    assert "gpu-memory-utilization" not in line


@pytest.mark.parametrize("kv,cause,step,wrong", [
    # vLLM 0.32's cpu_worker texts, the KV cache sized from --gpu-memory-utilization
    ("(5.02/4.71 GiB)", "not enough free memory for the KV cache",
     "lower --gpu-memory-utilization", "raise"),
    ("(-0.31/4.71 GiB)", "the model leaves no room for a KV cache",
     "raise --gpu-memory-utilization", "lower"),
])
def test_cpu_kv_cache_sized_from_the_memory_share_names_the_way_out(kv, cause, step, wrong):
    from nfb.engines.diagnose import load_failure

    log = ("(Worker pid=8590) ERROR ValueError: Available memory on node 0 (3.90/23.54 GiB) on "
           f"kv cache allocation is less than requested memory for kv {kv}. Reduce CPU memory "
           "used by other processes.\n")
    line = load_failure(RuntimeError("Engine core initialization failed."), log)
    assert line.startswith(cause) and ": Available memory on node 0 (3.90" in line, line
    assert step in line and f"{wrong} --gpu-memory-utilization" not in line
    assert "VLLM_CPU_KVCACHE_SPACE" not in line


def test_cpu_memory_share_over_free_memory_at_startup_names_the_way_out():
    from nfb.engines.diagnose import load_failure

    log = ("ValueError: Available memory on node 0 (3.90/23.54 GiB) on startup is less than "
           "desired CPU memory utilization (0.2, 4.71 GiB). On the CPU backend, the "
           "`--gpu-memory-utilization` flag controls the fraction of CPU memory reserved\n")
    line = load_failure(RuntimeError("Engine core initialization failed."), log)
    assert line.startswith("not enough free memory for the engine: Available memory"), line
    assert "lower --gpu-memory-utilization" in line


def test_cpu_kv_cache_larger_than_the_machine_fails_before_vllm_starts(monkeypatch):
    """VLLM_CPU_KVCACHE_SPACE over the machine's memory: one line at once, nothing spawned."""
    import psutil

    from nfb.engines.vllm import check_cpu_kv_cache
    from nfb.errors import ModelError

    total = psutil.virtual_memory().total / 2**30
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", str(int(total) - 1))
    check_cpu_kv_cache()                 # under the total: vLLM's own check decides
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", str(int(total) + 1))
    if not on_cpu():
        check_cpu_kv_cache()             # the variable means nothing on a GPU
        return
    with pytest.raises(ModelError, match=r"VLLM_CPU_KVCACHE_SPACE asks for [\d,]+ GiB, more "
                                         r"than this machine's [\d.]+ GiB; lower"):
        check_cpu_kv_cache()


def test_a_plugin_that_streams_rows_itself_and_one_whose_setup_fails(engines,
                                                                     tiny_tokenizer_model,
                                                                     tmp_path):
    """A plugged-in engine with its own `stream_rows` (and no `streams_rows` flag) is handed
    the rows, as before the base class; an engine whose start succeeded but whose processes
    cannot be recorded is closed, not left running."""
    from stub_engine import StubEngine

    import nfb
    from nfb.errors import UsageError

    calls = []

    class Streams:
        def __init__(self, cfg, runner):
            inner = StubEngine(cfg, runner)
            self.tokenizer, self.max_model_len = inner.tokenizer, inner.max_model_len

        def stream_rows(self, *args, **kwargs):
            calls.append(sorted(kwargs))
            raise UsageError("this engine streams rows itself")

        def close(self):
            calls.append("closed")

    engines("vllm", Streams)
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(4))
    with pytest.raises(UsageError, match="streams rows itself"):
        nfb.feedback(src, tmp_path / "a.parquet", model=tiny_tokenizer_model, max_tokens=8)
    assert calls[0] == ["budget", "check_columns", "preparer", "set_total"]
    assert calls[-1] == "closed"

    class BadPids(Streams):
        def pids(self):
            raise OSError(28, "No space left on device")

    calls.clear()
    engines("vllm", BadPids)
    with pytest.raises(Exception, match="No space left"):
        nfb.feedback(src, tmp_path / "b.parquet", model=tiny_tokenizer_model, max_tokens=8)
    assert calls == ["closed"]
