"""Fixtures: tiny random models built offline, and one real vLLM engine per model.

Starting a vLLM engine takes 30-45 s on a CPU, so CLI tests share engines: `nfb.cli`'s
`make_engine` is patched to hand out a cached engine (same model, runner and settings)
whose close() is a no-op. Everything else, the CLI included, runs as a user runs it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# vLLM on CPU sizes each engine's KV cache as a fraction of the machine's RAM (0.2 x 24 GiB);
# the suite keeps several tiny-model engines alive (and subprocesses, and Ray workers inherit
# this), so give each a fixed 1 GiB instead.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import tiny_models  # noqa: E402

# vLLM logs while it shuts engines down at the end of the session, when pytest has already
# closed the captured streams; those late log lines are not worth a traceback.
logging.raiseExceptions = False

_ENGINES: dict = {}


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "causal": tiny_models.build_causal_lm(root / "causal"),
        "rm9": tiny_models.build_reward_model(root / "rm9", 9),
        "rm1": tiny_models.build_reward_model(root / "rm1", 1, seed=1),
    }


class _Shared:
    """A cached engine handed to one run; close() leaves it running for the next test."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def close(self) -> None:
        pass


def shared_engine(engine_cfg, runner: str):
    from nfb.engines.vllm import VLLMEngine

    key = (engine_cfg.model, runner, engine_cfg.tensor_parallel_size, engine_cfg.dtype,
           engine_cfg.reward_token, engine_cfg.max_model_len)
    if key not in _ENGINES:
        _ENGINES[key] = VLLMEngine(engine_cfg, runner, 0.2)
    eng = _ENGINES[key]
    eng.cfg = dataclasses.replace(eng.cfg, max_in_flight=engine_cfg.max_in_flight)
    return _Shared(eng)


@pytest.fixture
def cli(monkeypatch):
    """Invoke the nfb CLI in-process (Typer's CliRunner) with shared engines."""
    from typer.testing import CliRunner

    import nfb.cli

    real = nfb.cli.make_engine

    def make(cfg, runner, mem):
        if cfg.backend != "vllm":  # Ray runs its own engines in its workers
            return real(cfg, runner, 0.2)
        return shared_engine(cfg, runner)
    monkeypatch.setattr(nfb.cli, "make_engine", make)
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(nfb.cli.app, [str(a) for a in args], input=input)
    return invoke


@pytest.fixture(scope="session", autouse=True)
def _close_engines():
    yield
    for eng in _ENGINES.values():
        eng.close()
    _ENGINES.clear()


def write_jsonl(path: Path, rows) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def sample_rows(n: int):
    topics = ["the sea", "photosynthesis", "Paris", "a fox", "numbers", "the sun", "rain"]
    return [{"id": i, "prompt": f"Tell me about {topics[i % len(topics)]} ({i}).",
             "response": f"Here is a short answer number {i} about {topics[i % len(topics)]}.",
             "grade": i % 3} for i in range(n)]
