"""Usage errors: exit 2 (or 1 for an input that cannot be opened) before anything heavy loads."""

import subprocess
import sys

import pytest
from conftest import sample_rows, write_jsonl

PROBE = """
import sys
sys.argv = ["nfb"] + sys.argv[1:]
import nfb.cli
try:
    nfb.cli.main()
except SystemExit as e:
    print("EXIT", e.code, "vllm" in sys.modules, "torch" in sys.modules)
"""


def run_probe(*args):
    p = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                       text=True, timeout=60)
    last = p.stdout.strip().splitlines()[-1].split()
    return int(last[1]), last[2] == "True" or last[3] == "True", p.stderr


@pytest.mark.parametrize("args,code,message", [
    (["feedback", "{src}", "-o", "out.txt"], 2, "must end in .parquet"),
    (["feedback", "{src}", "-o", "o.parquet", "--shard", "3/2"], 2, "0 <= I < N"),
    (["feedback", "{src}", "-o", "o.parquet", "--temperatur", "1"], 2, "No such option"),
    (["feedback", "{src}", "-o", "o.parquet", "--samples", "0"], 2, "Invalid value"),
    (["feedback", "{src}", "-o", "o.parquet", "--model", "./no/such/dir"], 2, "no such model"),
    (["feedback", "{src}", "-o", "o.parquet", "--dtype", "fp8"], 2, "--dtype"),
    (["feedback", "missing.jsonl", "-o", "o.parquet"], 1, "missing.jsonl: no such file"),
    (["feedback", "{src}", "-o", "{src}", "--overwrite"], 2, "is also an input"),
    (["score", "{src}", "-o", "o.parquet"], 2, "Missing option '--model'"),
    (["judge", "{src}", "-o", "o.parquet", "--recipe", "nope"], 2, "unknown"),
    (["judge", "{src}", "-o", "o.parquet", "--model", "nvidia/Qwen3-Nemotron-235B-A22B-GenRM"],
     2, "two responses at once"),
    (["filter", "{src}", "-o", "o.parquet", "--best-of-n"], 2, "--group-by"),
    (["merge", "{src}", "-o", "o.parquet"], 2, "no nfb provenance"),
])
def test_fails_fast_without_loading_anything(tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(2))
    got, heavy, stderr = run_probe(*[a.format(src=src) for a in args])
    assert got == code, stderr
    assert message in " ".join(stderr.split()), stderr
    assert not heavy, "vllm/torch must not be imported to reject bad usage"


def test_version_and_help(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")
    monkeypatch.setenv("TERMINAL_WIDTH", "240")
    r = cli("--version")
    assert r.exit_code == 0 and r.output.startswith("nfb ")
    for cmd in ("feedback", "score", "filter", "stats", "merge", "demo"):
        r = cli(cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output
    r = cli("feedback", "--help")
    for opt in ("--prompt-field", "--messages-field", "--samples", "--temperature", "--top-p",
                "--max-tokens", "--seed", "--tensor-parallel-size", "--max-model-len",
                "--gpu-memory-utilization", "--dtype", "--trust-remote-code", "--shard",
                "--limit", "--prefix", "--overwrite", "--constrain-level", "--engine"):
        assert opt in r.output, opt
