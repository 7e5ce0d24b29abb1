"""Engines and the one seam that starts them.

`make_engine(cfg, runner)` starts the engine named by `cfg.backend`: "vllm" (in this process,
or with `cfg.data_parallel` > 1 one replica process per device group, nfb.engines.replicas)
or "ray" (Ray Data LLM). `register_engine(name, factory)` adds or replaces one; tests use it
to hand runs a shared or stub engine, and a site can plug in its own, also from the
environment (`NFB_ENGINES="name=module:callable"`, e.g. for nfb run as a subprocess).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nfb.config import EngineConfig

Factory = Callable[[EngineConfig, str], Any]


def _vllm(cfg: EngineConfig, runner: str):
    if cfg.data_parallel > 1:   # one process per replica, each with devices of its own
        from nfb.engines.replicas import ReplicaSet
        return ReplicaSet(cfg, runner)
    from nfb.engines.vllm import VLLMEngine
    return VLLMEngine(cfg, runner)


def _ray(cfg: EngineConfig, runner: str):
    from nfb.engines.ray import RayEngine
    return RayEngine(cfg, runner)


def _check_ray() -> None:
    from nfb.engines.ray import check_ray
    check_ray()


_FACTORIES: dict[str, Factory] = {"vllm": _vllm, "ray": _ray}
# capability checks that need no model (run before anything loads)
_CHECKS: dict[str, Callable[[], None]] = {"ray": _check_ray}


def register_engine(name: str, factory: Factory, check: Callable[[], None] | None = None
                    ) -> Factory | None:
    """Make `--engine NAME` start `factory(cfg, runner)`; returns the factory it replaced."""
    old = _FACTORIES.get(name)
    _FACTORIES[name] = factory
    if check is not None:
        _CHECKS[name] = check
    return old


def check_engine(name: str) -> None:
    from nfb.errors import UsageError

    if name not in _FACTORIES:
        raise UsageError(f"--engine {name!r}: use {' or '.join(_FACTORIES)}")
    if name in _CHECKS:
        _CHECKS[name]()


def make_engine(cfg: EngineConfig, runner: str):
    """Start the engine named by `cfg.backend` (the run wraps one that is not an
    `nfb.engines.base.Engine` in `Plugged`, with the contract's defaults)."""
    return _FACTORIES[cfg.backend](cfg, runner)


def _load_plugins() -> None:
    """NFB_ENGINES="name=module:callable,...": engines a site (or a test harness running nfb
    in a subprocess) plugs in; each callable is called as factory(cfg, runner)."""
    import importlib
    import os

    spec = os.environ.get("NFB_ENGINES", "").strip()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, target = item.partition("=")
        module, _, attr = target.partition(":")

        def factory(cfg, runner, module=module, attr=attr):
            return getattr(importlib.import_module(module), attr)(cfg, runner)
        _FACTORIES[name.strip()] = factory


_load_plugins()
