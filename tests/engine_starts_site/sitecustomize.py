"""Tests only: count vLLM engine starts in every process of a test run.

conftest puts this folder first on the PYTHONPATH of everything the suite starts (`python -m
nfb` subprocesses, data-parallel replicas, Ray workers) and names a file in
NFB_TEST_ENGINE_STARTS; the pytest process loads this module itself. When vLLM's
`vllm.v1.engine.core` is imported, `EngineCore.__init__` (one per engine, whatever started it:
`vllm.LLM`, an AsyncLLM in a Ray worker, a replica) is wrapped to append one JSON line per
start: when, how long it took, the model, the process, and the test that was running.
Nothing of nfb is changed. With NFB_TEST_NO_ENGINES set (conftest sets it for `-m "not slow"`)
a start fails at once instead, so the fast subset never loads a model.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import time

TARGET = "vllm.v1.engine.core"


def _settings(cfg) -> str:
    """The engine settings that make engines distinct (to see which could be shared)."""
    try:
        mc, pc = cfg.model_config, cfg.parallel_config
        return (f"{mc.runner_type} {str(mc.dtype).replace('torch.', '')} "
                f"len={mc.max_model_len} tp={pc.tensor_parallel_size} "
                f"eager={mc.enforce_eager}")
    except Exception:  # noqa: BLE001 - only a label
        return "?"


def _record(start: float, ok: bool, model: str, settings: str = "") -> None:
    path = os.environ.get("NFB_TEST_ENGINE_STARTS")
    if not path:
        return
    line = json.dumps({"t": start, "s": round(time.time() - start, 2), "ok": ok,
                       "model": model, "settings": settings, "pid": os.getpid(),
                       "ppid": os.getppid(),
                       "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
                       "worker": os.environ.get("PYTEST_XDIST_WORKER", ""),
                       "argv": " ".join(sys.argv[:3])})
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)
    except OSError:
        pass


def _patch(module) -> None:
    cls = getattr(module, "EngineCore", None)
    if cls is None or getattr(cls.__init__, "_nfb_counted", False):
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        if getattr(self, "_nfb_start_counted", False):   # a subclass calling up: one start
            return original(self, *args, **kwargs)
        self._nfb_start_counted = True
        cfg = args[0] if args else kwargs.get("vllm_config")
        model = str(getattr(getattr(cfg, "model_config", None), "model", "?"))
        start, ok = time.time(), False
        try:
            if os.environ.get("NFB_TEST_NO_ENGINES"):
                raise RuntimeError("a real vLLM engine in a run without slow tests "
                                   "(-m 'not slow'): mark the test slow")
            result = original(self, *args, **kwargs)
            ok = True
            return result
        finally:
            _record(start, ok, model, _settings(cfg))
    __init__._nfb_counted = True
    cls.__init__ = __init__


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                exec_module(module)
                _patch(module)
        spec.loader = _Loader()
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


if os.environ.get("NFB_TEST_ENGINE_STARTS"):
    install()
