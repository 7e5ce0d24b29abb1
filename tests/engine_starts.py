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
# pytest-xdist: the controller process loads this first and its workers inherit the file's
# name, so every worker (and what each starts) appends to the one file the controller reads
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if WORKER and os.environ.get("NFB_TEST_ENGINE_STARTS"):
    FILE = Path(os.environ["NFB_TEST_ENGINE_STARTS"])
else:
    FILE = Path(tempfile.mkdtemp(prefix="nfb-engine-starts-")) / "starts.jsonl"
    os.environ["NFB_TEST_ENGINE_STARTS"] = str(FILE)
_DIR = FILE.parent
USES = _DIR / "uses.jsonl"      # one line per run on a shared engine, and each pytest pid
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(SITE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

_spec = importlib.util.spec_from_file_location("_nfb_engine_starts_site",
                                               SITE / "sitecustomize.py")
_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_site)        # the pytest process counts its own starts too
_site.install()

# (worker, test id) -> [first start, last stop] of its phases, from the test reports
_WINDOWS: dict[tuple[str, str], list[float]] = {}
_USED = {"real": False}


def _append(path: Path, record: dict) -> None:
    with open(path, "ab") as f:        # one short write per line: appends never interleave
        f.write(json.dumps(record).encode() + b"\n")


def used_a_real_engine(reused: bool = False, key=None) -> None:
    """conftest's shared_engine calls this: a test ran on a real engine (maybe a cached one)."""
    _USED["real"] = True
    _append(USES, {"test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0],
                   "key": repr(key), "reused": reused})
    if os.environ.get("NFB_TEST_NO_ENGINES"):
        pytest.fail("a real vLLM engine in a run without slow tests: mark the test slow",
                    pytrace=False)


def pytest_configure(config):
    """`-m "not slow"` is the fast subset: no engine may start in it (a start fails at once,
    in every process, and the guard below names the test)."""
    expr = " ".join((config.getoption("markexpr", "") or "").split())
    if expr == "not slow":
        os.environ["NFB_TEST_NO_ENGINES"] = "1"
    _append(USES, {"pytest_pid": os.getpid()})


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def starts() -> list[dict]:
    return _lines(FILE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item._nfb_t0 = time.time()
    _USED["real"] = False
    yield


def pytest_runtest_logreport(report):
    """Each test's time window (setup to teardown), per worker: starts are attributed to the
    test that ran in the same worker when the engine started."""
    node = getattr(report, "node", None)
    worker = getattr(getattr(node, "gateway", None), "id", "") or WORKER
    w = _WINDOWS.setdefault((worker, report.nodeid), [report.start, report.stop])
    w[0], w[1] = min(w[0], report.start), max(w[1], report.stop)


@pytest.fixture(autouse=True)
def _engine_starts_guard(request):
    """A test that starts (or uses) a real vLLM engine must be marked slow, so that
    `-m "not slow"` stays a fast subset on the stub engine."""
    yield
    item = request.node
    if item.get_closest_marker("slow"):
        return
    t0 = getattr(item, "_nfb_t0", 0.0)
    mine = [s for s in starts() if s["t"] >= t0 and s.get("worker", "") == WORKER]
    if mine or _USED["real"]:
        pytest.fail(f"{item.nodeid} runs a real vLLM engine ({len(mine)} started) but is not "
                    "marked slow: add @pytest.mark.slow", pytrace=False)


def _test_of(start: dict) -> str:
    for (worker, nodeid), (t0, t1) in _WINDOWS.items():
        if worker == start.get("worker", "") and t0 <= start["t"] <= t1:
            return nodeid
    name = start.get("test", "").rsplit(" (", 1)[0]
    return name or "(outside any test)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if WORKER:                 # the controller reads the file and prints, once
        return
    found, uses = starts(), _lines(USES)
    shutil.rmtree(_DIR, ignore_errors=True)
    if not _WINDOWS:
        return
    runs = [u for u in uses if "key" in u]
    started = sum(1 for u in runs if not u["reused"])
    if os.environ.get("NFB_TEST_STARTS_LOG"):   # every start and shared-engine run, as JSON
        Path(os.environ["NFB_TEST_STARTS_LOG"]).write_text(json.dumps(
            {"starts": [dict(s, test_id=_test_of(s)) for s in found], "uses": runs}))
    pytest_pids = {u["pytest_pid"] for u in uses if "pytest_pid" in u}
    here = sum(1 for s in found if pytest_pids & {s["pid"], s["ppid"]})  # an LLM's EngineCore
    seconds = sum(s["s"] for s in found)
    tr = terminalreporter
    tr.write_sep("-", "vLLM engine starts")
    tr.write_line(f"engine starts: {len(found)} ({here} in pytest processes, "
                  f"{len(found) - here} in subprocesses), {seconds:.0f} s starting engines; "
                  f"the shared engines served {len(runs)} runs with {started} starts")
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
