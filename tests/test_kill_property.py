"""Kill the real CLI (`python -m nfb` in a subprocess, stub engine) at random and exact points,
run the same command again until it finishes, and compare with an uninterrupted run: every
input line exactly once, in order, with identical values, nothing left behind, no traceback.
Also: SIGTERM exits 130 with rows saved (model load, mid-run, final merge), `-o - | head`
ends quietly, and a rerun with a .gz input does not load the model.

The subprocesses find the stub engine through `NFB_ENGINES` (tests/stub_engine.py,
tests/kill_helpers.py); exact kill points come from an audit hook installed by a
`sitecustomize` (kill_helpers.SITECUSTOMIZE) on their PYTHONPATH. The uninterrupted
reference runs in this process (same CLI app, same engine), which saves an interpreter start.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import kill_helpers
import orjson
import pyarrow.parquet as pq
import pytest
import tiny_models
from conftest import sample_rows, write_jsonl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nasty import SCALARS, TEXT, values

# minutes of nfb subprocesses (stub engine): not in the fast subset (-m 'not slow')
pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
SUBPROCESS_TIMEOUT = 90


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Model directories, the sitecustomize directory, and the environment of a subprocess."""
    root = tmp_path_factory.mktemp("killprop")
    causal = tiny_models.build_causal_lm(root / "causal")
    rm9 = tiny_models.build_reward_model(root / "rm9", 9)
    site = kill_helpers.write_sitecustomize(root / "site")
    base = {**os.environ,
            "NFB_ENGINES": "stub=stub_engine:StubEngine,slowstub=kill_helpers:slow_stub",
            "PYTHONPATH": os.pathsep.join([site, str(TESTS)]),
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    for k in ("NFB_TEST_KILL", "NFB_TEST_KILL_DIR", "NFB_TEST_MARK", "NFB_TEST_LOAD_SLEEP",
              "NFB_TEST_ROW_SLEEP"):
        base.pop(k, None)
    return {"root": root, "causal": causal, "rm9": rm9, "env": base}


@pytest.fixture(scope="module", autouse=True)
def _engines_in_process():
    """The same plugins for the in-process reference runs."""
    from stub_engine import StubEngine

    import nfb.engines

    saved = dict(nfb.engines._FACTORIES)
    nfb.engines.register_engine("stub", StubEngine)
    nfb.engines.register_engine("slowstub", kill_helpers.slow_stub)
    yield
    nfb.engines._FACTORIES.clear()
    nfb.engines._FACTORIES.update(saved)


# --- running nfb ----------------------------------------------------------------------------

def invoke(args):
    """The CLI in this process (the uninterrupted reference)."""
    from typer.testing import CliRunner

    import nfb.cli
    r = CliRunner().invoke(nfb.cli.app, [str(a) for a in args])
    detail = r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback
        detail += "".join(traceback.format_exception(r.exception))
    return r.exit_code, detail


def start(args, env, **extra_env):
    return subprocess.Popen([sys.executable, "-m", "nfb", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**env, **extra_env}, start_new_session=True)


def finish(proc, timeout=SUBPROCESS_TIMEOUT) -> tuple[int, str]:
    """Wait for a run; whatever happens, its process group is gone afterwards."""
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err.decode(errors="replace")
    finally:
        killpg(proc)


def killpg(proc, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    if sig == signal.SIGKILL:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def wait_for(cond, proc, timeout=SUBPROCESS_TIMEOUT, step=0.005) -> bool:
    """Poll until cond() holds (True) or the process ends first (False)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(step)
    raise AssertionError("timed out waiting for the kill point")


def leftovers(out: Path) -> list[str]:
    """Anything of the run's machinery left beside OUT (its JSONL sidecar is not)."""
    keep = {out.name, out.name + ".nfb.json"}
    return sorted(p.name for p in out.parent.iterdir() if p.name not in keep)


def parts_rows(out: Path) -> int:
    wd = out.with_name(out.name + ".nfb")
    return sum(pq.ParquetFile(p).metadata.num_rows for p in wd.glob("part-*.parquet"))


def assert_same_output(out: Path, ref: Path, n: int) -> None:
    if out.suffix == ".parquet":
        a, b = pq.read_table(out), pq.read_table(ref)
        assert a.column("nfb_row").to_pylist() == list(range(n))
        assert a.schema.remove_metadata() == b.schema.remove_metadata()
        assert a.to_pylist() == b.to_pylist()
    else:
        got, want = out.read_bytes(), ref.read_bytes()
        rows = [json.loads(x) for x in got.splitlines()]
        assert [r["nfb_row"] for r in rows] == list(range(n))
        assert got == want


# --- 1. the property ------------------------------------------------------------------------

KEYS = ["id", "meta", "x", "é", "", "tags"]
VALUES = values(KEYS, max_leaves=6)
# prompt/response: mostly text, sometimes null, a number, a list or an object
FIELD = st.one_of(TEXT, TEXT, TEXT, st.none(), st.integers(), st.lists(TEXT, max_size=2),
                  st.dictionaries(st.sampled_from(KEYS), SCALARS, max_size=2))
ROWS = st.fixed_dictionaries({}, optional={"prompt": FIELD, "response": FIELD,
                                           **{k: VALUES for k in KEYS}})
BAD = st.sampled_from([b"", b"   ", b"{bad", b"[1, 2]", b'"text"', b"1e400x", b'{"a": NaN}',
                       b'{"prompt": "p", "response": "bad \xff byte"}', b"null", b"{}"])
ITEMS = st.lists(st.one_of(ROWS, ROWS, BAD), min_size=1, max_size=24)

# (how, *where): "ext" = SIGKILL from here at a random delay after the work directory appears;
# "parts" = SIGKILL from here as soon as the work directory holds K parts;
# "hook" = SIGKILL from inside at the Nth audit event EVENT whose path contains SUBSTRING
# (OUT is replaced by the output's name).
KILLS = st.one_of(
    st.tuples(st.just("ext"), st.floats(0, 2.5)),
    st.tuples(st.just("parts"), st.integers(1, 3)),
    st.tuples(st.just("hook"), st.just("open"), st.just("state.json"), st.just(1),
              st.just(0.0)),                                            # a new work dir
    st.tuples(st.just("hook"), st.just("os.rename"), st.just(".nfb.new-"), st.just(1),
              st.just(0.0)),                                            # ... before its rename
    st.tuples(st.just("hook"), st.just("open"), st.just(".part-"), st.integers(1, 4),
              st.sampled_from([0.0, 0.002, 0.02])),                    # a part mid-write
    st.tuples(st.just("hook"), st.just("os.rename"), st.just("part-"), st.integers(1, 4),
              st.just(0.0)),                                            # a part before rename
    st.tuples(st.just("hook"), st.just("open"), st.just(".OUT.tmp"), st.just(1),
              st.sampled_from([0.0, 0.002, 0.02])),                    # the final merge
    st.tuples(st.just("hook"), st.just("os.rename"), st.sampled_from([".OUT.tmp",
              ".nfb.json.tmp"]), st.just(1), st.just(0.0)),            # just before the commit
    st.tuples(st.just("hook"), st.just("os.rename"), st.just("nfb.trash"), st.just(1),
              st.just(0.0)),                                            # cleanup: OUT + OUT.nfb
    st.tuples(st.just("hook"), st.just("shutil.rmtree"), st.just("nfb.trash"),
              st.integers(1, 2), st.just(0.0)),                         # cleanup: the trash
)


def write_inputs(d: Path, items: list, layout: str, split: int) -> tuple[list[Path], int]:
    """The items (row dicts or raw bad lines) as input files; returns (files, input rows)."""
    from nfb.io.arrow import rows_to_table

    def lines(chunk):
        return [x if isinstance(x, bytes) else json.dumps(x, ensure_ascii=False).encode()
                for x in chunk]

    split = min(split, len(items))
    head, tail = items[:split], items[split:]
    files, n = [], 0
    if layout == "jsonl":
        head, tail = [], items
    if head:
        # Parquet gets the row objects (an "id" first: a table without columns has no rows)
        rows = [{"id": i, **x} for i, x in enumerate(head) if isinstance(x, dict)]
        if layout == "parquet+jsonl" and rows:
            f = d / "in0.parquet"
            pq.write_table(rows_to_table(rows), f, row_group_size=4)
            files.append(f)
            n += len(rows)
        else:
            body = b"\n".join(lines(head)) + b"\n"
            f = d / ("in0.jsonl.gz" if layout == "gz+jsonl" else "in0.jsonl")
            f.write_bytes(gzip.compress(body) if f.suffix == ".gz" else body)
            files.append(f)
            n += len(head)
    if tail:
        f = d / "in1.jsonl"
        f.write_bytes(b"\n".join(lines(tail)) + b"\n")
        files.append(f)
        n += len(tail)
    return files, n


@settings(max_examples=int(os.environ.get("NFB_KILL_EXAMPLES", "4")), deadline=None,
          database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@example(  # type drift between files and inside one, killed mid-run, then in the cleanup
    items=[{"prompt": "p0", "response": "r0", "meta": {"score": 4}, "x": 5},
           {"prompt": "p1", "response": "r1", "meta": {"score": 4}, "x": 2 ** 70},
           b"", {"prompt": "p3", "x": "five"},
           {"prompt": "p4", "response": "r4", "meta": {"score": [4, 5]}, "x": 5.0},
           b"{bad", {"prompt": "é 漢字", "response": None, "meta": [{"a": 1}], "x": [[[1]]]},
           {"prompt": "p7", "response": "r7", "meta": {"score": [{"s": 1}]}, "x": None}],
    layout="two_jsonl", split=3, verb="feedback", ext=".jsonl", batch=2, every=0,
    in_flight=3, kills=[("hook", "os.rename", "part-", 2, 0.0),
                        ("hook", "os.rename", "nfb.trash", 1, 0.0)])
@example(  # Parquet next to JSONL, killed after the first part, then in the final merge
    items=[{"id": i, "prompt": f"p{i}", "response": "r" * i, "meta": [i] * (i % 3) or None}
           for i in range(9)] + [b"[1, 2]", {"prompt": 1, "response": {"a": 2 ** 65}}],
    layout="parquet+jsonl", split=6, verb="score", ext=".parquet", batch=3, every=0,
    in_flight=2, kills=[("parts", 1), ("hook", "open", ".OUT.tmp", 1, 0.002)])
@given(items=ITEMS,
       layout=st.sampled_from(["jsonl", "two_jsonl", "gz+jsonl", "parquet+jsonl"]),
       split=st.integers(0, 24),
       verb=st.sampled_from(["feedback", "score"]),
       ext=st.sampled_from([".parquet", ".jsonl"]),
       batch=st.integers(1, 8), every=st.sampled_from([0, 0, 0.01, 0.2]),
       in_flight=st.integers(1, 8),
       kills=st.lists(KILLS, min_size=1, max_size=2))
def test_killed_anywhere_then_rerun_equals_uninterrupted(env, tmp_path_factory, items, layout,
                                                         split, verb, ext, batch, every,
                                                         in_flight, kills):
    d = tmp_path_factory.mktemp("ex")
    files, n = write_inputs(d, items, layout, split)
    (d / "ref").mkdir()
    (d / "run").mkdir()
    ref, out = d / "ref" / f"out{ext}", d / "run" / f"out{ext}"
    model = env["causal"] if verb == "feedback" else env["rm9"]
    opts = ["--model", model, "--engine", "stub", "--batch-rows", batch,
            "--checkpoint-every", every, "--max-in-flight", in_flight]
    if verb == "feedback":
        opts += ["--max-tokens", "64"]
    else:
        opts += ["--weights", "llama3-70b-steerlm"]
    rc, detail = invoke([verb, *files, "-o", ref, *opts])
    assert rc == 0, detail
    assert "Traceback" not in detail

    args = [verb, *files, "-o", out, *opts]
    wd = out.with_name(out.name + ".nfb")
    log = []
    for kill in kills:
        if kill[0] in ("ext", "parts"):
            p = start(args, env["env"])
            try:
                if kill[0] == "ext" and wait_for(lambda: (wd / "state.json").exists(), p):
                    time.sleep(kill[1])
                    killpg(p)
                elif kill[0] == "parts" and wait_for(
                        lambda k=kill: len(list(wd.glob("part-*.parquet"))) >= k[1], p):
                    killpg(p)
            finally:
                rc, err = finish(p)
        else:
            _, event, sub, nth, delay = kill
            sub = sub.replace("OUT", out.name)
            p = start(args, env["env"], NFB_TEST_KILL=f"{event}|{sub}|{nth}|{delay}|KILL",
                      NFB_TEST_KILL_DIR=str(d / "run"))
            rc, err = finish(p)
        log.append((kill, rc, err))
        assert rc in (0, -signal.SIGKILL), f"{kill}: exit {rc}\n{err[-3000:]}"
        assert "Traceback" not in err, f"{kill}:\n{err[-3000:]}"
    if os.environ.get("NFB_TEST_VERBOSE"):
        print(verb, ext, layout, n, batch, every, in_flight,
              [(k, rc, wd.exists(), out.exists()) for k, rc, _ in log])
    rc, err = finish(start(args, env["env"]))
    assert rc == 0, f"after {[k[:2] for k, _, _ in log]}: exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert_same_output(out, ref, n)
    assert leftovers(out) == []


# --- 2. SIGTERM: exit 130, rows saved, in three phases -----------------------------------------

def test_sigterm_during_load_midrun_and_merge_exits_130(env, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(120))
    opts = ["--model", env["causal"], "--engine", "slowstub", "--max-tokens", "64",
            "--batch-rows", "8", "--max-in-flight", "4", "--checkpoint-every", "0"]
    ref = tmp_path / "ref" / "out.parquet"
    ref.parent.mkdir()
    rc, detail = invoke(["feedback", src, "-o", ref, *opts])
    assert rc == 0, detail
    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "out.parquet"
    wd = out.with_name(out.name + ".nfb")
    args = ["feedback", src, "-o", out, *opts]

    # (a) during the model load: the engine factory is asleep
    mark = tmp_path / "loading"
    p = start(args, env["env"], NFB_TEST_MARK=str(mark), NFB_TEST_LOAD_SLEEP="20")
    try:
        assert wait_for(mark.exists, p), "the model load never started"
        os.kill(p.pid, signal.SIGTERM)
    finally:
        rc, err = finish(p, timeout=30)
    assert rc == 130, f"SIGTERM during the model load: exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in err and "run the same command again" in err, err[-3000:]
    assert wd.exists() and not out.exists()

    # (b) mid-run: a slow engine, SIGTERM after two checkpoint parts
    p = start(args, env["env"], NFB_TEST_ROW_SLEEP="0.03")
    try:
        assert wait_for(lambda: len(list(wd.glob("part-*.parquet"))) >= 2, p)
        os.kill(p.pid, signal.SIGTERM)
    finally:
        rc, err = finish(p, timeout=30)
    assert rc == 130, f"SIGTERM mid-run: exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    saved = parts_rows(out)
    assert 0 < saved < 120
    assert f"{saved:,} rows are saved" in err, err[-2000:]

    # (c) during the final merge: SIGTERM as the output's temporary file is opened
    p = start(args, env["env"], NFB_TEST_KILL=f"open|.{out.name}.tmp|1|0|TERM",
              NFB_TEST_KILL_DIR=str(out.parent))
    rc, err = finish(p)
    assert rc == 130, f"SIGTERM during the final merge: exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert f"{saved:,} rows already done" in err
    assert parts_rows(out) == 120 and not out.exists()
    assert not (out.parent / f".{out.name}.tmp").exists()

    # the same command finishes it, without the model, identical to the uninterrupted run
    rc, err = finish(start(args, {**env["env"], "NFB_ENGINES": "slowstub=kill_helpers:no_engine"}))
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    assert_same_output(out, ref, 120)
    assert leftovers(out) == []


# --- 3. -o - | head --------------------------------------------------------------------------

def test_stdout_into_head_ends_quietly(env, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(300))
    cmd = (f"set -o pipefail; {sys.executable} -m nfb feedback {src} -o - --model "
           f"{env['causal']} --engine slowstub --max-tokens 64 --batch-rows 1 "
           f"--max-in-flight 2 | head -n 3 > {tmp_path / 'head.txt'}")
    p = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**env["env"], "NFB_TEST_ROW_SLEEP": "0.005"},
                         start_new_session=True)
    rc, err = finish(p)
    lines = (tmp_path / "head.txt").read_bytes().splitlines()
    assert [orjson.loads(x)["nfb_row"] for x in lines] == [0, 1, 2]
    assert "Traceback" not in err and "Broken pipe" not in err, err[-3000:]
    assert rc == 0, f"nfb ... -o - | head: exit {rc}\n{err[-3000:]}"


# --- 4. a rerun with a .gz input does not load the model ---------------------------------------

def test_gz_rerun_does_not_load_the_model(env, tmp_path):
    body = b"".join(orjson.dumps(r) + b"\n" for r in sample_rows(40))
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(gzip.compress(body))
    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "out.parquet"
    opts = ["--model", env["causal"], "--engine", "stub", "--max-tokens", "64",
            "--batch-rows", "8", "--checkpoint-every", "0"]
    ref = tmp_path / "ref.parquet"
    rc, detail = invoke(["feedback", src, "-o", ref, *opts])
    assert rc == 0, detail
    args = ["feedback", src, "-o", out, *opts]
    no_model = {**env["env"], "NFB_ENGINES": "stub=kill_helpers:no_engine"}

    # every row is scored, then the run is killed as the final merge starts
    rc, err = finish(start(args, env["env"], NFB_TEST_KILL=f"open|.{out.name}.tmp|1|0|KILL",
                           NFB_TEST_KILL_DIR=str(out.parent)))
    assert rc == -signal.SIGKILL, err[-3000:]
    assert parts_rows(out) == 40 and not out.exists()
    # the rerun only merges
    rc, err = finish(start(args, no_model))
    assert rc == 0, f"the rerun loaded the model:\n{err[-3000:]}"
    assert_same_output(out, ref, 40)
    assert leftovers(out) == []
    # a rerun of the finished command does nothing, and loads nothing (in this process)
    import nfb.engines
    old = nfb.engines.register_engine("stub", kill_helpers.no_engine)
    try:
        rc, detail = invoke(args)
    finally:
        nfb.engines.register_engine("stub", old)
    assert rc == 0 and "already complete" in " ".join(detail.split()), detail  # any width
    assert leftovers(out) == []
