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
