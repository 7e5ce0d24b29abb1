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
