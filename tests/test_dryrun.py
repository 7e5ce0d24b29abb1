"""`--dry-run`: the plan before the GPUs, checked against a real run of the same command (stub
engine): the same rows, the same error rows by reason, and the same prompt token counts
(the stub engine writes each request's prompt length into its text). No engine starts."""

from __future__ import annotations

import gzip
import re
from collections import Counter

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_jsonl
from test_bad_input import CASES
from test_judge import genrm_dir  # noqa: F401 - a fixture

FAST = ["--max-tokens", "8", "--temperature", "0"]


def _no_engine(cfg, runner):
    raise AssertionError("a dry run started an engine")


def _messy(tmp_path):
    """Every bad-row case of test_bad_input, a truncated .gz, an unreadable Parquet file and
    a good Parquet file."""
    a = tmp_path / "a.jsonl"
    a.write_bytes(b"\n".join(line for line, _ in CASES) + b"\n")
    data = b"".join(orjson.dumps({"prompt": f"z{i}", "response": "r" * (i % 50 + 1)}) + b"\n"
                    for i in range(300))
    packed = gzip.compress(data)
    (tmp_path / "b.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "c.parquet").write_bytes(b"PAR1 garbage")
    pq.write_table(pa.Table.from_pylist(sample_rows(11)), tmp_path / "d.parquet",
                   row_group_size=4)
    return [a, tmp_path / "b.jsonl.gz", tmp_path / "c.parquet", tmp_path / "d.parquet"]


@pytest.mark.parametrize("extra", [[], ["--batch-rows", "3", "--limit", "40"],
                                   ["--shard", "1/3", "--samples", "2"]])
def test_dry_run_counts_equal_a_real_run(stub_cli, engines, tiny_tokenizer_model, tmp_path,
                                         extra):
    files = _messy(tmp_path)
    args = ["feedback", *files, "-o", tmp_path / "out.parquet", "--model", tiny_tokenizer_model,
            "--max-model-len", "1024", *FAST, *extra]
    engines("vllm", _no_engine)
    r = stub_cli(*args, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) == 1
    plan = orjson.loads(r.stdout)
    assert not (tmp_path / "out.parquet").exists()
    assert not (tmp_path / "out.parquet.nfb").exists()

    from stub_engine import StubEngine
    engines("vllm", StubEngine)
    r = stub_cli(*args)
    assert r.exit_code == 0, r.output
    t = pq.read_table(tmp_path / "out.parquet")
    errors = Counter(e.split(":")[0] for e in t.column("nfb_error").to_pylist() if e)
    assert plan["rows"] == t.num_rows
    assert plan["errors"] == dict(errors) and plan["error_rows"] == sum(errors.values())
    assert {"malformed_json", "prompt_too_long", "truncated_file",
            "unreadable_file"} <= set(errors) or extra
    # the prompt lengths a real run sent (the stub engine writes them into its text)
    texts = t.column("feedback" if "--samples" not in extra else "feedback_samples")
    lens = [int(re.search(r"of (\d+) prompt tokens", (x if isinstance(x, str) else x[0])
                          ).group(1)) for x in texts.to_pylist() if x is not None]
    assert plan["requests"] == len(lens) == t.num_rows - sum(errors.values())
    tok = plan["prompt_tokens"]
    assert tok["total"] == sum(lens) and tok["max"] == max(lens)
    assert tok["p50"] == float(np.percentile(lens, 50))
    assert tok["p99"] == float(np.percentile(lens, 99))
    assert tok["mean"] == round(float(np.mean(lens)), 1)
    samples = 2 if "--samples" in extra else 1
    assert plan["sequences"] == samples * len(lens)
    assert plan["prompt_budget"] == 1024 - 8


def test_dry_run_api_and_score_estimate(engines, models, tmp_path):
    import nfb
    from nfb.run.dryrun import RATES, count_params

    engines("vllm", _no_engine)
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(25) + [{"prompt": "p"}])
    plan = nfb.score(src, tmp_path / "o.parquet", model=str(models["rm9"]),
                     weights="llama3-70b-steerlm", dry_run=True)
    assert plan.dry_run and plan.rows == 26 and plan.requests == 25
    assert dict(plan.errors) == {"missing_field": 1} and plan.sequences == 0
    s = plan.summary()
    est = s["estimate"]
    assert [r["gpu"] for r in est["gpus_table"]] == [r.gpu for r in RATES]
    assert all(r["source"] in ("derived", "measured") for r in est["gpus_table"])
    assert all(r["decode_s_at_most"] == 0 for r in est["gpus_table"])   # a reward model
    # the parameter count from the config equals the tiny model's real one
    import torch  # noqa: F401
    from transformers import AutoModelForSequenceClassification
    real = sum(p.numel() for p in
               AutoModelForSequenceClassification.from_pretrained(models["rm9"]).parameters())
    cfg = orjson.loads((models["rm9"] / "config.json").read_bytes())
    assert count_params(cfg) == real
    h100 = next(r for r in est["gpus_table"] if r["gpu"] == "H100-SXM")
    assert h100["prefill_s"] == round(s["prompt_tokens"]["total"]
                                      / h100["prefill_tokens_per_s_per_gpu"], 1) or \
        abs(h100["prefill_s"] - s["prompt_tokens"]["total"]
            / h100["prefill_tokens_per_s_per_gpu"]) < 0.1


def test_count_params_of_a_causal_lm(tiny_tokenizer_model):
    from transformers import AutoModelForCausalLM

    from nfb.run.dryrun import count_params
    cfg = orjson.loads((tiny_tokenizer_model / "config.json").read_bytes())
    real = sum(p.numel() for p in
               AutoModelForCausalLM.from_pretrained(tiny_tokenizer_model).parameters())
    assert count_params(cfg) == real


def test_dry_run_table_and_usage(stub_cli, engines, tiny_tokenizer_model, tmp_path):
    engines("vllm", _no_engine)
    src = write_jsonl(tmp_path / "in.jsonl", sample_rows(5))
    r = stub_cli("feedback", src, "-o", tmp_path / "o.parquet", "--model", tiny_tokenizer_model,
                 *FAST, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "no engine started" in r.stdout and "engine time estimate" in r.stdout
    assert "derived" in r.stdout
    r = stub_cli("feedback", src, "-o", tmp_path / "o.parquet", "--model", tiny_tokenizer_model,
                 "--json")
    assert r.exit_code == 2 and "--json goes with --dry-run" in r.output


def test_judge_dry_run_counts_equal_a_real_run(stub_cli, engines, genrm_dir,  # noqa: F811
                                               tmp_path):
    rows = [{"prompt": f"Question {i}?", "a": f"Answer A{i}.", "b": f"Answer B{i}."}
            for i in range(6)]
    rows[1]["b"] = None
    rows[4]["a"] = "word " * 3000
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["judge", path, "-o", tmp_path / "o.parquet", "--model", genrm_dir,
            "--response-field", "a", "--response-field", "b", "--max-tokens", "64"]
    engines("vllm", _no_engine)
    r = stub_cli(*args, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = orjson.loads(r.stdout)
    from stub_engine import StubEngine
    engines("vllm", StubEngine)
    r = stub_cli(*args)
    assert r.exit_code == 0, r.output
    errs = pq.read_table(tmp_path / "o.parquet").column("nfb_error").to_pylist()
    assert plan["errors"] == dict(Counter(e.split(":")[0] for e in errs if e))
    assert plan["errors"] == {"null_field": 1, "prompt_too_long": 1}
    assert plan["rows"] == 6 and plan["requests"] == 4 and plan["sequences"] == 4
