"""Count real vLLM engine starts over a test run, print them at the end, and make sure only
tests marked `slow` start one.

Starts happen in the pytest process (the shared engines of conftest's `cli` fixture), in
`python -m nfb` subprocesses, in data-parallel replica processes and in Ray workers. Each of
them loads engine_starts_site/sitecustomize.py (first on the PYTHONPATH that this module sets
for everything the run starts), which appends one line per vLLM `EngineCore` start to the
file named by NFB_TEST_ENGINE_STARTS. Lines are attributed to the test that was running when
the engine started (by time: a Ray worker does not know the test's name).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

SITE = Path(__file__).parent / "engine_starts_site"
_DIR = tempfile.mkdtemp(prefix="nfb-engine-starts-")
FILE = Path(_DIR) / "starts.jsonl"
os.environ["NFB_TEST_ENGINE_STARTS"] = str(FILE)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(SITE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

_spec = importlib.util.spec_from_file_location("_nfb_engine_starts_site",
                                               SITE / "sitecustomize.py")
_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_site)        # the pytest process counts its own starts too
_site.install()

_WINDOWS: list[tuple[str, float, float]] = []     # (test id, start, end)
_USED = {"real": False}
_SHARED = {"reused": 0, "started": 0}


_USES: list[tuple[str, str]] = []     # (test, engine key) of each shared-engine run


def used_a_real_engine(reused: bool = False, key=None) -> None:
    """conftest's shared_engine calls this: a test ran on a real engine (maybe a cached one)."""
    _USED["real"] = True
    _USES.append((os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0], repr(key)))
    _SHARED["reused" if reused else "started"] += 1
    if os.environ.get("NFB_TEST_NO_ENGINES"):
        pytest.fail("a real vLLM engine in a run without slow tests: mark the test slow",
                    pytrace=False)


def pytest_configure(config):
    """`-m "not slow"` is the fast subset: no engine may start in it (a start fails at once,
    in every process, and the guard below names the test)."""
    expr = " ".join((config.getoption("markexpr", "") or "").split())
    if expr == "not slow":
        os.environ["NFB_TEST_NO_ENGINES"] = "1"


def starts() -> list[dict]:
    if not FILE.exists():
        return []
    out = []
    for line in FILE.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item._nfb_t0 = time.time()
    _USED["real"] = False
    yield
    _WINDOWS.append((item.nodeid, item._nfb_t0, time.time()))


@pytest.fixture(autouse=True)
def _engine_starts_guard(request):
    """A test that starts (or uses) a real vLLM engine must be marked slow, so that
    `-m "not slow"` stays a fast subset on the stub engine."""
    yield
    item = request.node
    if item.get_closest_marker("slow"):
        return
    t0 = getattr(item, "_nfb_t0", 0.0)
    mine = [s for s in starts() if s["t"] >= t0]
    if mine or _USED["real"]:
        pytest.fail(f"{item.nodeid} runs a real vLLM engine ({len(mine)} started) but is not "
                    "marked slow: add @pytest.mark.slow", pytrace=False)


def _test_of(start: dict) -> str:
    for nodeid, t0, t1 in _WINDOWS:
        if t0 <= start["t"] <= t1:
            return nodeid
    name = start.get("test", "").rsplit(" (", 1)[0]
    return name or "(outside any test)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    found = starts()
    shutil.rmtree(_DIR, ignore_errors=True)
    if not _WINDOWS:
        return
    if os.environ.get("NFB_TEST_STARTS_LOG"):   # every start and shared-engine run, as JSON
        Path(os.environ["NFB_TEST_STARTS_LOG"]).write_text(json.dumps(
            {"starts": [dict(s, test_id=_test_of(s)) for s in found], "uses": _USES}))
    me = os.getpid()
    here = sum(1 for s in found if me in (s["pid"], s["ppid"]))   # an LLM's EngineCore
    seconds = sum(s["s"] for s in found)
    tr = terminalreporter
    tr.write_sep("-", "vLLM engine starts")
    tr.write_line(f"engine starts: {len(found)} ({here} in the pytest process, "
                  f"{len(found) - here} in subprocesses), {seconds:.0f} s starting engines; "
                  f"the shared engines served {_SHARED['started'] + _SHARED['reused']} runs "
                  f"with {_SHARED['started']} starts")
    if not found:
        return
    by_file: dict[str, list] = collections.defaultdict(list)
    by_test: dict[str, list] = collections.defaultdict(list)
    for s in found:
        test = _test_of(s)
        by_test[test].append(s)
        by_file[test.split("::")[0]].append(s)
    for name, group in sorted(by_file.items(), key=lambda kv: -sum(s["s"] for s in kv[1])):
        tr.write_line(f"  {len(group):3d}  {sum(s['s'] for s in group):6.0f} s  {name}")
    if config.getoption("verbose") > 0 or os.environ.get("NFB_TEST_STARTS_DETAIL"):
        for name, group in by_test.items():
            models = "; ".join(sorted({f"{Path(s['model']).name} {s.get('settings', '')}"
                                       for s in group}))
            tr.write_line(f"       {len(group):3d}  {sum(s['s'] for s in group):6.0f} s  "
                          f"{name}  [{models}]")
