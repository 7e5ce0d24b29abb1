"""Helpers for tests/test_kill_property.py: engine plugins for nfb run in a subprocess
(`NFB_ENGINES="name=kill_helpers:factory"`), and a `sitecustomize` that kills the process
at an exact point of its file operations.

Engine factories (each called as factory(cfg, runner)):
- `slow_stub`: the stub engine, after writing the marker file `$NFB_TEST_MARK` (if set) and
  sleeping `$NFB_TEST_LOAD_SLEEP` seconds (a slow model load), and then until the file
  `$NFB_TEST_LOAD_UNTIL` exists (if set; 120 s at most); each request then takes
  `$NFB_TEST_ROW_SLEEP` seconds (a slow engine).
- `no_engine`: raises: the run must not load a model.

The kill points (`SITECUSTOMIZE`, written into a directory put first on PYTHONPATH) use an
audit hook (`sys.addaudithook`): `NFB_TEST_KILL="EVENT|SUBSTRING|N|DELAY|SIGNAL"` sends
SIGNAL (KILL or TERM) to the process group (KILL) or the process (TERM), DELAY seconds after
the Nth audit event EVENT (`open`, `os.rename` (also os.replace), `shutil.rmtree`,
`os.remove`) whose path arguments contain SUBSTRING; with DELAY 0 the signal is sent inside
the hook, that is just *before* the operation happens. Only paths under `$NFB_TEST_KILL_DIR`
count.
"""

from __future__ import annotations

import os
import time

SITECUSTOMIZE = r'''
import os, sys, signal, threading, time
_spec = os.environ.get("NFB_TEST_KILL")
if _spec:
    _event, _sub, _n, _delay, _sig = _spec.split("|")
    _n, _delay = int(_n), float(_delay)
    _sig = signal.SIGKILL if _sig == "KILL" else signal.SIGTERM
    _root = os.environ.get("NFB_TEST_KILL_DIR", "")
    _seen = [0]

    def _fire():
        if _sig == signal.SIGKILL:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    def _hook(event, args, _lock=threading.Lock()):
        if event != _event or _seen[0] >= _n:
            return
        paths = [os.fsdecode(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if not any(_root in os.path.abspath(p) and _sub in os.path.basename(p) for p in paths):
            return
        with _lock:
            _seen[0] += 1
            if _seen[0] != _n:
                return
        if _delay <= 0:
            _fire()
            if _sig == signal.SIGKILL:
                time.sleep(60)  # never go on past the kill point
        else:
            threading.Timer(_delay, _fire).start()

    sys.addaudithook(_hook)
'''


def write_sitecustomize(directory) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "sitecustomize.py"), "w") as fh:
        fh.write(SITECUSTOMIZE)
    return str(directory)


def slow_stub(cfg, runner):
    from stub_engine import StubEngine, slowed

    mark = os.environ.get("NFB_TEST_MARK")
    if mark:
        with open(mark, "w") as fh:
            fh.write("loading")
    time.sleep(float(os.environ.get("NFB_TEST_LOAD_SLEEP", "0")))
    until = os.environ.get("NFB_TEST_LOAD_UNTIL")   # a load that lasts until this file exists
    t0 = time.monotonic()
    while until and not os.path.exists(until) and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    engine = StubEngine(cfg, runner)
    row_sleep = float(os.environ.get("NFB_TEST_ROW_SLEEP", "0"))
    return slowed(engine, row_sleep) if row_sleep > 0 else engine


def no_engine(cfg, runner):
    raise RuntimeError("the model must not load on this run (test)")
