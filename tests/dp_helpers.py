"""Replica factories for tests/test_data_parallel.py: each runs inside a replica process
(nfb.engines.replicas), which names its index in $NFB_REPLICA.

- `stub`: the stub engine; the replica whose index is `$NFB_TEST_SLOW_REPLICA` sleeps
  `$NFB_TEST_ROW_SLEEP` seconds per request (a slow replica).
- `dying_stub`: the stub engine; the replica `$NFB_TEST_DIE_REPLICA` dies (EngineDied) after
  `$NFB_TEST_DIE_AFTER` requests, once per run (a marker file in `$NFB_TEST_DIE_MARK`
  keeps its restart alive); with `$NFB_TEST_DIE_HARD=1` the replica process kills itself
  (SIGKILL) instead.
- `broken`: the replica `$NFB_TEST_BROKEN_REPLICA` fails to load, the others load.
"""

from __future__ import annotations

import os
import signal
import time

from nfb.errors import ModelError


def _index() -> int:
    return int(os.environ.get("NFB_REPLICA", "-1"))


def stub(cfg, runner):
    from stub_engine import StubEngine, slowed

    engine = StubEngine(cfg, runner)
    if os.environ.get("NFB_TEST_SLOW_REPLICA") == str(_index()):
        slowed(engine, float(os.environ.get("NFB_TEST_ROW_SLEEP", "0.05")))
    return engine


def dying_stub(cfg, runner):
    from stub_engine import StubEngine

    engine = StubEngine(cfg, runner)
    mark = os.path.join(os.environ["NFB_TEST_DIE_MARK"], f"died-{_index()}")
    if os.environ.get("NFB_TEST_DIE_REPLICA") == str(_index()) and not os.path.exists(mark):
        after = int(os.environ.get("NFB_TEST_DIE_AFTER", "5"))
        stream = engine._stream

        def dying(requests, can_feed):
            for n, item in enumerate(stream(requests, can_feed)):
                if n == after:
                    open(mark, "w").close()
                    if os.environ.get("NFB_TEST_DIE_HARD") == "1":
                        os.kill(os.getpid(), signal.SIGKILL)
                    from nfb.errors import EngineDied
                    raise EngineDied("the stub engine died (test)")
                time.sleep(0.002)
                yield item
        engine._stream = dying
    return engine


def broken(cfg, runner):
    if os.environ.get("NFB_TEST_BROKEN_REPLICA") == str(_index()):
        raise ModelError("not enough free memory for the engine (test)")
    return stub(cfg, runner)
