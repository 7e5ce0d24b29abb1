"""Shared outputs, changed models and inputs, foreign folders, forged records: nothing corrupts,
nothing is deleted, nothing unrelated is killed, every failure is one line (issue 23).

Runs go through the CLI: in this process with the stub engine (`stub_cli`), or as `python -m
nfb` subprocesses that find the stub engine through NFB_ENGINES (as test_kill_property.py
does) where two processes must run at once.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl

TESTS = Path(__file__).parent
ARGS = ["--max-tokens", "40", "--temperature", "0", "--batch-rows", "8", "--max-in-flight", "4",
        "--checkpoint-every", "0"]


def one_line_error(output: str) -> str:
    """The CLI's error: exactly one `error:` line and no traceback."""
    assert "Traceback" not in output, output
    lines = [x for x in output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", sample_rows(60))


@pytest.fixture
def model(tiny_tokenizer_model, tmp_path) -> Path:
    """A private copy of the tiny model (some tests change it)."""
    dst = tmp_path / "models" / "causal"
    shutil.copytree(tiny_tokenizer_model, dst)
    return dst


@pytest.fixture
def killed(stub_cli, engines, data, model, tmp_path):
    """An unfinished run: the stub engine dies after 45 rows (several parts saved)."""
    from stub_engine import StubEngine

    def make(out: Path, *extra):
        engines("vllm", functools.partial(StubEngine, die_after=45))
        r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS, *extra)
        assert r.exit_code == 1, r.output
        engines("vllm", StubEngine)
        wd = out.with_name(out.name + ".nfb")
        assert len(list(wd.glob("part-*.parquet"))) >= 2
        return wd
    return make


def reference(stub_cli, data, model, tmp_path, name="ref.parquet") -> Path:
    ref = tmp_path / name
    r = stub_cli("feedback", data, "-o", ref, "--model", model, *ARGS)
    assert r.exit_code == 0, r.output
    return ref


# --- item 2: one process per output ---------------------------------------------------------

@pytest.fixture
def sub_env(tmp_path):
    env = {**os.environ, "NFB_ENGINES": "slowstub=kill_helpers:slow_stub",
           "PYTHONPATH": str(TESTS), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "COLUMNS": "200"}
    for k in ("NFB_TEST_KILL", "NFB_TEST_MARK", "NFB_TEST_LOAD_SLEEP", "NFB_TEST_ROW_SLEEP"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_two_runs_on_one_output_one_is_refused_the_other_exact(stub_cli, data, model,
                                                                tmp_path, sub_env):
    ref = reference(stub_cli, data, model, tmp_path)
    out = tmp_path / "run" / "out.parquet"
    out.parent.mkdir()
    args = [sys.executable, "-m", "nfb", "feedback", str(data), "-o", str(out), "--model",
            str(model), *ARGS, "--engine", "slowstub"]
    mark, go = tmp_path / "loading", tmp_path / "go"
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**sub_env, "NFB_TEST_MARK": str(mark),
                                  "NFB_TEST_LOAD_UNTIL": str(go)},
                             start_new_session=True)
    try:
        t0 = time.monotonic()
        while not mark.exists() and time.monotonic() - t0 < 120:   # it holds the output
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            time.sleep(0.02)
        second = subprocess.run(args, capture_output=True, env=sub_env, timeout=90)
        err = second.stderr.decode()
        assert second.returncode == 2, err
        line = one_line_error(err)
        assert f"being written by nfb process {first.pid}" in line and "feedback" in line
        assert first.poll() is None           # the refused run never touched the first one
        go.write_text("go")
        _, err1 = first.communicate(timeout=120)
        assert first.returncode == 0, err1.decode()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert table(out) == table(ref)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.parquet"]


def test_a_verb_refuses_an_output_another_process_writes(stub_cli, data, model, tmp_path):
    from nfb.io.outputs import OutputLock

    scored = reference(stub_cli, data, model, tmp_path)
    kept = tmp_path / "kept.parquet"
    with OutputLock(kept):   # another writer holds it (flock: per open file, so this counts)
        for verb in (["filter", scored, "-o", kept, "--min-level", "1"],
                     ["pairs", scored, "-o", kept, "--group-by", "prompt"],
                     ["report", scored, "-o", tmp_path / "r.html"]):
            if verb[0] == "report":
                with OutputLock(tmp_path / "r.html"):
                    r = stub_cli(*verb)
            else:
                r = stub_cli(*verb)
            assert r.exit_code == 2, r.output
            assert f"being written by nfb process {os.getpid()}" in one_line_error(r.output)
    assert not kept.exists()
    r = stub_cli("filter", scored, "-o", kept, "--min-level", "1")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- item 4 (and 10): the fingerprint covers the model and the input ------------------------

def test_a_changed_template_between_kill_and_rerun_is_refused_never_mixed(
        stub_cli, killed, data, model, tmp_path):
    out = tmp_path / "out.parquet"
    killed(out)
    template = model / "chat_template.jinja"
    template.write_text("NEW " + template.read_text())
    r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 2
    line = one_line_error(r.output)
    assert "model that has changed" in line and "--overwrite" in line
    r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS, "--overwrite")
    assert r.exit_code == 0, r.output
    # every row from the new template: the same as a fresh run with it
    assert table(out) == table(reference(stub_cli, data, model, tmp_path, "new.parquet"))


def test_the_model_path_spelled_two_ways_is_one_model(stub_cli, killed, data, model, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(model.parent.parent)        # tmp_path/models/causal
    out = tmp_path / "out.parquet"
    killed(out)                                   # --model is absolute here
    r = stub_cli("feedback", data, "-o", out, "--model", "./models/causal", *ARGS)
    assert r.exit_code == 0 and "resuming" in r.output, r.output
    r = stub_cli("feedback", data, "-o", out, "--model", "models/causal", *ARGS)
    assert r.exit_code == 0 and "already complete" in r.output, r.output


def test_an_edited_or_appended_input_is_named_as_changed(stub_cli, killed, data, model,
                                                         tmp_path):
    out = tmp_path / "out.parquet"
    killed(out)
    # the same size and modification time, other contents
    st = data.stat()
    body = data.read_bytes()
    data.write_bytes(body.replace(b"Tell me about the sea (0)", b"Tell me about the SEA (0)"))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.stat().st_size == st.st_size and data.stat().st_mtime_ns == st.st_mtime_ns
    r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 2
    assert "inputs that have changed" in one_line_error(r.output)
    # appended rows: the same message, not "other settings"
    data.write_bytes(body + orjson.dumps(sample_rows(61)[60]) + b"\n")
    r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 2
    line = one_line_error(r.output)
    assert "inputs that have changed" in line and "other settings" not in line
    # a finished output whose input changed since says so too
    data.write_bytes(body)
    r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS, "--overwrite")
    assert r.exit_code == 0, r.output
    data.write_bytes(body + b"\n")
    r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 2 and "inputs that have changed" in one_line_error(r.output)


def test_rerun_with_the_output_inside_the_input_folder_is_complete(stub_cli, model, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", sample_rows(20))
    out = folder / "scored.parquet"
    r = stub_cli("feedback", folder, "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 0, r.output
    r = stub_cli("feedback", folder, "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    r = stub_cli("feedback", f"{folder}/*", "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    assert pq.read_table(out).num_rows == 20
    # named on its own, the output is still refused as an input
    r = stub_cli("feedback", out, "-o", out, "--model", model, *ARGS, "--overwrite")
    assert r.exit_code == 2 and "also an input" in one_line_error(r.output)


# --- item 5: only nfb's own work directories are removed ------------------------------------

def test_a_users_out_nfb_folder_is_never_deleted(stub_cli, data, model, tmp_path):
    out = tmp_path / "out.parquet"
    mine = tmp_path / "out.parquet.nfb"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    shutil.copy(data, mine / "in.jsonl")
    for extra in ([], ["--overwrite"]):
        r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS, *extra)
        assert r.exit_code == 2
        assert "not made by nfb" in one_line_error(r.output)
        r = stub_cli("feedback", mine / "in.jsonl", "-o", out, "--model", model, *ARGS, *extra)
        assert r.exit_code == 2
        assert "where nfb keeps the output's checkpoint" in one_line_error(r.output)
    assert sorted(p.name for p in mine.iterdir()) == ["in.jsonl", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "mine" and not out.exists()


def test_a_damaged_state_json_stops_with_the_way_out(stub_cli, killed, data, model, tmp_path):
    out = tmp_path / "out.parquet"
    wd = killed(out)
    parts = sorted(p.name for p in wd.glob("part-*.parquet"))
    (wd / "state.json").write_bytes(b'{"fingerprint": "abc", "mod')
    r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS)
    assert r.exit_code == 2
    line = one_line_error(r.output)
    assert "state.json is damaged" in line and "--overwrite" in line
    assert sorted(p.name for p in wd.glob("part-*.parquet")) == parts   # nothing discarded
    r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS, "--overwrite")
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).num_rows == 60


# --- item 6 (and 9): a lost or damaged part costs only its rows -----------------------------

@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_lost_first_part_costs_only_its_rows(stub_cli, killed, data, model, tmp_path, damage):
    ref = reference(stub_cli, data, model, tmp_path)
    out = tmp_path / "out.parquet"
    wd = killed(out)
    first = sorted(wd.glob("part-*.parquet"))[0]
    if damage == "delete":
        first.unlink()
    else:
        first.write_bytes(first.read_bytes()[:100])
    # a rerun that buffers its rows (the redone first rows and the rest in one part)
    opts = [*ARGS[:-2], "--checkpoint-every", "30"]
    r = stub_cli("feedback", data, "-o", out, "--model", model, *opts)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    if damage == "truncate":
        assert "damaged checkpoint part" in r.output
    assert table(out) == table(ref)
    r = stub_cli("feedback", data, "-o", out, "--model", model, *opts)
    assert r.exit_code == 0 and "already complete" in r.output, r.output


# --- item 7: engine.json kills only the user's engine processes -----------------------------

ENGINE_LIKE = ("import setproctitle, subprocess, sys, time; setproctitle.setproctitle("
               "'VLLM::EngineCore'); c = subprocess.Popen(['sleep', '120']); "
               "print(c.pid, flush=True); time.sleep(120)")


def test_a_forged_engine_json_never_kills_an_unrelated_process(stub_cli, killed, data, model,
                                                               tmp_path):
    pytest.importorskip("setproctitle")
    out = tmp_path / "out.parquet"
    wd = killed(out)
    unrelated = subprocess.Popen(["sleep", "120"])
    engine = subprocess.Popen([sys.executable, "-c", ENGINE_LIKE], stdout=subprocess.PIPE)
    try:
        child = int(engine.stdout.readline())
        t0 = time.monotonic()
        while "VLLM" not in " ".join(psutil.Process(engine.pid).cmdline()):
            assert time.monotonic() - t0 < 30
            time.sleep(0.05)
        records = [[p.pid, psutil.Process(p.pid).create_time()] for p in (unrelated, engine)]
        (wd / "engine.json").write_bytes(orjson.dumps({"pids": records}))
        r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS)
        assert r.exit_code == 0, r.output
        assert "stopped 1 leftover engine process" in r.output
        assert engine.wait(timeout=10) is not None          # the engine-like process: stopped
        assert unrelated.poll() is None                     # an unrelated `sleep`: untouched
        assert psutil.pid_exists(child) and psutil.Process(child).status() != "zombie"
    finally:
        for p in (unrelated, engine):
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, NameError, UnboundLocalError):
            pass


# --- item 8: an output never replaces an input or convert's source ---------------------------

def test_an_output_equal_to_its_input_is_refused_even_with_overwrite(stub_cli, data, model,
                                                                     tmp_path, monkeypatch):
    scored = reference(stub_cli, data, model, tmp_path, "scored.parquet")
    before = scored.read_bytes()
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.parquet"
    link.symlink_to(scored)
    for spelling in (scored, "./scored.parquet", link):
        for verb in (["filter", scored, "--min-level", "1"],
                     ["pairs", scored, "--group-by", "prompt"]):
            r = stub_cli(*verb, "-o", spelling, "--overwrite")
            assert r.exit_code == 2, r.output
            assert "also an input" in one_line_error(r.output)
    assert scored.read_bytes() == before
    ckpt = tmp_path / "ckpt"
    (ckpt / "model_weights").mkdir(parents=True)
    (ckpt / "model_config.yaml").write_text("hidden_size: 8\n")
    for target in (ckpt, tmp_path):                 # the source, or a folder that holds it
        r = stub_cli("convert", ckpt, "-o", target, "--tokenizer", model, "--overwrite")
        assert r.exit_code == 2, r.output
        assert "never writes over its source" in one_line_error(r.output)
    assert (ckpt / "model_config.yaml").read_text() == "hidden_size: 8\n"
    tok = tmp_path / "tok"
    shutil.copytree(model, tok)
    r = stub_cli("convert", ckpt, "-o", tok, "--tokenizer", tok, "--overwrite")
    assert r.exit_code == 2 and "the tokenizer" in one_line_error(r.output)
    assert (tok / "tokenizer.json").exists()


# --- item 9: one line, never a traceback ----------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.getuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    r = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot make a read-only folder here (root, and no bind mount)")
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot remount read-only")
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_a_read_only_output_folder_is_one_line(stub_cli, data, model, tmp_path, read_only_dir):
    scored = reference(stub_cli, data, model, tmp_path, "scored.parquet")
    for args in (["feedback", data, "-o", read_only_dir / "out.parquet", "--model", model,
                  *ARGS],
                 ["filter", scored, "-o", read_only_dir / "kept.parquet", "--min-level", "1"],
                 ["report", scored, "-o", read_only_dir / "r.html"]):
        r = stub_cli(*args)
        assert r.exit_code == 2, r.output
        assert "cannot write there" in one_line_error(r.output)
    assert list(read_only_dir.iterdir()) == []


def _enospc(*_a, **_k):
    raise OSError(28, os.strerror(28))


def test_disk_full_is_one_line_and_rows_are_kept(stub_cli, killed, data, model, tmp_path,
                                                  monkeypatch):
    ref = reference(stub_cli, data, model, tmp_path)
    out = tmp_path / "out.parquet"
    wd = killed(out)
    saved = sum(pq.ParquetFile(p).metadata.num_rows for p in wd.glob("part-*.parquet"))
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", _enospc)       # the file system reports the disk full
        r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS)
        assert r.exit_code == 1, r.output
        line = one_line_error(r.output)
        assert "No space left on device" in line and "free some space" in line
        assert f"{saved:,} rows are saved" in line
        r = stub_cli("filter", ref, "-o", tmp_path / "kept.parquet", "--min-level", "1")
        assert r.exit_code == 1 and "No space left" in one_line_error(r.output)
    assert not out.exists() and not (tmp_path / "kept.parquet").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    r = stub_cli("feedback", data, "-o", out, "--model", model, *ARGS)   # space again
    assert r.exit_code == 0, r.output
    assert table(out) == table(ref)


@pytest.fixture
def tiny_fs(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(d)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_a_really_full_disk_is_one_line(stub_cli, model, tmp_path, tiny_fs):
    big = write_jsonl(tmp_path / "big.jsonl", [{**r, "response": r["response"] * 40}
                                               for r in sample_rows(200)])
    r = stub_cli("feedback", big, "-o", tiny_fs / "out.parquet", "--model", model, *ARGS)
    assert r.exit_code == 1, r.output
    assert "No space left on device" in one_line_error(r.output)


def test_a_deep_where_is_one_line(stub_cli, data, model, tmp_path):
    scored = reference(stub_cli, data, model, tmp_path, "scored.parquet")
    r = stub_cli("filter", scored, "-o", tmp_path / "a.parquet", "--where",
                 "NOT " * 500 + "feedback_level >= 1")      # was a RecursionError
    assert r.exit_code == 0, r.output
    for depth in (900, 2000):
        r = stub_cli("filter", scored, "-o", tmp_path / "b.parquet", "--where",
                     "NOT " * depth + "feedback_level >= 1")
        assert r.exit_code == 2, r.output
        one_line_error(r.output)


def test_report_on_scores_one_ulp_apart(stub_cli, tmp_path):
    import numpy as np

    x = 0.1
    rewards = [x, float(np.nextafter(x, 1.0)), x, float(np.nextafter(x, 1.0))]
    t = pa.table({"prompt": ["p"] * 4, "response": list("abcd"), "nfb_row": [0, 1, 2, 3],
                  "nfb_error": pa.nulls(4, pa.string()), "reward": rewards})
    pq.write_table(t, tmp_path / "s.parquet")
    r = stub_cli("report", tmp_path / "s.parquet", "-o", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    assert "dist-reward" in (tmp_path / "r.html").read_text()
