"""The README's Python API snippet runs as written (models swapped for tiny ones, the stub
engine in place of vLLM)."""

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_snippet(stub_cli, tiny_tokenizer_model, models, tmp_path, monkeypatch,
                            capsys):
    code = snippet()
    assert "import nfb" in code and "nfb.feedback(" in code and "nfb.score(" in code
    (tmp_path / "samples").mkdir()
    shutil.copy(ROOT / "samples" / "prompts.jsonl", tmp_path / "samples" / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    code = code.replace('model="demo"', f'model="{tiny_tokenizer_model}"')
    # steerlm-rm-hf is what `nfb convert` makes of Llama3-70B-SteerLM-RM: its config's nfb key
    # names the recipe (and so its weights); a copy of the tiny 9-head model stands for it
    import json
    hf = tmp_path / "steerlm-rm-hf"
    shutil.copytree(models["rm9"], hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["nfb"] = {"recipe": "llama3-70b-steerlm-rm", "prompt_format": "steerlm"}
    (hf / "config.json").write_text(json.dumps(cfg))
    code = code.replace('model="steerlm-rm-hf"', f'model="{hf}"')
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("36 {}")      # rows, no errors
    assert "'p50'" in out[-1] or "p50" in out[-1]
    import pyarrow.parquet as pq
    prompts = set(pq.read_table(tmp_path / "scored.parquet").column("prompt").to_pylist())
    best = pq.read_table(tmp_path / "best.parquet").column("prompt").to_pylist()
    assert sorted(best) == sorted(prompts) and len(best) < 36     # one row per prompt
