"""Fixtures: tiny random models built offline, and one real vLLM engine per model.

Starting a vLLM engine takes 30-45 s on a CPU, so CLI tests share engines: the library's
engine seam (`nfb.engines`) hands out a cached engine (same model, runner and engine
settings) whose close() is a no-op. Tests of mechanics use the stub engine (tests/
stub_engine.py: a real tokenizer and chat template, deterministic outputs, no vLLM).
Everything else, the CLI included, runs as a user runs it.

Tests that start a real engine (or run nfb in subprocesses for many seconds) are marked
`slow`; `-m "not slow"` is the fast subset, and a start in it fails at once. Every engine
start of a run, in any process, is counted and printed at the end (tests/engine_starts.py).
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

import engine_starts  # noqa: E402
import tiny_models  # noqa: E402
from engine_starts import (  # noqa: E402,F401  (hooks: count and print engine starts)
    _engine_starts_guard,
    pytest_configure,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
    pytest_terminal_summary,
)

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

    def __init__(self, engine, max_in_flight: int):
        self._engine = engine
        engine.cfg = dataclasses.replace(engine.cfg, max_in_flight=max_in_flight)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def close(self) -> None:
        pass


def engine_key(cfg, runner: str) -> tuple:
    """Every engine setting that can change what the engine computes."""
    return (cfg.model, runner, cfg.revision, cfg.tensor_parallel_size, cfg.dtype,
            cfg.max_model_len, orjson.dumps(cfg.hf_overrides, option=orjson.OPT_SORT_KEYS),
            cfg.enable_prefix_caching, cfg.enforce_eager, cfg.trust_remote_code,
            cfg.data_parallel)


# each CPU engine holds ~1.5 GB (weights, 1 GiB of KV cache, torch): keep the most recently
# used few, or a full run of the suite outgrows the machine's 24 GiB and starts thrashing
MAX_ENGINES = int(os.environ.get("NFB_TEST_MAX_ENGINES", "3"))


# Files whose tests share the pytest process's engines of the tiny causal model and the
# 9-head reward model (float32), run one after another, in this order, so that those two
# engines start once for the whole run instead of again after every file between them (the
# cache keeps MAX_ENGINES). Every other file keeps its place, fastest feedback first.
SHARED_ENGINE_FILES = ["test_cli_feedback.py", "test_tensor_parallel.py",
                       "test_data_parallel.py", "test_ray.py", "test_cli_score.py",
                       "test_too_long.py"]
# With pytest-xdist (the README's command runs 2 workers, `--dist loadgroup`): the shared-
# engine files are one group, run by one worker in the order above; every other file is its
# own group. Groups go out longest first (a worker that finishes takes the next), so the
# run ends with short files on both workers, not one long file on one.
SHARED_GROUP = "shared-engines"
LONGEST_FIRST = ["test_faults.py", "test_judge.py", "test_kill_property.py",
                 "test_recipes.py", "test_demo.py", "test_workflow.py", "test_resume.py",
                 "test_convert.py", "test_storage.py", "test_outputs_safety.py"]


@pytest.hookimpl(tryfirst=True)      # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        if name in SHARED_ENGINE_FILES:
            return (0, SHARED_ENGINE_FILES.index(name)) if _xdist(config) else \
                (2, SHARED_ENGINE_FILES.index(name))
        if _xdist(config) and name in LONGEST_FIRST:
            return (1, LONGEST_FIRST.index(name))
        return (1, len(LONGEST_FIRST))
    items.sort(key=rank)          # stable: the order within a file never changes
    if _xdist(config):
        for item in items:
            name = item.path.name
            item.add_marker(pytest.mark.xdist_group(
                SHARED_GROUP if name in SHARED_ENGINE_FILES else name))


def _xdist(config) -> bool:
    """Collecting in an xdist worker of a `--dist loadgroup` run (xdist's workers collect;
    it sets `loadgroup` there and turns `dist` off)."""
    return bool(getattr(config.option, "loadgroup", False)) and \
        bool(os.environ.get("PYTEST_XDIST_WORKER"))


def shared_engine(engine_cfg, runner: str):
    from nfb.engines.replicas import ReplicaSet
    from nfb.engines.vllm import VLLMEngine

    key = engine_key(engine_cfg, runner)
    engine_starts.used_a_real_engine(reused=key in _ENGINES, key=key)
    if key in _ENGINES:
        _ENGINES[key] = _ENGINES.pop(key)          # most recently used last
    else:
        while len(_ENGINES) >= MAX_ENGINES:
            oldest = next(iter(_ENGINES))
            _ENGINES.pop(oldest).close()
        cfg = dataclasses.replace(engine_cfg, gpu_memory_utilization=0.2)
        # -dp N: N replica processes (nfb.engines.replicas), shared like one engine
        _ENGINES[key] = (ReplicaSet if cfg.data_parallel > 1 else VLLMEngine)(cfg, runner)
    return _Shared(_ENGINES[key], engine_cfg.max_in_flight)


@pytest.fixture
def engines(request):
    """The library's engine seam: `engines("vllm", factory)` replaces an engine for a test
    (nfb.engines.register_engine; the factory it replaced comes back after the test)."""
    from nfb.engines import register_engine

    def use(name, factory):
        old = register_engine(name, factory)
        if old is not None:
            request.addfinalizer(lambda: register_engine(name, old))
    return use


def _invoker(monkeypatch):
    from typer.testing import CliRunner

    import nfb.cli

    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(nfb.cli.app, [str(a) for a in args], input=input)
    return invoke


@pytest.fixture
def cli(monkeypatch, engines):
    """Invoke the nfb CLI in-process (Typer's CliRunner); real vLLM engines, shared between
    tests (same model and engine settings) through the library's engine seam."""
    engines("vllm", shared_engine)
    return _invoker(monkeypatch)


@pytest.fixture
def stub_cli(monkeypatch, engines):
    """The nfb CLI with the stub engine in place of vLLM: mechanics in milliseconds."""
    from stub_engine import StubEngine

    engines("vllm", StubEngine)
    return _invoker(monkeypatch)


@pytest.fixture(scope="session")
def tiny_tokenizer_model(tmp_path_factory) -> Path:
    """A model directory with a real tokenizer and chat template but random tiny weights:
    all the stub engine needs (no vLLM)."""
    return tiny_models.build_causal_lm(tmp_path_factory.mktemp("stub") / "causal")


@pytest.fixture(scope="module", autouse=True)
def _close_replica_sets():
    """A shared -dp engine (several replica processes, each with its engine) is used by one
    file only: stop it when that file ends, so the memory it holds is free for the next (the
    Ray cluster's memory monitor kills its engines above 95% of the machine's RAM)."""
    yield
    for key in [k for k, e in _ENGINES.items() if getattr(e, "data_parallel", 1) > 1]:
        _ENGINES.pop(key).close()


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
